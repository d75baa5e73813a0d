"""Accuracy with a low-precision frozen backbone (`backbone_dtype`: bfloat16, int8 weight-only) against
float32, on the shipped tasks in the protocol of benchmarks/results.py (1,000 training examples, its
learning rates and epochs, 500 held-out test examples), over seeds.

Each (task, method, seed) trains once per dtype with everything else equal, so the difference to float32
is paired by seed. Prints mean +- std per dtype and the paired differences; writes every run with its
method, dtype and accuracy.

    python benchmarks/precision.py --json docs/precision.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from _report import machine, table, write_json
from results import TASKS, config_for

from restuning.train.trainer import Trainer

DTYPES = ("float32", "bfloat16", "int8")
METHODS = ("bypass", "linear", "restuning")
GOAL_POINTS = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="1000", help="train set: 1000, or k shots per class")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/precision"))
    args = parser.parse_args()

    runs: list[dict] = []
    for task in args.tasks:
        for method in args.methods:
            for seed in args.seeds:
                for dtype in args.dtypes:  # interleaved: the dtypes of one seed run one after another
                    config = config_for(task, method, args.size, seed, args.runs_dir / dtype)
                    config = replace(config, backbone_dtype=dtype)
                    start = time.process_time()
                    result = Trainer(config, progress=False).run()
                    runs.append({"task": task, "method": method, "dtype": dtype, "seed": seed, "size": args.size,
                                 "cpu_seconds": time.process_time() - start, **result, "config": config.to_dict()})
                    print(f"{task} {method} {dtype} seed {seed}: {result['test_accuracy']:.3f}", flush=True)
                    write_json(args.json, {"meta": machine(), "runs": runs})  # partial results survive a stop
    rows = summarize(runs)
    write_json(args.json, {"meta": {**machine(), "goal_points": GOAL_POINTS}, "rows": rows, "runs": runs})


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, method, dtype): accuracy mean and std over seeds, and the difference to float32 paired by seed."""
    by = {}
    for r in runs:
        by.setdefault((r["task"], r["method"], r["dtype"]), {})[r["seed"]] = 100 * r["test_accuracy"]
    rows = []
    for (task, method, dtype), acc in by.items():
        base = by.get((task, method, "float32"), {})
        diffs = [acc[s] - base[s] for s in acc if s in base]
        values = list(acc.values())
        rows.append({
            "task": task, "method": method, "dtype": dtype, "seeds": sorted(acc),
            "accuracy_mean": statistics.mean(values),
            "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "diff_to_float32_mean": statistics.mean(diffs) if diffs else None,
            "diff_to_float32_max_abs": max(abs(d) for d in diffs) if diffs else None,
            "within_goal": None if not diffs else abs(statistics.mean(diffs)) <= GOAL_POINTS,
        })
    table(("task", "method", "dtype", "test acc %", "diff to fp32 (paired mean)", "max |diff|", "seeds"), [
        (r["task"], r["method"], r["dtype"], f"{r['accuracy_mean']:.1f} +- {r['accuracy_std']:.1f}",
         "-" if r["diff_to_float32_mean"] is None else f"{r['diff_to_float32_mean']:+.2f}",
         "-" if r["diff_to_float32_max_abs"] is None else f"{r['diff_to_float32_max_abs']:.1f}", len(r["seeds"]))
        for r in rows])
    return rows


if __name__ == "__main__":
    main()
