"""`restuning eval`: rebuild a finished run from its folder and measure top-1 accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.shipped import SHIPPED
from .config import TrainConfig, from_dict
from .loop import FINAL, Trainer, accuracy


def evaluate_run(run: Path, data: str | None = None) -> dict[str, float]:
    """Accuracy of the run's final weights on its own test split (same seed), or on shipped set `data`."""
    final = run / FINAL
    if not (final / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{run}: no finished run here (expected {FINAL}/trainable.safetensors)")
    config = from_dict(TrainConfig, json.loads((final / "train_config.json").read_text()))
    trainer = Trainer(config, progress=False)
    tensors = load_file(str(final / "trainable.safetensors"))
    params = dict(trainer.model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{run}: saved weights {missing[:5]} do not fit the rebuilt model")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    if data is None:
        return trainer.evaluate()
    target = SHIPPED[data]()
    return {f"{data}_accuracy": accuracy(trainer.model, trainer._encode(target), target.labels,
                                         config.optim.batch_size)}
