"""PEFT's own LoRA, as a reference implementation from outside (optional dependency `peft`)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..int8 import dequantize_layer, is_quantized
from ..methods.classifier import LastLayerClassifier
from ..methods.registry import Method, register_method
from .presets import attention_projections

DEFAULTS = {"r": 8, "lora_dropout": 0.0}
# In a diffusion UNet: rank 4 on every attention's projections, as diffusers' LoRA training scripts.
UNET_DEFAULTS = {"r": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def check_options(options: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """`options` are `peft.LoraConfig` field names (PEFT checks their values when the model is built)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("method peft_lora needs the `peft` package: pip install 'restuning[peft]'") from error
    unknown = set(options) - set(LoraConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"method.config: unknown peft LoraConfig field(s) {sorted(unknown)}")
    for key, value in options.items():  # PEFT itself checks late (when the model is built) or not at all
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"method.config.{key}: expected a finite number, got {value!r}")
    r = options.get("r", DEFAULTS["r"])
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"method.config.r: expected a positive integer (the LoRA rank), got {r!r}")
    alpha = options.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"method.config.lora_alpha: expected a positive number, got {alpha!r}")
    dropout = options.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"method.config.lora_dropout: expected a number in [0, 1), got {dropout!r}")
    try:
        LoraConfig(**{**DEFAULTS, **options, "target_modules": options.get("target_modules", ["query"])})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method.config: peft's LoraConfig refuses these options ({err})") from err
    return options


def peft_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`peft.get_peft_model(model, LoraConfig(...))`; `options` are `LoraConfig` fields over rank 8,
    `lora_alpha` equal to the rank (scaling 1, as our `lora`) and no dropout, on the query and value
    projections unless `target_modules` is given.
    `model` is changed in place (PEFT injects its layers) and frozen but for the LoRA weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("method peft_lora needs the `peft` package: pip install 'restuning[peft]'") from error
    check_options(options)
    config = {**DEFAULTS, **options}
    config.setdefault("lora_alpha", config["r"])  # PEFT's own default (8) would scale a rank-r update by 8/r
    config.setdefault("target_modules", attention_projections(model))
    try:
        lora = LoraConfig(**config)
        _plain_targeted_convolutions(model, lora)
        return get_peft_model(model, lora)
    except (TypeError, ValueError) as err:  # PEFT checks some options only here
        raise ConfigError(f"method.config: peft refuses these LoRA options ({err})") from err


def _plain_targeted_convolutions(model: nn.Module, lora: Any) -> None:
    """Int8 convolutions that LoRA targets back to bfloat16: PEFT wraps a layer with a torchao weight as a linear
    one, which breaks on a convolution (int8 linear layers are wrapped correctly and stay int8)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and is_quantized(module.weight) and check_target_module_exists(lora, name):
            dequantize_layer(module)


def build(backbone: nn.Module, options: dict[str, Any], num_classes: int | None) -> nn.Module:
    backbone.requires_grad_(False)
    tuned = peft_lora(backbone, options)
    return tuned if num_classes is None else LastLayerClassifier(tuned, backbone, num_classes, frozen=False)


register_method(Method("peft_lora", build, tasks=("classification", "diffusion"), parse=check_options,
                       low_precision=True, defaults={"diffusion": UNET_DEFAULTS},
                       summary="PEFT's LoRA; method.config: peft.LoraConfig fields, over r 8, lora_alpha = r, no "
                       "dropout, on the query and value projections unless target_modules is given"))
