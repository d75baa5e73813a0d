"""Real results on the shipped assets: few-shot (k = 1, 2, 4, 8, 16 per class) and 1,000 training
examples, for linear probing, full fine-tuning, Res-Tuning and Res-Tuning-Bypass, over seeds.

Tasks: all-MiniLM-L6-v2 on tweet sentiment (positive/negative), DINOv2-small on MNIST at 56 px
(also evaluated on scikit-learn's digits: domain generalisation in the manner of paper Table 5).
Each run is `restuning.train` with the config printed in the JSON; the test split is 500 held-out
examples. Prints mean +- std per cell and writes every run.

    python benchmarks/results.py --json docs/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _report import machine, table, write_json

from restuning.methods import get_method
from restuning.train.config import DataConfig, MethodConfig, OptimConfig, TrainConfig
from restuning.train.trainer import Trainer

TASKS = {
    "tweets/minilm": ("all-MiniLM-L6-v2", dict(name="tweets", test_size=500, max_length=32)),
    "mnist/dinov2": ("dinov2-small", dict(name="mnist", test_size=500, image_size=56, eval_sets=["digits"])),
}
LR = {"linear": 1e-2, "full": 5e-5, "restuning": 5e-3, "bypass": 1e-2}


def config_for(task: str, method: str, size: str, seed: int, root: Path) -> TrainConfig:
    backbone, data = TASKS[task]
    data = dict(data, **({"shots": int(size)} if size != "1000" else {"train_size": 1000}))
    n_train = 1000 if size == "1000" else int(size) * (2 if task.startswith("tweets") else 10)
    epochs = max(5, min(50, 4000 // n_train))  # about the same number of examples seen per run
    if get_method(method).reads_frozen_backbone:
        epochs *= 2  # trains from the feature cache
    optim = OptimConfig(lr=LR[method], epochs=epochs, warmup_epochs=0.1 * epochs, batch_size=32)
    return TrainConfig(backbone=backbone, method=MethodConfig(name=method), data=DataConfig(**data), optim=optim,
                       seed=seed, output_dir=str(root / task.replace("/", "-") / f"{method}-{size}-{seed}"),
                       eval_every=epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--sizes", nargs="+", default=["1", "2", "4", "8", "16", "1000"])
    parser.add_argument("--methods", nargs="+", default=list(LR), choices=list(LR))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/results"))
    parser.add_argument("--summarize", type=Path, help="only print the table of the runs in this JSON")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    if args.summarize:
        summarize(json.loads(args.summarize.read_text())["runs"], args.markdown)
        return

    runs = []
    for task in args.tasks:
        for size in args.sizes:
            for method in args.methods:
                for seed in args.seeds:
                    config = config_for(task, method, size, seed, args.runs_dir)
                    start = time.perf_counter()
                    result = Trainer(config, progress=False).run()
                    runs.append({"task": task, "size": size, "method": method, "seed": seed,
                                 "seconds": time.perf_counter() - start, **result, "config": config.to_dict()})
                    print(f"{task} {method} {size} seed {seed}: {result['test_accuracy']:.3f}", flush=True)
                    write_json(args.json, {"meta": machine(), "runs": runs})  # partial results survive a stop
    summarize(runs, args.markdown)


def summarize(runs: list[dict], markdown: Path | None = None) -> None:
    """Mean +- std over seeds per (task, train set, method)."""
    cells = {}
    for r in runs:
        cells.setdefault((r["task"], r["size"], r["method"]), []).append(r)
    rows = []
    for (task, size, method), rs in cells.items():
        acc = [100 * r["test_accuracy"] for r in rs]
        digits = [100 * r["digits_accuracy"] for r in rs if "digits_accuracy" in r]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows.append((task, size, method, f"{statistics.mean(acc):.1f} +- {spread:.1f}",
                     f"{statistics.mean(digits):.1f}" if digits else "-", rs[0]["trainable_params"], len(rs)))
    header = ("task", "train", "method", "test acc %", "digits acc %", "trainable", "seeds")
    table(header, rows)
    if markdown is not None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
