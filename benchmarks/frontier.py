"""The memory-efficient frontier, measured fairly: every method (the memory-efficient baselines, the bypass and
its variants, Res-Tuning and linear probing as references) in one protocol.

For each task and method: the learning rate is chosen from the method's grid on a VTAB-1k-style validation
split (train on 800 of the 1,000 training examples, validate on the other 200; seed 0), then the method is
retrained on all 1,000 with that rate over `--seeds` and tested on the held-out test set; the 16-shot setting
reuses the chosen rate. Nothing is tuned on the test split. Each run is `restuning.train` in its own process
(`run_isolated`). Memory comes from benchmarks/memory.py's ViT-B/16 configuration (batch 32, 224 px):
`--memory-json` reads its rows (`memory_ratio_to_full`). Step times, interleaved in one process, come from
`benchmarks/step_time.py --frontier`; benchmarks/frontier_report.py merges this script's JSON files with both
and draws the plot.

Tasks: all-MiniLM-L6-v2 on tweets, DINOv2-small on MNIST, EfficientNet-Lite0 on MNIST (a CNN: the side
networks and DTL read tokens and refuse it; their rows say so).

    python benchmarks/frontier.py --json docs/frontier.json --memory-json docs/memory.json
    python benchmarks/frontier.py --quick --json /tmp/frontier.json     # under 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _report import machine, table, write_json
from compare import TASKS as COMPARE_TASKS

from restuning.errors import RestuningError
from restuning.methods import get_method
from restuning.train.config import DataConfig, MethodConfig, OptimConfig, TrainConfig
from restuning.train.isolated import run_isolated

TASKS = {**COMPARE_TASKS,  # compare.py's two tasks and a CNN
         "mnist/efficientnet": ("efficientnet-lite0", dict(name="mnist", test_size=500, image_size=56))}
MEMORY_GRID, PARAMETER_GRID = (3e-3, 1e-2, 3e-2), (1e-3, 5e-3)
# Row -> (registered method, its options, learning-rate grid, the benchmarks/memory.py row it is measured by).
METHODS: dict[str, tuple[str, dict[str, Any], tuple[float, ...], str | None]] = {
    "linear": ("linear", {}, (3e-3, 1e-2, 3e-2), "linear"),
    "restuning": ("restuning", {}, PARAMETER_GRID, "restuning"),
    "side_tuning": ("side_tuning", {}, (1e-3, 3e-3, 1e-2), "side_tuning"),
    "lst": ("lst", {}, (1e-3, 3e-3, 1e-2), "lst"),
    "dtl": ("dtl", {}, (5e-4, 2e-3, 5e-3), "dtl"),
    "dtl_plus": ("dtl_plus", {}, (5e-4, 2e-3, 5e-3), "dtl_plus"),
    "bypass": ("bypass", {}, MEMORY_GRID, "bypass"),
    "bypass_none": ("bypass", {"horizontal": None, "vertical": None}, MEMORY_GRID, None),
    "bypass_horizontal": ("bypass", {"vertical": None}, MEMORY_GRID, None),
    "bypass_vertical": ("bypass", {"horizontal": None}, MEMORY_GRID, None),
    "bypass_softmax": ("bypass", {"combine": "softmax", "vertical": None}, MEMORY_GRID, "bypass_softmax"),
    "bypass_mean": ("bypass", {"pooling": "mean"}, MEMORY_GRID, "bypass_all_tokens"),
    "bypass_attention_pool": ("bypass", {"pooling": "attention"}, MEMORY_GRID, "bypass_attention_pool"),
    "bypass_reinject": ("bypass", {"reinject": 2}, MEMORY_GRID, "bypass_reinject_2"),
    "bypass_attention_reinject": ("bypass", {"pooling": "attention", "reinject": 2}, MEMORY_GRID,
                                  "bypass_attention_reinject_2"),
    "bypass_token_mixer": ("bypass", {"horizontal": "res_token_mixer"}, MEMORY_GRID, "bypass_token_mixer"),
    "bypass_prefix": ("bypass", {"horizontal": "res_prefix"}, MEMORY_GRID, None),
    "bypass_prompt_v": ("bypass", {"vertical": "res_prompt"}, MEMORY_GRID, None),
}
# Options a task needs beside its row's: Res-Tuning on a CNN tunes whole blocks (paper Table 16).
TASK_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist/efficientnet", "restuning"): {"mha": None, "ffn": None, "block": "res_adapter"},
}
QUICK_METHODS = ("linear", "lst", "dtl", "bypass", "bypass_softmax")


def row_method(task: str, row: str) -> tuple[str, dict[str, Any]]:
    """The registered method of `row` and its options on `task`."""
    method, options, _, _ = METHODS[row]
    return method, {**options, **TASK_OPTIONS.get((task, row), {})}


def config_for(task: str, row: str, lr: float, seed: int, size: str, validation: bool, root: Path,
               quick: bool) -> TrainConfig:
    backbone, data = TASKS[task]
    method, options = row_method(task, row)
    n = 200 if quick else 1000
    data = dict(data, **({"shots": 16} if size == "16-shot" else {"train_size": n}), validation=validation)
    if quick:
        data["test_size"] = 200
    n_train = n if size != "16-shot" else 16 * (2 if task.startswith("tweets") else 10)
    epochs = (3 if quick else max(5, min(25, 4000 // n_train)))
    if get_method(method).reads_frozen_backbone:
        epochs *= 2  # epochs from the feature cache cost little
    optim = OptimConfig(lr=lr, epochs=epochs, warmup_epochs=0.1 * epochs, batch_size=32)
    name = f"{row}-{size}-lr{lr:g}-s{seed}" + ("-val" if validation else "")
    return TrainConfig(backbone=backbone, method=MethodConfig(name=method, config=options), data=DataConfig(**data),
                       optim=optim, seed=seed, output_dir=str(root / task.replace("/", "-") / name),
                       eval_every=epochs)


def run(config: TrainConfig, threads: int | None) -> dict[str, Any]:
    shutil.rmtree(config.output_dir, ignore_errors=True)
    return run_isolated(config, threads)


def measure(task: str, row: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the rate chosen on the validation split, then the seeds on the test split (1000 and 16-shot)."""
    _, _, grid, memory_row = METHODS[row]
    method, options = row_method(task, row)
    grid = grid[:2] if args.quick else grid
    validation = {}
    for lr in grid:
        r = run(config_for(task, row, lr, 0, "1000", True, args.runs_dir, args.quick), args.threads)
        validation[lr] = r["test_accuracy"]  # the validation split's accuracy (data.validation)
    lr = max(grid, key=lambda x: (validation[x], -x))  # ties: the smaller rate
    result: dict[str, Any] = {"method": row, "registered_method": method, "options": options, "task": task,
                              "lr": lr, "validation_accuracy": {f"{k:g}": v for k, v in validation.items()}}
    for size in (["1000"] if args.quick else ["1000", "16-shot"]):
        accs, last = [], {}
        for seed in args.seeds:
            last = run(config_for(task, row, lr, seed, size, False, args.runs_dir, args.quick), args.threads)
            accs.append(100 * last["test_accuracy"])
        key = "" if size == "1000" else "_16shot"
        result[f"accuracy_mean{key}"] = statistics.mean(accs)
        result[f"accuracy_std{key}"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        result[f"accuracies{key}"] = accs
        result["trainable_params"] = last["trainable_params"]
    result["memory_row"] = memory_row
    result["memory_ratio_to_full"] = args.memory.get(memory_row) if memory_row else None
    result["one_forward_serves_many_tasks"] = get_method(method).serves_many(options)
    return result


def print_rows(rows: list[dict[str, Any]]) -> None:
    table(("task", "method", "acc % (1000)", "acc % (16-shot)", "lr", "trainable", "mem / full", "step / full",
           "one forward"), [
        (r["task"], r["method"], f"{r['accuracy_mean']:.1f} +- {r['accuracy_std']:.1f}",
         f"{r['accuracy_mean_16shot']:.1f} +- {r['accuracy_std_16shot']:.1f}" if "accuracy_mean_16shot" in r else "-",
         f"{r['lr']:g}", f"{r['trainable_params']:,d}",
         f"{r['memory_ratio_to_full']:.3f}" if r.get("memory_ratio_to_full") else "-",
         f"{r['step_time_ratio_to_full']:.3f}" if r.get("step_time_ratio_to_full") else "-",
         "yes" if r["one_forward_serves_many_tasks"] else "no")
        if "error" not in r else (r["task"], r["method"], "not run", *["-"] * 6) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help=f"200 examples (160/40 to validate), 3 epochs, two "
                        f"rates, one seed, 1000-example setting only; tweets; methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--memory-json", type=Path, help="benchmarks/memory.py's JSON: its ratio_to_full per row")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    args.tasks = args.tasks or (["tweets/minilm"] if args.quick else list(TASKS))
    args.methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.memory = {}
    if args.memory_json:
        rows = json.loads(args.memory_json.read_text())["methods"]
        args.memory = {name: r["ratio_to_full"] for name, r in rows.items()}

    began, rows = time.perf_counter(), []
    for task in args.tasks:
        for row in args.methods:
            try:
                rows.append(measure(task, row, args))
            except (RestuningError, RuntimeError) as err:  # e.g. a side network on a CNN: the row says why
                rows.append({"method": row, "task": task, "error": str(err)})
            r = rows[-1]
            print(f"{task} {row}: " + (f"{r['accuracy_mean']:.1f} +- {r['accuracy_std']:.1f} at lr {r['lr']:g}"
                                       if "error" not in r else f"not run: {r['error'][:120]}"), flush=True)
            write_json(args.json, {"meta": machine(), "rows": rows})  # partial results survive a stop
    seconds = time.perf_counter() - began
    print_rows(rows)
    print(f"{len(rows)} rows in {seconds:.0f} s")
    write_json(args.json, {"meta": {**machine(), "seconds": seconds, "quick": args.quick, "seeds": args.seeds,
                                    "protocol": "lr chosen on train 800 / validation 200 (seed 0), then retrained on "
                                                "1000 over the seeds and tested; 16-shot reuses the rate"},
                           "rows": rows})


if __name__ == "__main__":
    main()
