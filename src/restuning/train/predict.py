"""`restuning predict`: several bypass task checkpoints answered with one backbone forward."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bypass import MultiTaskBypass
from ..data import LabelledData
from ..data.sources import load_image
from ..data.transforms import resize
from .backbones import load_backbone
from .config import TrainConfig, from_dict
from .loop import FINAL


def predict(runs: list[Path], texts: list[str] | None = None, images: list[Path] | torch.Tensor | None = None,
            image_size: int | None = None, max_length: int | None = None) -> dict[str, list[str]]:
    """Class names predicted by every run's task for every input (texts, image files, or a (B, C, H, W)
    tensor in [0, 1]). The runs must be Res-Tuning-Bypass runs on one backbone, which runs once."""
    configs = [from_dict(TrainConfig, json.loads((r / FINAL / "train_config.json").read_text())) for r in runs]
    names = {c.backbone for c in configs}
    if len(names) != 1 or any(c.method.name != "bypass" for c in configs):
        raise ValueError(f"predict serves bypass runs of one backbone; got backbones {sorted(names)} and methods "
                         f"{[c.method.name for c in configs]}")
    settings = {(c.data.image_size, c.data.max_length) for c in configs}
    if len(settings) != 1 and image_size is None and max_length is None:
        raise ValueError(f"predict: the runs were trained on other input sizes {sorted(settings)} "
                         "(image_size, max_length); pass image_size/max_length, or serve them apart")
    backbone = load_backbone(configs[0].backbone)
    multi = MultiTaskBypass(backbone.model, {f"task{i}": r / FINAL / "task" for i, r in enumerate(runs)}).eval()
    classes = [json.loads((r / FINAL / "classes.json").read_text()) for r in runs]
    size = image_size or configs[0].data.image_size
    if isinstance(images, list):
        images = torch.cat([resize(load_image(p)[None], size) for p in images])
    inputs = texts if texts is not None else images
    data = LabelledData(inputs, torch.zeros(len(inputs), dtype=torch.long), ["?"])
    encoded = backbone.encode(data, size, max_length or configs[0].data.max_length)
    with torch.no_grad():
        answers = multi(**encoded)
    return {str(run): [classes[i][c] for c in answers[f"task{i}"].argmax(-1).tolist()] for i, run in enumerate(runs)}
