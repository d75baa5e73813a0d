"""`restuning plot`: accuracy against trainable parameters and against training memory (paper Fig. 4)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .loop import METRICS  # noqa: E402


def last_record(run: Path) -> dict:
    lines = (run / METRICS).read_text().splitlines() if (run / METRICS).is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    if not records or "trainable_params" not in records[-1]:
        raise FileNotFoundError(f"{run}: no finished run here (expected a final record in {METRICS})")
    return records[-1]


def plot_runs(runs: list[Path], out: Path, metric: str = "test_accuracy") -> Path:
    """One point per run, labelled by method; two panels. Written to `out` (PNG)."""
    records = [(run, last_record(run)) for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters"),
                           (axes[1], "peak_memory_bytes", "process peak memory, RSS (MiB)")):
        for run, r in records:
            x = r[key] / 2**20 if key == "peak_memory_bytes" else r[key]
            ax.scatter(x, 100 * r[metric], s=40)
            ax.annotate(r.get("method", run.name), (x, 100 * r[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
