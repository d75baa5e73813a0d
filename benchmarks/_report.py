"""Shared by the benchmarks: the machine description, a plain-text table, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            # glibc's allocator settings change what a CPU process's resident peak counts (docs/precision.md)
            "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, path)  # a run killed while writing leaves the previous file whole
    print(f"wrote {path}")


def seconds(fn: Callable[[], Any], repeats: int, warmup: bool = True, sync: Callable[[], None] = lambda: None
            ) -> list[float]:
    """Wall-clock seconds of `fn()` over `repeats` runs, after one untimed warm-up run if `warmup`."""
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def keep_freed_memory(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every frozen backbone in it keeping its forwards' freed host memory (glibc's own behaviour,
    `FrozenBackbone.release_host_memory = False`): the `*_keep_freed` rows of the memory benchmarks."""
    from restuning.bypass.model import FrozenBackbone

    for module in model.modules():
        if isinstance(module, FrozenBackbone):
            module.release_host_memory = False
    return model
