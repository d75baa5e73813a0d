"""`restuning eval`: rebuild a finished run from its folder and measure top-1 accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.shipped import SHIPPED
from .config import TrainConfig, from_dict
from .trainer import FINAL, Trainer, accuracy


def evaluate_run(run: Path, data: str | None = None) -> dict[str, float]:
    """Accuracy of the run's final weights on its own test split (same seed), or on shipped set `data`."""
    final = run / FINAL
    if not (final / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{run}: no finished run here (expected {FINAL}/trainable.safetensors)")
    config = from_dict(TrainConfig, json.loads((final / "train_config.json").read_text()))
    trainer = Trainer(config, progress=False)
    tensors = load_file(str(final / "trainable.safetensors"))
    params = dict(trainer.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise ValueError(f"{run}: saved weights do not fit the rebuilt model: unexpected "
                         f"{sorted(set(tensors) - trainable)[:5]}, missing {sorted(trainable - set(tensors))[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    device = trainer.accelerator.device
    trainer.model.to(device)
    if data is None:
        return trainer.evaluate()
    target = SHIPPED[data]()
    return {f"{data}_accuracy": accuracy(trainer.model, trainer._encode(target), target.labels,
                                         config.optim.batch_size, device)}
