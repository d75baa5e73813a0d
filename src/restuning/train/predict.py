"""`restuning predict`: class names from several finished runs for the same inputs, streamed in batches.

The runs on one backbone form one `TaskTable`: bypass runs share a single backbone forward per batch; runs of
other methods (Res-Tuning, LoRA, full fine-tuning, Side-Tuning, LST, ...) each run their own backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.sources import load_image
from ..errors import ConfigError
from .finished import FinishedRun, open_run
from .task_table import Query, TaskTable


def predict(runs: Sequence[str | Path], texts: Sequence[str] | None = None,
            images: Sequence[str | Path] | torch.Tensor | None = None, image_size: int | None = None,
            max_length: int | None = None, batch_size: int = 32) -> dict[str, list[str]]:
    """`{run: [class name per input]}` for texts, image files, or a (N, C, H, W) tensor in [0, 1]. Inputs are
    read, encoded and answered `batch_size` at a time, so memory does not grow with their number."""
    answers = {}
    for run, logits in predict_logits(runs, texts, images, image_size, max_length, batch_size):
        answers.setdefault(str(run.path), []).extend(run.classes[c] for c in logits.argmax(-1).tolist())
    return answers


def predict_logits(runs: Sequence[str | Path], texts: Sequence[str] | None = None,
                   images: Sequence[str | Path] | torch.Tensor | None = None, image_size: int | None = None,
                   max_length: int | None = None, batch_size: int = 32
                   ) -> Iterator[tuple[FinishedRun, torch.Tensor]]:
    """(run, (batch, n_classes) logits) for each run and each batch of the inputs, in input order per run."""
    if (texts is None) == (images is None):
        raise ConfigError("predict: give either texts or images")
    inputs = texts if texts is not None else images
    if len(inputs) == 0:
        raise ConfigError("predict: no inputs (give at least one text or image)")
    if batch_size < 1:
        raise ConfigError(f"predict: batch_size: expected a positive integer, got {batch_size}")
    finished = [open_run(r) for r in runs]
    if not finished:
        raise ConfigError("predict: name at least one run")
    for group in _by_backbone(finished):
        table = TaskTable(group[0].config.backbone, image_size, max_length)
        for i, run in enumerate(group):
            table.add(f"run{i}", run)
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            if images is not None and not isinstance(chunk, torch.Tensor):
                chunk = [load_image(Path(p)) for p in chunk]
            (answer,) = table.answer([Query(table.names, chunk)])
            yield from ((run, answer[f"run{i}"]) for i, run in enumerate(group))


def _by_backbone(runs: list[FinishedRun]) -> list[list[FinishedRun]]:
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        groups.setdefault(run.config.backbone, []).append(run)
    return list(groups.values())
