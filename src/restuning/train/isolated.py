"""Run one training config in a fresh process, so that its peak memory is its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from .config import TrainConfig


def _run(config: TrainConfig, threads: int | None, queue, report: bool = False) -> None:
    import torch

    from .trainer import Trainer

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        trainer = Trainer(config, progress=False)
        if report:
            trainer.on_step = lambda steps, total: queue.put({"progress": (steps, total)})
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        backbone = trainer.backbone_params
        reused = trainer.run_dir.finished  # trained before: its record (with its own peak) is returned as it is
        result = trainer.run()
        measured = {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "seconds": time.perf_counter() - start}
        queue.put({**result, "trainable_params": trainable, "backbone_params": backbone,
                   "train_examples": len(trainer.data.train), "reused": reused,
                   **({"seconds": None} if reused else measured)})
    except BaseException as error:  # noqa: BLE001  (reported to the parent, which raises it)
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise


def run_isolated(config: TrainConfig, threads: int | None = None,
                 progress: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """`Trainer(config).run()` in a spawned process (with `threads` torch threads, if given).

    `progress`, if given, is called in this process with (optimizer steps done, steps in all) at every step of
    the run (`TrainingLoop.on_step`), and again about every second in between, so that a display of the
    elapsed time goes on while the run loads, caches features or evaluates; steps in all is None until the
    run has loaded.

    Returns its final record plus `trainable_params`, `backbone_params`, `train_examples`, `reused` (the run
    had finished before: its record's peak is the original run's, and `seconds` is None),
    `peak_memory_bytes` (the process's resident peak: model, data, activations, optimizer and any
    feature cache) and `seconds` (wall time, loading included)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(config, threads, queue, progress is not None))
    process.start()
    done, total = 0, None
    while True:
        try:
            row = queue.get(timeout=1)
        except Empty:
            if not process.is_alive():  # killed (out of memory, a signal) before it could report
                raise RuntimeError(f"training {config.method.name} on {config.backbone}: the process died "
                                   f"with exit code {process.exitcode}") from None
            if progress is not None:
                progress(done, total)
            continue
        if "progress" not in row:
            break
        done, total = row["progress"]
        if progress is not None:
            progress(done, total)
    process.join()
    if "error" in row:
        raise RuntimeError(f"training {config.method.name} on {config.backbone} failed: {row['error']}")
    return row
