"""Res-Tuning-Bypass: a gated bypass network reads the layers of a backbone run once without autograd.

A run's checkpoint is the bypass task's own (so `ResTuningBypassModel.from_pretrained` and `MultiTaskBypass`
open it); a diffusers UNet gets the UNet bypass, which its family registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bypass import BypassConfig, bypass_model_class
from .registry import Method, register_method


def build(backbone: nn.Module, options: BypassConfig, num_classes: int | None) -> nn.Module:
    return bypass_model_class(backbone)(backbone, options)


def save(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    model.save_pretrained(directory, extra=meta)


def load(method: Method, backbone: nn.Module, directory: Path, meta: dict[str, Any],
         tensors: dict[str, torch.Tensor]) -> nn.Module:
    return bypass_model_class(backbone).from_pretrained(backbone, directory, is_trainable=True)


register_method(Method("bypass", build, options=BypassConfig, tasks=("classification", "diffusion"),
                       reads_frozen_backbone=True, multi_task=True, low_precision=True, save=save, load=load,
                       checkpoint_names=("restuning_bypass", "restuning_bypass_unet"),
                       summary="Res-Tuning-Bypass (BypassConfig)"))
