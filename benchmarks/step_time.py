"""Time per training step of every method of benchmarks/compare.py, measured so that methods compare:
all of them interleaved in one process (one step of each in turn, then again), process CPU time per
step (not wall time on a shared machine), medians over repeats, each as a ratio to full fine-tuning's
step in the same run.

Tasks as compare.py: all-MiniLM-L6-v2 on tweets (32 tokens) and DINOv2-small on MNIST (56 px), batch 32,
real examples. A step is forward, cross-entropy, backward and the training loop's AdamW step. The
memory-efficient methods (`reads_frozen_backbone`) step from cached features, as the trainer trains them,
and again as `method (no cache)` with the backbone run at every step. `--frontier` times
benchmarks/frontier.py's rows (a method and its options) on its three tasks instead. `--dtypes` adds rows
with the frozen backbone held in bfloat16 or int8 for the methods that take it (`backbone_dtype`).

    python benchmarks/step_time.py --json docs/step_time.json
    python benchmarks/step_time.py --frontier --json docs/step_time_frontier.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import machine, table, write_json
from compare import METHODS, TASKS
from frontier import METHODS as FRONTIER_METHODS
from frontier import TASKS as FRONTIER_TASKS
from frontier import row_method

from restuning.data.shipped import SHIPPED
from restuning.errors import RestuningError
from restuning.methods import build_classifier, get_method
from restuning.train.backbones import load_backbone
from restuning.train.optim import adamw

BATCH = 32


def _inputs(task: str, backbone, tasks: dict = TASKS) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One batch of real examples of `task`, encoded as its runs encode them, its labels and class count."""
    _, data = tasks[task]
    full = SHIPPED[data["name"]]()
    batch = full.subset(torch.arange(BATCH))
    inputs = backbone.encode(batch, data.get("image_size", 56), data.get("max_length", 32))
    return inputs, batch.labels, len(full.classes)


def _step(method: str, options: dict, backbone, inputs: dict, labels: torch.Tensor, classes: int, cached: bool
          ) -> tuple[Callable[[], None], int] | None:
    """A closure running one optimizer step of `method` (with `options`) on its own copy of the backbone;
    trainable params. None for `cached` where the model cannot train from a feature cache."""
    model = build_classifier(method, copy.deepcopy(backbone.model), classes, options)
    if cached and not getattr(model, "cacheable", True):
        return None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.05)
    if cached:
        with torch.no_grad():
            features = model.features(**inputs)
        mask = inputs.get("attention_mask")

        def forward() -> torch.Tensor:
            return model(features=features, attention_mask=mask)
    else:
        def forward() -> torch.Tensor:
            return model(**inputs)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward().float(), labels).backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--frontier", action="store_true", help="benchmarks/frontier.py's rows and tasks "
                        "(methods with their options) instead of compare.py's methods")
    parser.add_argument("--tasks", nargs="+", choices=list(FRONTIER_TASKS))
    parser.add_argument("--methods", nargs="+", choices=sorted({*METHODS, *FRONTIER_METHODS}))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all methods; medians reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    args = parser.parse_args()
    choices = ["full", *FRONTIER_METHODS] if args.frontier else list(METHODS)  # rows
    tasks = FRONTIER_TASKS if args.frontier else TASKS
    args.tasks = args.tasks or list(tasks)
    args.methods = args.methods or list(choices)

    rows = []
    for task in args.tasks:
        args.dtypes = ["float32", *[d for d in args.dtypes if d != "float32"]]  # full fine-tuning is the baseline
        backbones = {d: load_backbone(tasks[task][0], d) for d in args.dtypes}
        inputs, labels, classes = _inputs(task, backbones[args.dtypes[0]], tasks)
        cells: dict[tuple[str, str, bool], tuple[Callable[[], None], int]] = {}
        for row in ["full", *[m for m in args.methods if m != "full"]]:
            method, options = row_method(task, row) if args.frontier and row != "full" else (row, {})
            entry = get_method(method)
            for dtype in args.dtypes:
                if dtype != "float32" and not entry.low_precision:
                    continue
                for cached in ([True, False] if entry.reads_frozen_backbone else [False]):
                    try:
                        cell = _step(method, options, backbones[dtype], inputs, labels, classes, cached)
                    except (RestuningError, RuntimeError) as err:  # a side network on a CNN, say
                        print(f"{task} {row}: not run ({str(err)[:100]})")
                        continue
                    if cell is not None:
                        cells[(row, dtype, cached)] = cell
        times: dict[tuple[str, str, bool], list[float]] = {key: [] for key in cells}
        walls: dict[tuple[str, str, bool], list[float]] = {key: [] for key in cells}
        for round_ in range(args.warmup + args.repeats):  # interleaved: each round steps every method once
            for key, (step, _) in cells.items():
                cpu, wall = time.process_time(), time.perf_counter()
                step()
                if round_ >= args.warmup:
                    times[key].append(time.process_time() - cpu)
                    walls[key].append(time.perf_counter() - wall)
        full = statistics.median(times[("full", "float32", False)])
        for (method, dtype, cached), (_, trainable) in cells.items():
            cpu = statistics.median(times[(method, dtype, cached)])
            rows.append({"task": task, "method": method, "dtype": dtype, "cached": cached,
                         "row": method + ("" if cached or (method, dtype, True) not in cells
                                          else " (no cache)") + ("" if dtype == "float32" else f" @{dtype}"),
                         "trainable_params": trainable, "cpu_ms_median": 1000 * cpu,
                         "cpu_ms_all": [1000 * t for t in times[(method, dtype, cached)]],
                         "wall_ms_median": 1000 * statistics.median(walls[(method, dtype, cached)]),
                         "ratio_to_full": cpu / full})
        print(f"{task}: batch {BATCH}, {args.repeats} interleaved rounds, {torch.get_num_threads()} threads")
        table(("method", "trainable", "CPU ms / step", "wall ms", "step / full"), [
            (r["row"], f"{r['trainable_params']:,d}", f"{r['cpu_ms_median']:.1f}", f"{r['wall_ms_median']:.1f}",
             f"{r['ratio_to_full']:.3f}") for r in rows if r["task"] == task])
        del cells, backbones
        meta = {**machine(), "batch": BATCH, "repeats": args.repeats, "warmup": args.warmup,
                "threads": torch.get_num_threads(), "timing": "process CPU time per optimizer step, median of the "
                "interleaved rounds; ratio_to_full divides by full fine-tuning's median in the same run"}
        write_json(args.json, {"meta": meta, "rows": rows})  # after each task: what is done survives a stop


if __name__ == "__main__":
    main()
