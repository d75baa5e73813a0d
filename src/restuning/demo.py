"""`restuning demo`: the main job on embedded defaults, offline on the shipped assets.

MiniLM on tweet sentiment and DINOv2-small on MNIST, each with linear probing, Res-Tuning (Dual
Res-Adapters) and Res-Tuning-Bypass; one table of accuracy, trainable parameters, training peak
memory (the process peak of each run, which runs in a fresh process; the bypass's includes its
in-memory feature cache) and time. 1,000 training and 500 test examples per set, seed 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .train.config import DataConfig, MethodConfig, OptimConfig, TrainConfig
from .train.isolated import run_isolated

BACKBONES = {
    "all-MiniLM-L6-v2": DataConfig(name="tweets", train_size=1000, test_size=500, max_length=32),
    "dinov2-small": DataConfig(name="mnist", train_size=1000, test_size=500, image_size=56),
}
# method -> (learning rate, epochs per quick/full epoch unit). The bypass trains from cached features (an
# epoch costs well under a second), so it gets more epochs in less time; the table shows both.
METHODS = {"linear": (1e-2, 1), "restuning": (5e-3, 1), "bypass": (1e-2, 4)}
KEPT = ("train_examples", "trainable_params", "peak_memory_bytes", "seconds")


def demo_configs(output_dir: str | Path, quick: bool = False) -> list[TrainConfig]:
    """The demo's runs, in `output_dir` (the quick ones in `output_dir/quick`, since their configs differ)."""
    root = Path(output_dir) / "quick" if quick else Path(output_dir)
    configs = []
    for backbone, data in BACKBONES.items():
        if quick:
            data = dataclasses.replace(data, train_size=200, test_size=200)
        for method, (lr, per_unit) in METHODS.items():
            epochs = (2 if quick else 5) * per_unit
            optim = OptimConfig(lr=lr, epochs=epochs, warmup_epochs=0.1 * epochs, batch_size=32)
            configs.append(TrainConfig(backbone=backbone, method=MethodConfig(name=method), data=data, optim=optim,
                                       output_dir=str(root / f"{backbone}-{method}"),
                                       eval_every=epochs))  # evaluate once, at the end
    return configs


def run_demo(output_dir: str | Path = "runs/demo", quick: bool = False, json_path: str | Path | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run every (backbone, method) pair in its own process, each with a progress bar (optimizer steps, elapsed
    time and ETA; `progress=False`: one line per run instead); print the table; optionally write JSON."""
    rows = []
    configs = demo_configs(output_dir, quick)
    for i, config in enumerate(configs, 1):
        name = f"[{i}/{len(configs)}] {config.backbone} {config.method.name}"
        if progress:
            result = _with_bar(config, name)
        else:
            print(f"{name}: training ...", flush=True)
            result = run_isolated(config)
        rows.append({"backbone": config.backbone, "method": config.method.name, "accuracy": result["test_accuracy"],
                     "epochs": config.optim.epochs, **{k: result[k] for k in KEPT}})
    print()
    header = (f"{'backbone':<18} {'method':<10} {'accuracy':>8} {'trainable':>10} {'peak MiB':>9} {'epochs':>6} "
              f"{'seconds':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backbone']:<18} {r['method']:<10} {r['accuracy']:>8.3f} {r['trainable_params']:>10,d} "
              f"{r['peak_memory_bytes'] / 2**20:>9,.0f} {r['epochs']:>6} {_seconds(r['seconds']):>8}")
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows}, indent=2))
        print(f"wrote {path}")
    return rows


def _with_bar(config: TrainConfig, name: str) -> dict[str, Any]:
    """`run_isolated(config)` under a tqdm bar of its optimizer steps (`loading` until the run knows how many)."""
    with tqdm(desc=name, total=None, unit="step", dynamic_ncols=True, postfix="loading") as bar:
        def update(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:  # the run has loaded (the clock keeps its loading time)
                bar.total = total
                bar.set_postfix_str(f"{config.optim.epochs} epochs", refresh=False)
            if done > bar.n:
                bar.update(done - bar.n)
            else:  # between steps (loading, caching features, evaluating): redraw, so the elapsed time goes on
                bar.refresh()

        result = run_isolated(config, progress=update)
        if result.get("reused"):
            bar.set_postfix_str("reused: finished before")
    return result


def _seconds(value: float | None) -> str:
    return "reused" if value is None else f"{value:.1f}"  # None: a run finished earlier, not trained again
