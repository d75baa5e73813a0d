"""`restuning predict`: class names from several finished runs for the same inputs, streamed in batches.

Runs of a multi-task method (the bypass) on one backbone share a single backbone forward per batch
(`MultiTaskBypass`); runs of other methods (Res-Tuning, LoRA, full fine-tuning, Side-Tuning, LST, ...) each
run their own backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..bypass import MultiTaskBypass
from ..data import LabelledData
from ..data.sources import load_image
from ..data.transforms import resize
from ..errors import ConfigError
from ..methods import get_method
from .finished import FinishedRun, open_run
from .trainer import FINAL


def predict(runs: Sequence[str | Path], texts: Sequence[str] | None = None,
            images: Sequence[str | Path] | torch.Tensor | None = None, image_size: int | None = None,
            max_length: int | None = None, batch_size: int = 32) -> dict[str, list[str]]:
    """`{run: [class name per input]}` for texts, image files, or a (N, C, H, W) tensor in [0, 1]. Inputs are
    read, encoded and answered `batch_size` at a time, so memory does not grow with their number."""
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
    answers: dict[str, list[str]] = {str(r.path): [] for r in finished}
    for group in _by_backbone(finished):
        for run, logits in _answer(group, inputs, texts is not None, image_size, max_length, batch_size):
            answers[str(run.path)].extend(run.classes[c] for c in logits.argmax(-1).tolist())
    return answers


def _by_backbone(runs: list[FinishedRun]) -> list[list[FinishedRun]]:
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        groups.setdefault(run.config.backbone, []).append(run)
    return list(groups.values())


def _answer(runs: list[FinishedRun], inputs, are_texts: bool, image_size: int | None, max_length: int | None,
            batch_size: int) -> Iterator[tuple[FinishedRun, torch.Tensor]]:
    """Each run's logits for each batch of `inputs`, the runs on one backbone loaded once."""
    sizes = {(r.config.data.image_size, r.config.data.max_length) for r in runs}
    if len(sizes) != 1 and image_size is None and max_length is None:
        raise ConfigError(f"predict: the runs were trained on other input sizes {sorted(sizes)} "
                          "(image_size, max_length); pass image_size/max_length, or predict with them apart")
    size = image_size or runs[0].config.data.image_size
    length = max_length or runs[0].config.data.max_length
    backbone = runs[0].backbone()  # encodes the inputs, and serves the multi-task runs or the first other one
    shared = [r for r in runs if get_method(r.config.method.name).multi_task]
    own = [r for r in runs if r not in shared]
    models = []
    if shared:  # one backbone forward for all of them
        multi = MultiTaskBypass(backbone.model, {f"task{i}": r.path / FINAL for i, r in enumerate(shared)}).eval()
        models.append(("shared", multi))
    for i, run in enumerate(own):  # a tuned backbone of its own (a fresh copy: tuners attach to it)
        models.append((run, run.model(backbone if i == 0 and not shared else run.backbone())))
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        if not are_texts and not isinstance(chunk, torch.Tensor):
            chunk = torch.cat([resize(load_image(Path(p))[None], size) for p in chunk])
        data = LabelledData(list(chunk) if are_texts else chunk, torch.zeros(len(chunk), dtype=torch.long), ["?"])
        encoded = backbone.encode(data, size, length)
        with torch.no_grad():
            for key, model in models:
                if key == "shared":
                    out = model(**encoded)
                    yield from ((r, out[f"task{i}"]) for i, r in enumerate(shared))
                else:
                    yield key, model(**encoded)
