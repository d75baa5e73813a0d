"""PEFT's own LoRA, as a reference implementation from outside (optional dependency `peft`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ConfigError
from .presets import attention_projections

DEFAULTS = {"r": 8, "lora_dropout": 0.0}


def peft_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`peft.get_peft_model(model, LoraConfig(...))`; `options` are `LoraConfig` fields over rank 8,
    `lora_alpha` equal to the rank (scaling 1, as our `lora`) and no dropout, on the query and value
    projections unless `target_modules` is given.
    `model` is changed in place (PEFT injects its layers) and frozen but for the LoRA weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("method peft_lora needs the `peft` package: pip install 'restuning[peft]'") from error
    known = set(LoraConfig.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"peft_lora: unknown LoraConfig field(s) {sorted(unknown)}")
    config = {**DEFAULTS, **options}
    config.setdefault("lora_alpha", config["r"])  # PEFT's own default (8) would scale a rank-r update by 8/r
    config.setdefault("target_modules", attention_projections(model))
    return get_peft_model(model, LoraConfig(**config))
