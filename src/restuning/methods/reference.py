"""The reference points of every comparison: linear probing and full fine-tuning."""

from __future__ import annotations

from typing import Any

from torch import nn

from .classifier import LastLayerClassifier
from .registry import Method, register_method


def linear(backbone: nn.Module, options: Any, num_classes: int | None) -> nn.Module:
    """A linear head on the frozen backbone's read-out, which runs without autograd."""
    backbone.requires_grad_(False)
    return LastLayerClassifier(backbone, backbone, num_classes, frozen=True)


def full(backbone: nn.Module, options: Any, num_classes: int | None) -> nn.Module:
    """Every backbone parameter trains; with `num_classes`, under a linear head."""
    backbone.requires_grad_(True)
    if num_classes is None:
        return backbone
    return LastLayerClassifier(backbone, backbone, num_classes, frozen=False)


register_method(Method("linear", linear, reads_frozen_backbone=False, low_precision=True,
                       summary="linear probing: a head on the frozen "
                       "backbone's read-out"))
register_method(Method("full", full, tasks=("classification", "diffusion"), trains_backbone=True,
                       summary="full fine-tuning"))
