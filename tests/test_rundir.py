"""The run folder (`restuning.train.rundir`) under the one training loop, on a toy regression run: a kill at
any file operation resumes from the newest complete checkpoint and ends as an uninterrupted run; the folder
is locked, its config checked, a finished run never overwritten, a diverging run stopped before any
non-finite weight is written, and an unusable folder refused before any work."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import restuning.train.rundir as rundir_module
from restuning import ConfigError, RunError, TrainingError, checkpoint
from restuning.train.loop import LoopSettings, TrainingLoop
from restuning.train.rundir import RunDirectory

TIMING = ("train_seconds", "step_seconds")
STEPS = 8  # 2 epochs of 4 batches


class Toy(TrainingLoop):
    """Linear regression on 16 points: 4 batches per epoch, a checkpoint every 2 steps."""

    def __init__(self, out: Path, nan_at: int | None = None, **settings):
        defaults = dict(output_dir=str(out), seed=0, epochs=2, batch_size=4, lr=0.05, weight_decay=0.0,
                        schedule="constant", unit="step", log_every=2, eval_every=3, checkpoint_every=2)
        super().__init__(LoopSettings(**{**defaults, **settings}), progress=False)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(16, generator=g)
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.num_examples = 16
        self.batches, self.nan_at = 0, nan_at

    def batch_loss(self, model, index, epoch, batch):
        self.batches += 1
        loss = F.mse_loss(model(self.x[index]).squeeze(-1), self.y[index])
        if self.nan_at is not None and epoch * 4 + batch + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss

    def write_final(self, directory):
        checkpoint.save(directory, self.trainable(), {"method": "toy"})

    def evaluate(self):
        with torch.no_grad():
            return {"eval_loss": F.mse_loss(self.unwrapped(self.x).squeeze(-1), self.y).item()}


class NanGradient(Toy):
    """A finite loss whose gradient is not: d/dw sqrt(|w - w|) at 0 is infinite, times 0 is NaN."""

    def batch_loss(self, model, index, epoch, batch):
        loss = super().batch_loss(model, index, epoch, batch)
        if epoch * 4 + batch + 1 == 3:
            weight = self.unwrapped.weight
            loss = loss + 0.0 * (weight - weight.detach()).abs().sqrt().sum()
        return loss


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line, parse_constant=_no_constants).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _no_constants(token: str):
    raise AssertionError(f"metrics.jsonl holds {token}: not strict JSON")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / checkpoint.WEIGHTS_NAME))


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders, and the lock, that should not outlive a run."""
    found = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "run.lock"]
    if (out / "checkpoints").is_dir():
        found += [f"checkpoints/{p.name}" for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    return found


def outcome(out: Path, result: dict) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    return {k: v for k, v in result.items() if k not in TIMING}, records(out), weights(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("whole") / "run"
    return outcome(out, Toy(out).run())


def assert_like_uninterrupted(out: Path, result: dict, expected, steps: int = STEPS) -> None:
    got = outcome(out, result)
    assert got[:2] == expected[:2]
    assert got[2].keys() == expected[2].keys() and all(torch.equal(got[2][k], expected[2][k]) for k in got[2])
    assert leftovers(out) == [] and [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{steps:08d}"]


# --- kills -----------------------------------------------------------------------------------------
class Killed(BaseException):
    """A kill: raised by the n-th file operation, and by every later one (nothing runs after a kill)."""


FILE_OPERATIONS = [(os, "replace"), (os, "rename"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"), (os, "fsync"),
                   (shutil, "rmtree"), (torch, "save"), (rundir_module, "save_file"), (checkpoint, "save_file"),
                   (RunDirectory, "append_record")]


def kill_at(monkeypatch, n: int) -> list[int]:
    """Make the n-th file operation from now on kill the run; the steps of the checkpoints committed
    (renamed into place) before it."""
    count, committed = [0], []

    def deadly(name, operation):
        @functools.wraps(operation)
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] >= n:
                raise Killed(f"{name} #{count[0]}")
            done = operation(*args, **kwargs)
            if name == "replace" and (m := re.fullmatch(r"step-(\d+)", Path(args[1]).name)):
                committed.append(int(m.group(1)))
            return done
        return op

    for owner, name in FILE_OPERATIONS:
        monkeypatch.setattr(owner, name, deadly(name, getattr(owner, name)))
    return committed


def test_a_kill_at_any_file_operation_resumes_from_the_newest_complete_checkpoint(tmp_path, monkeypatch, capsys):
    """One epoch (checkpoints at steps 2 and 4, the second replacing the first, then final/), killed at its
    1st, 2nd, ... file operation until it gets through, and each time started again."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a process kill loses no page cache; and it is faster
    steps, whole = STEPS // 2, tmp_path / "whole"
    uninterrupted = outcome(whole, Toy(whole, epochs=1).run())
    n = 0
    while True:
        n += 1
        out = tmp_path / f"kill-{n}"
        run = Toy(out, epochs=1)
        with monkeypatch.context() as m:
            committed = kill_at(m, n)
            try:
                run.run()
                break  # n is past the run's last file operation
            except Killed:
                pass
        capsys.readouterr()
        finished = (out / "final").is_dir()  # killed after the run wrote final/ (releasing its lock)
        restarted = Toy(out, epochs=1)
        result = restarted.run()
        newest = max(committed, default=0)
        # Nothing committed is trained again: the restart goes on from the newest checkpoint.
        assert restarted.batches == steps - newest, (n, committed)
        err = capsys.readouterr().err
        if finished:
            assert "the run is finished" in err
        elif newest:
            assert f"from checkpoints/step-{newest:08d}" in err
        assert_like_uninterrupted(out, result, uninterrupted, steps)
    print(f"{n - 1} kill points")
    assert n > 25, "the injection reached too few file operations"


@pytest.mark.parametrize("batches", range(1, STEPS))
def test_a_run_stopped_after_any_batch_ends_like_an_uninterrupted_one(tmp_path, batches, uninterrupted):
    out = tmp_path / "run"
    assert Toy(out).run(stop_after_batches=batches) == {"stopped": True}
    restarted = Toy(out)
    result = restarted.run()
    assert restarted.batches == STEPS - batches // 2 * 2  # from the checkpoint of the last even step
    assert_like_uninterrupted(out, result, uninterrupted)


def test_a_resumed_run_says_from_where(tmp_path, capsys):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=7)
    capsys.readouterr()
    Toy(out).run()
    assert "resuming" in (err := capsys.readouterr().err)
    assert "checkpoints/step-00000006: in epoch 2 after batch 2, after optimizer step 6 of 8" in err


# --- the lock --------------------------------------------------------------------------------------
def test_a_second_loop_on_a_folder_in_use_is_refused_naming_the_pid(tmp_path):
    first = Toy(tmp_path / "run")
    with pytest.raises(RunError, match=rf"{tmp_path / 'run'}: another run is using this folder \(pid {os.getpid()}\)"):
        Toy(tmp_path / "run")
    first.run()  # the run ends: the lock goes
    assert not (tmp_path / "run" / "run.lock").exists()
    Toy(tmp_path / "run").close()


def test_another_process_holding_the_folder_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'{os.getpid()}\\n'.encode()); print('locked', flush=True); time.sleep(60)",
         str(out / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"another run is using this folder \(pid {holder.pid}\)"):
            Toy(out)
    finally:
        holder.kill()
        holder.wait()
    Toy(out).run()  # a lock left by a killed process does not hold


def test_a_failed_run_releases_its_folder(tmp_path):
    with pytest.raises(TrainingError):
        Toy(tmp_path / "run", nan_at=3).run()
    Toy(tmp_path / "run").close()


# --- the saved config ------------------------------------------------------------------------------
def test_a_restart_with_another_config_is_refused_naming_each_key(tmp_path):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=3)
    with pytest.raises(RunError, match=r"differs in:\n  lr: saved 0.05, new 0.1\n  seed: saved 0, new 1\n"
                                       r".*--allow-change lr --allow-change seed"):
        Toy(out, lr=0.1, seed=1).run()
    with pytest.raises(ConfigError, match="allow change 'lrate': the run config has no such key"):
        Toy(out, lr=0.1, allow_changes=("lrate",))
    assert json.loads((out / "run_config.json").read_text())["lr"] == 0.05  # refused: nothing changed
    assert Toy(out).run()["step"] == STEPS


def test_allowed_changes_go_on_from_the_checkpoint_even_after_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    Toy(out).run()
    with pytest.raises(RunError, match="epochs: saved 2, new 3"):
        Toy(out, epochs=3).run()
    longer = Toy(out, epochs=3, allow_changes=("epochs",))
    result = longer.run()
    assert longer.batches == 4 and result["step"] == 12 and [r["step"] for r in records(out)][-2:] == [10, 12]
    assert "allowed config changes epochs 2 -> 3" in capsys.readouterr().err
    assert json.loads((out / "run_config.json").read_text())["epochs"] == 3
    assert Toy(out, epochs=3).run() == result  # now finished with the new config


def test_an_allowed_lr_change_takes_effect_on_resume(tmp_path):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=4)
    result = Toy(out, lr=0.01, weight_decay=0.1, allow_changes=("lr", "weight_decay")).run()
    assert [r.get("lr") for r in records(out)] == [0.05, None, 0.05, 0.01, 0.01]  # not the checkpoint's 0.05
    assert result["lr"] == 0.01


def test_a_finished_run_without_checkpoints_cannot_be_lengthened(tmp_path):
    out = tmp_path / "run"
    Toy(out, checkpoint_every=0).run()
    with pytest.raises(RunError, match="finished run of 8 optimizer steps; this config asks for 12.*no checkpoint"):
        Toy(out, checkpoint_every=0, epochs=3, allow_changes=("epochs",)).run()


def test_run_files_without_a_saved_config_are_refused(tmp_path):
    out = tmp_path / "run"
    Toy(out).run()
    (out / "run_config.json").unlink()
    with pytest.raises(RunError, match="holds a run's files but no run_config.json"):
        Toy(out).run()


# --- a finished run --------------------------------------------------------------------------------
def test_a_finished_run_started_again_returns_its_last_record_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    result = Toy(out, checkpoint_every=0).run()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = Toy(out, checkpoint_every=0)
    assert again.run() == result and again.batches == 0
    assert "the run is finished (epoch 2, step 8)" in capsys.readouterr().err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


# --- divergence ------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=4)
    good = (out / "checkpoints" / "step-00000004" / "trainable.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, batch 2, before optimizer step 6.*"
                                            r"step-00000004, is kept.*Lower optim.lr"):
        Toy(out, nan_at=6).run()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert (out / "checkpoints" / "step-00000004" / "trainable.safetensors").read_bytes() == good
    assert not (out / "final").exists()
    assert [r["step"] for r in records(out)] == [2, 3, 4]  # strict JSON, no NaN
    assert Toy(out).run()["step"] == STEPS  # the data are fine again: the run goes on from step 4


def test_a_non_finite_gradient_stops_the_run_before_the_step(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite gradient \(norm nan\) at epoch 1, batch 3"):
        NanGradient(out).run()
    state = torch.load(out / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["optimizer_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoints" / "step-00000002" /
                                                             "trainable.safetensors")).values())


class InfiniteWeight(Toy):
    """Finite losses and gradients, but a weight that becomes infinite in the second batch (as an optimizer
    step can overflow one)."""

    def batch_loss(self, model, index, epoch, batch):
        loss = super().batch_loss(model, index, epoch, batch)
        if self.batches == 2:
            with torch.no_grad():
                self.unwrapped.weight[0, 0] = float("inf")
        return loss


def test_non_finite_weights_are_never_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite trainable weights \(weight\) after optimizer step 2.*"
                                            r"no checkpoint was written"):
        InfiniteWeight(out, log_every=1).run()
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    assert [r["step"] for r in records(out)] == [1]


def test_non_finite_metrics_are_written_as_null(tmp_path, capsys):
    run = RunDirectory(tmp_path)
    run.append_record({"step": 1, "eval_loss": float("inf"), "train_loss": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "eval_loss": None, "train_loss": 1.0}
    assert "eval_loss not finite" in capsys.readouterr().err
    run.release()


# --- unusable folders ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,make,message", [
    ("checkpoints", lambda p: p.write_text("x"), "the resumable checkpoints folder here as a folder, but this is a "
                                                 "file; move it away"),
    ("final", lambda p: p.write_text("x"), "the finished run's folder here as a folder, but this is a file"),
    ("metrics.jsonl", lambda p: p.mkdir(), "the metrics file here as a file, but this is a folder"),
    ("run_config.json", lambda p: p.mkdir(), "the saved run config here as a file, but this is a folder"),
])
def test_an_owned_name_of_the_wrong_kind_is_refused_before_any_work(tmp_path, name, make, message):
    out = tmp_path / "run"
    out.mkdir()
    make(out / name)
    with pytest.raises(RunError, match=re.escape(f"{out / name}: restuning keeps {message}")):
        Toy(out)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunError, match="output_dir is a file, not a folder"):
        Toy(tmp_path / "run")


def _as_unprivileged(monkeypatch) -> None:
    """Root may write anywhere: answer os.access as the owner's mode bits would for anyone else."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        bits = os.stat(path).st_mode
        if mode & os.W_OK and not bits & stat.S_IWUSR:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("target", [".", "checkpoints", "metrics.jsonl"])
def test_a_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch, target):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=2)
    path = out / target
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    _as_unprivileged(monkeypatch)
    try:
        with pytest.raises(RunError, match=re.escape(str(path)) + ": .*not writable; make it writable"):
            Toy(out)
    finally:
        path.chmod(mode)


def test_folders_and_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        Toy(out).run()
    finally:
        os.umask(previous)
    for folder in (out, out / "checkpoints", out / "checkpoints" / "step-00000008", out / "final"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in (out / "metrics.jsonl", out / "run_config.json", out / "final" / checkpoint.WEIGHTS_NAME,
                 out / "checkpoints" / "step-00000008" / "state.pt"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_what_a_kill_left_is_tidied_when_the_folder_is_opened(tmp_path):
    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=4)
    (out / "checkpoints" / ".step-00000006.tmp-0a1b2c3d").mkdir()
    (out / "checkpoints" / ".step-00000002.trash-0a1b2c3d").mkdir()
    (out / ".final.new-0a1b2c3d").mkdir()
    (out / ".metrics.jsonl.0a1b2c3d.tmp").write_text("")
    (out / "run.lock").write_text("12345\n")
    RunDirectory(out).release()
    assert leftovers(out) == []
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]


def test_a_checkpoint_whose_shapes_do_not_fit_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    from restuning import CheckpointError

    out = tmp_path / "run"
    Toy(out).run(stop_after_batches=3)
    folder = max((out / "checkpoints").iterdir())
    tensors = load_file(str(folder / "trainable.safetensors"))
    tensors["weight"] = torch.zeros(2, 3)  # the model's is (1, 3)
    save_file(tensors, str(folder / "trainable.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor shapes do not fit.*weight: saved \(2, 3\), expected \(1, 3\)"):
        Toy(out).run()  # was: a raw RuntimeError from copy_


def test_options_added_to_an_empty_mapping_differ_in_those_keys_alone():
    from restuning.train.rundir import MISSING, config_differences

    saved = {"method": {"name": "restuning", "config": {}}}
    assert config_differences(saved, {"method": {"name": "restuning", "config": {"dim": 4}}}) == {
        "method.config.dim": (MISSING, 4)}  # was also "method.config": ({}, MISSING), which no flag could allow
