"""Every method the paper compares, trained in the same harness on the same data, seed and machine
(paper Table 3c and Table 4): accuracy, trainable parameters, training peak memory and time per step.

Tasks: all-MiniLM-L6-v2 on tweet sentiment (32 tokens) and DINOv2-small on MNIST (56 px), each with a
1,000-example training set and a 16-shot one, tested on 500 held-out examples; seed 0. Each run is
`restuning.train` in its own process, so its peak memory (the process's resident peak) is its own.
Methods that never back-propagate into the backbone (Bypass, Side-Tuning, LST) train from the feature
cache, so their `step_seconds` is the side network's alone; their `seconds` include building the cache.

    python benchmarks/compare.py --json docs/compare.json            # the full table (about 1 hour, 2 cores)
    python benchmarks/compare.py --quick --json /tmp/compare.json    # every method, smaller runs (< 10 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _report import machine, table, write_json

from restuning.train.config import DataConfig, MethodConfig, OptimConfig, TrainConfig
from restuning.train.isolated import run_isolated

TASKS = {
    "tweets/minilm": ("all-MiniLM-L6-v2", dict(name="tweets", test_size=500, max_length=32)),
    "mnist/dinov2": ("dinov2-small", dict(name="mnist", test_size=500, image_size=56)),
}
# (group, learning rate): one rate per method for every task, chosen once, not tuned per task.
METHODS = {
    "full": ("baseline", 5e-5),
    "linear": ("baseline", 1e-2),
    "adapter": ("parameter", 5e-3),
    "prefix": ("parameter", 5e-3),
    "vpt_shallow": ("parameter", 1e-2),
    "vpt_deep": ("parameter", 5e-3),
    "lora": ("parameter", 5e-3),
    "peft_lora": ("parameter", 5e-3),
    "bitfit": ("parameter", 5e-3),
    "ssf": ("parameter", 5e-3),
    "adaptformer": ("parameter", 5e-3),
    "mam": ("parameter", 5e-3),
    "restuning": ("parameter", 5e-3),
    "side_tuning": ("memory", 3e-3),
    "lst": ("memory", 3e-3),
    "bypass": ("memory", 1e-2),
}
SIZES = ("1000", "16-shot")


def config_for(task: str, method: str, size: str, root: Path, quick: bool, cache: bool = True) -> TrainConfig:
    backbone, data = TASKS[task]
    if size == "1000":
        data = dict(data, train_size=200 if quick else 1000)
        epochs = 4 if quick else 5
    else:
        data = dict(data, shots=16)
        n_train = 16 * (2 if task.startswith("tweets") else 10)
        epochs = 3 if quick else max(5, min(25, 2000 // n_train))  # about 2,000 examples seen
    if quick:
        data["test_size"] = 200
    if METHODS[method][0] == "memory":
        epochs *= 2  # epochs from the feature cache cost little; the table shows seconds beside accuracy
    optim = OptimConfig(lr=METHODS[method][1], epochs=epochs, warmup_epochs=0.1 * epochs, batch_size=32)
    name = f"{method}-{size}" + ("" if cache else "-nocache")
    return TrainConfig(backbone=backbone, method=MethodConfig(name=method), data=DataConfig(**data), optim=optim,
                       seed=0, output_dir=str(root / task.replace("/", "-") / name), eval_every=epochs,
                       feature_cache=cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="200 training examples, 4 epochs, 200 tested")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default: both; --quick: 1000 only")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's own choice)")
    parser.add_argument("--no-cache", action="store_true",
                        help="run the backbone at every step instead of training from the feature cache")
    parser.add_argument("--summarize", type=Path, nargs="+",
                        help="only print the table of the runs in these JSON files (a later file's run replaces an "
                             "earlier one of the same method, task, train set and cache setting); --json writes them")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    if args.summarize:
        merged = {}
        for path in args.summarize:
            for r in json.loads(path.read_text())["rows"]:
                merged[(r["method"], r["task"], r["train_set"], r.get("feature_cache", True))] = r
        rows = list(merged.values())
        add_ratios(rows)
        write_json(args.json, {"meta": {**machine(), "merged_from": [str(p) for p in args.summarize]}, "rows": rows})
        print_table(rows)
        write_markdown(rows, args.markdown)
        return
    sizes = args.sizes or (["1000"] if args.quick else list(SIZES))

    rows, began = [], time.perf_counter()
    for task in args.tasks:
        for size in sizes:
            for method in args.methods:
                config = config_for(task, method, size, args.runs_dir, args.quick, cache=not args.no_cache)
                shutil.rmtree(config.output_dir, ignore_errors=True)  # a fresh run, not a resumed one
                r = run_isolated(config, args.threads)
                rows.append({
                    "method": method, "group": METHODS[method][0], "task": task,
                    "train_set": "200" if args.quick and size == "1000" else size,
                    "accuracy": r["test_accuracy"], "trainable_params": r["trainable_params"],
                    "trainable_percent": 100 * r["trainable_params"] / r["backbone_params"],
                    "peak_memory_bytes": r["peak_memory_bytes"], "step_seconds": r["step_seconds"],
                    "seconds": r["seconds"], "epochs": config.optim.epochs, "train_examples": r["train_examples"],
                    "lr": config.optim.lr, "feature_cache": config.feature_cache,
                })
                print(f"{task} {size} {method}: accuracy {r['test_accuracy']:.3f}, "
                      f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB, {r['seconds']:.0f} s", flush=True)
                write_json(args.json, report(rows, args))  # partial results survive a stop
    add_ratios(rows)
    print(f"\n{len(rows)} runs in {time.perf_counter() - began:.0f} s\n")
    print_table(rows)
    write_json(args.json, report(rows, args))
    write_markdown(rows, args.markdown)


def add_ratios(rows: list[dict]) -> None:
    """`memory_ratio_to_full` and `step_ratio_to_full`: against full fine-tuning on the same task and set."""
    full = {(r["task"], r["train_set"]): r for r in rows if r["method"] == "full"}  # one full run per cell
    for r in rows:
        ref = full.get((r["task"], r["train_set"]))
        r["memory_ratio_to_full"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"] if ref else None
        r["step_ratio_to_full"] = r["step_seconds"] / ref["step_seconds"] if ref else None


def report(rows: list[dict], args: argparse.Namespace) -> dict:
    return {"meta": {**machine(), "quick": args.quick, "seed": 0, "threads": args.threads}, "rows": rows}


def _cells(rows: list[dict]):
    for task in dict.fromkeys(r["task"] for r in rows):
        for size in dict.fromkeys(r["train_set"] for r in rows):
            cell = [r for r in rows if r["task"] == task and r["train_set"] == size]
            if cell:
                yield task, size, cell


def label(r: dict) -> str:
    """The method, marked where a backbone-detached method ran its backbone at every step."""
    cached = r.get("feature_cache", True) or r["group"] != "memory"
    return r["method"] if cached else f"{r['method']} (no cache)"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_markdown(rows: list[dict], path: Path | None) -> None:
    """One Markdown table per task: accuracy on every training set; memory and time on the first."""
    if path is None:
        return
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sizes = list(dict.fromkeys(r["train_set"] for r in rows if r["task"] == task))
        head = ["method", "group", "trainable (% of backbone)", *(f"acc % ({s})" for s in sizes),
                f"peak MiB ({sizes[0]})", "mem / full", "ms / step", "step / full"]
        lines += [f"**{task}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(label(r) for r in rows if r["task"] == task):
            by_size = {r["train_set"]: r for r in rows if r["task"] == task and label(r) == method}
            first = by_size.get(sizes[0]) or next(iter(by_size.values()))
            params = f"{first['trainable_params']:,d} ({first['trainable_percent']:.2f}%)"
            line = [f"`{method}`", first["group"], params,
                    *(f"{100 * by_size[s]['accuracy']:.1f}" if s in by_size else "-" for s in sizes),
                    f"{first['peak_memory_bytes'] / 2**20:,.0f}", _ratio(first["memory_ratio_to_full"]),
                    f"{1000 * first['step_seconds']:.0f}", _ratio(first["step_ratio_to_full"])]
            lines.append("| " + " | ".join(line) + " |")
        lines.append("")
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def print_table(rows: list[dict]) -> None:
    for task, size, cell in _cells(rows):
        print(f"{task}, train set {size}")
        body = [[label(r), r["group"], f"{100 * r['accuracy']:.1f}",
                 f"{r['trainable_params'] / 1e6:.3f} ({r['trainable_percent']:.2f}%)",
                 f"{r['peak_memory_bytes'] / 2**20:,.0f}",
                 "-" if r["memory_ratio_to_full"] is None else f"{r['memory_ratio_to_full']:.2f}",
                 f"{1000 * r['step_seconds']:.1f}"] for r in cell]
        table(["method", "group", "acc %", "params M (%)", "peak MiB", "mem / full", "ms / step"], body)
        print()

if __name__ == "__main__":
    main()
