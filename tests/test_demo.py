"""`restuning demo`'s progress: a bar per run, fed with the optimizer steps of a run in another process."""

from __future__ import annotations

from typing import Any

from conftest import tiny_vit_folder
from tqdm.auto import tqdm

from restuning import demo
from restuning.train.config import TrainConfig, from_dict
from restuning.train.isolated import run_isolated


def test_a_run_in_its_own_process_reports_every_optimizer_step(tmp_path):
    config = from_dict(TrainConfig, {
        "backbone": str(tiny_vit_folder(tmp_path)), "method": {"name": "linear"},
        "data": {"name": "mnist", "train_size": 32, "test_size": 16, "image_size": 16},
        "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0}, "output_dir": str(tmp_path / "run")})
    calls: list[tuple[int, int | None]] = []
    row = run_isolated(config, threads=1, progress=lambda done, total: calls.append((done, total)))
    assert 0.0 <= row["test_accuracy"] <= 1.0
    known = [c for c in calls if c[1] is not None]
    assert {total for _, total in known} == {4}  # 2 epochs of 2 batches
    steps = [done for done, _ in known]
    assert steps == sorted(steps) and sorted(set(steps)) == [0, 1, 2, 3, 4]
    assert all(done == 0 for done, total in calls if total is None)  # before the run knows its length
    assert calls[-1] == (4, 4)


def _fake_run(steps: int):
    def run(config: TrainConfig, threads: int | None = None, progress=None) -> dict[str, Any]:
        progress(0, None)  # loading
        for done in range(steps + 1):
            progress(done, steps)
        progress(steps, steps)  # evaluating: no new step
        return {"test_accuracy": 0.5, "train_examples": 200, "trainable_params": 10, "peak_memory_bytes": 2**20,
                "seconds": 1.0, "reused": False}
    return run


class _Recording(tqdm):
    updates: list[tuple[str, int, int | None]] = []

    def update(self, n: int = 1) -> bool | None:
        _Recording.updates.append((self.desc, self.n + n, self.total))
        return super().update(n)


def test_the_demo_draws_a_bar_per_run_that_moves_with_its_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_isolated", _fake_run(3))
    monkeypatch.setattr(demo, "tqdm", _Recording)
    _Recording.updates = []
    rows = demo.run_demo(tmp_path, quick=True)
    configs = demo.demo_configs(tmp_path, quick=True)
    assert len(rows) == len(configs) == 6
    for i, config in enumerate(configs, 1):
        name = f"[{i}/6] {config.backbone} {config.method.name}"
        assert [(n, total) for desc, n, total in _Recording.updates if desc == name] == [(1, 3), (2, 3), (3, 3)]
    out, err = capsys.readouterr()
    assert "3/3" in err  # the bars (stderr); the table stays on stdout, as it was
    assert out.splitlines()[1].split() == ["backbone", "method", "accuracy", "trainable", "peak", "MiB", "epochs",
                                           "seconds"]
    assert len([line for line in out.splitlines() if "0.500" in line]) == 6


def test_the_demo_without_bars_prints_a_line_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_isolated", lambda config: _fake_run(2)(config, progress=lambda *a: None))
    demo.run_demo(tmp_path, quick=True, progress=False)
    out = capsys.readouterr().out
    assert "[1/6] all-MiniLM-L6-v2 linear: training ..." in out
