"""BitFit: fine-tune only the backbone's own bias terms (Zaken et al., 2022).

The Res-Tuner `bitfit` (a zero-initialised vector added to an op's output) is the same update on an op
that has a bias; this baseline trains the biases themselves, everywhere the backbone has them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..methods.classifier import LastLayerClassifier
from ..methods.registry import Method, register_method


def bias_only(model: nn.Module) -> list[str]:
    """Make every parameter of `model` named `*.bias` trainable and freeze the rest; return their names."""
    names = []
    for name, p in model.named_parameters():
        trains = name == "bias" or name.endswith(".bias")
        p.requires_grad_(trains)
        if trains:
            names.append(name)
    if not names:
        raise ConfigError("bitfit: this backbone has no bias parameters to train")
    return names


def build(backbone: nn.Module, options: Any, num_classes: int | None) -> nn.Module:
    bias_only(backbone)
    return LastLayerClassifier(backbone, backbone, num_classes, frozen=False)


register_method(Method("bitfit", build, trains_backbone=True, summary="BitFit: the backbone's own biases"))
