"""The frontier's results in one place: merge benchmarks/frontier.py's JSON files (a later file's row for the
same task and method replaces an earlier one), fill each row's memory ratio from benchmarks/memory.py's JSON
files and its step-time ratio from benchmarks/step_time.py --frontier's, print the table, and plot accuracy
against ViT-B/16 training memory, one panel per task.

    python benchmarks/frontier_report.py docs/frontier_tweets.json docs/frontier_mnist.json ... \\
        --memory-json docs/memory.json \\
        docs/memory_frontier_variants.json --step-time-json docs/step_time_frontier.json \\
        --json docs/frontier.json --plot docs/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _report import write_json  # noqa: E402
from frontier import METHODS, TASKS, print_rows  # noqa: E402

DIVERGED_STD = 10.0  # points: a row whose seeds spread more than this had a seed diverge
MEMORY_EFFICIENT = ("side_tuning", "lst", "dtl", "dtl_plus")  # the baselines the bypass is measured against


def merge(paths: list[Path], memory: dict[str, float], steps: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            rows[(row["task"], row["method"])] = {**row, "source": str(path)}
    for key, row in rows.items():
        if row.get("memory_row") is None and row["method"] in METHODS:  # rows written before the row had one
            row["memory_row"] = METHODS[row["method"]][3]
        if row.get("memory_row") in memory:
            row["memory_ratio_to_full"] = memory[row["memory_row"]]
        if key in steps:
            row["step_time_ratio_to_full"] = steps[key]
    order = list(TASKS)
    return sorted(rows.values(), key=lambda r: (order.index(r["task"]) if r["task"] in order else len(order),
                                                r["method"]))


def markdown(rows: list[dict[str, Any]], task: str) -> str:
    """The task's rows as the Markdown table docs/results.md shows."""
    lines = ["| method | acc % (1000, 3 seeds) | acc % (16-shot, 3 seeds) | lr (chosen on validation) | "
             "validation acc by lr | trainable | ViT-B/16 peak / full | step / full | one forward, many tasks |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["task"] != task:
            continue
        if "error" in r:
            lines.append(f"| `{r['method']}` | not run: {r['error'][:90]} | | | | | | | |")
            continue
        by_lr = ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["validation_accuracy"].items())
        cells = [f"`{r['method']}`", f"{r['accuracy_mean']:.1f} +- {r['accuracy_std']:.1f}",
                 f"{r['accuracy_mean_16shot']:.1f} +- {r['accuracy_std_16shot']:.1f}"
                 if "accuracy_mean_16shot" in r else "-", f"{r['lr']:g}", by_lr, f"{r['trainable_params']:,d}",
                 f"{r['memory_ratio_to_full']:.3f}" if r.get("memory_ratio_to_full") else "-",
                 f"{r['step_time_ratio_to_full']:.3f}" if r.get("step_time_ratio_to_full") else "-",
                 "yes" if r["one_forward_serves_many_tasks"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    tasks = [t for t in TASKS if any(r["task"] == t and "error" not in r for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in rows:
            if r["task"] != task or "error" in r or not r.get("memory_ratio_to_full"):
                continue
            if r["accuracy_std"] > DIVERGED_STD:  # a diverged seed: the table has it, the plot would lose its scale
                print(f"not plotted: {task} {r['method']} ({r['accuracy_mean']:.1f} +- {r['accuracy_std']:.1f})")
                continue
            colour = "tab:red" if r["method"].startswith("bypass") else (
                "tab:blue" if r["method"] in MEMORY_EFFICIENT else "tab:grey")
            x, y = r["memory_ratio_to_full"], r["accuracy_mean"]
            ax.errorbar(x, y, yerr=r["accuracy_std"], fmt="o", color=colour, capsize=3)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"{task} (1,000 examples, 3 seeds)")
        ax.set_xlabel("ViT-B/16 training peak / full fine-tuning's")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="benchmarks/frontier.py JSON files, in order")
    parser.add_argument("--memory-json", nargs="*", type=Path, default=[],
                        help="benchmarks/memory.py JSON files: each row's ratio_to_full (later files win)")
    parser.add_argument("--step-time-json", nargs="*", type=Path, default=[],
                        help="benchmarks/step_time.py --frontier JSON files: each row's ratio_to_full")
    parser.add_argument("--json", type=Path, help="write the merged rows here")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--markdown", action="store_true", help="also print each task's table in Markdown")
    args = parser.parse_args()
    memory: dict[str, float] = {}
    for path in args.memory_json:
        memory.update({k: v["ratio_to_full"] for k, v in json.loads(path.read_text())["methods"].items()})
    steps: dict[tuple[str, str], float] = {}
    for path in args.step_time_json:  # the step as the trainer takes it: from the cache where the method can
        timed = [r for r in json.loads(path.read_text())["rows"] if r["dtype"] == "float32"]
        for r in sorted(timed, key=lambda r: r["cached"]):
            steps[(r["task"], r["method"])] = r["ratio_to_full"]
    rows = merge([p for p in args.inputs if p != args.json], memory, steps)
    print_rows(rows)
    write_json(args.json, {"meta": {"merged_from": [str(p) for p in args.inputs if p != args.json]}, "rows": rows})
    if args.plot:
        plot(rows, args.plot)
    if args.markdown:
        for task in dict.fromkeys(r["task"] for r in rows):
            print(f"\n**{task}**\n\n{markdown(rows, task)}")


if __name__ == "__main__":
    main()
