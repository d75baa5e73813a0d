"""One classifier per method, all called as `model(**inputs) -> logits (B, num_classes)`.

Methods that train inside the backbone (full fine-tuning, BitFit, Res-Tuning and the Res-Tuner
baselines, VPT-shallow, PEFT's LoRA) and linear probing read the backbone's last layer the way its
own read-out does (final norm, CLS / mean / spatial pooling), then a linear head. Methods that never
back-propagate into the backbone (Res-Tuning-Bypass, Side-Tuning, LST) are `FrozenBackbone` models
with their own heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..baselines import (
    PRESETS,
    LadderSideTuning,
    LSTConfig,
    SideTuning,
    SideTuningConfig,
    VPTShallow,
    bias_only,
    peft_lora,
    preset_config,
)
from ..bypass import BypassConfig, FeatureTaps, ResTuningBypassModel, plan_taps
from ..bypass.network import read_out
from ..config import ConfigError, ResTuningConfig
from ..model import ResTuningModel
from ..params import ParameterReport
from .config import METHODS


class LastLayerClassifier(ParameterReport, nn.Module):
    """`head(read_out(last layer of backbone))`. `frozen`: the backbone runs without autograd (linear
    probing); otherwise gradients flow into whatever in `runner` trains (full fine-tuning, tuners).
    Backbone modules after the last layer that the read-out does not use (a pooler) are frozen, so
    that they count as neither trained nor trainable."""

    def __init__(self, runner: nn.Module, backbone: nn.Module, num_classes: int, frozen: bool):
        super().__init__()
        self.runner, self.frozen = runner, frozen
        self.plan = plan_taps(backbone, BypassConfig())
        self._backbone = [backbone]  # a plain reference: the backbone is already a submodule of runner
        self.taps = FeatureTaps(backbone, self.plan.points[-1:], grad=not frozen).attach()
        for p in _unused_after(backbone, self.plan.points[-1], self.plan.final_norm):
            p.requires_grad_(False)
        ref = next(backbone.parameters())
        self.head = nn.Linear(self.plan.widths[-1], num_classes).to(ref.device)

    def train(self, mode: bool = True) -> LastLayerClassifier:
        super().train(mode)
        if self.frozen:
            self.runner.eval()
        return self

    def forward(self, **inputs: Any) -> torch.Tensor:
        last = self.taps(lambda: self.runner(**inputs))[-1]
        if self.plan.layout == "map":
            last = last.movedim(1, -1)
        norm = self._backbone[0].get_submodule(self.plan.final_norm) if self.plan.final_norm else None
        return self.head(read_out(last, self.plan, inputs.get("attention_mask"), norm))


def _unused_after(backbone: nn.Module, last: str, final_norm: str | None) -> list[nn.Parameter]:
    """Parameters of modules registered after the last tapped layer, other than the final norm."""
    names = [n for n, _ in backbone.named_modules()]
    after = names[names.index(last) + 1:]
    keep = (last, final_norm) if final_norm else (last,)
    unused = []
    for name in after:
        if any(name == k or name.startswith(k + ".") for k in keep):
            continue
        unused.extend(backbone.get_submodule(name).parameters(recurse=False))
    return unused


def build_classifier(method: str, backbone: nn.Module, num_classes: int, config: dict[str, Any]) -> nn.Module:
    """The trainable model for `method` (one of `METHODS`) on `backbone`, with the method's options."""
    with_head = {**config, "num_classes": num_classes}
    if method == "bypass":
        return ResTuningBypassModel(backbone, BypassConfig.from_dict(with_head))
    if method == "side_tuning":
        return SideTuning(backbone, SideTuningConfig.from_dict(with_head))
    if method == "lst":
        return LadderSideTuning(backbone, LSTConfig.from_dict(with_head))
    if config and method in ("linear", "full", "bitfit"):
        raise ConfigError(f"method.config: {method} takes no options, got {sorted(config)}")
    if method == "linear":
        backbone.requires_grad_(False)
        return LastLayerClassifier(backbone, backbone, num_classes, frozen=True)
    if method == "full":
        backbone.requires_grad_(True)
        return LastLayerClassifier(backbone, backbone, num_classes, frozen=False)
    if method == "bitfit":
        bias_only(backbone)
        return LastLayerClassifier(backbone, backbone, num_classes, frozen=False)
    if method == "vpt_shallow":
        unknown = set(config) - {"tokens", "family"}
        if unknown:
            raise ConfigError(f"method.config: vpt_shallow takes tokens and family, got {sorted(unknown)}")
        backbone.requires_grad_(False)
        return LastLayerClassifier(VPTShallow(backbone, **config), backbone, num_classes, frozen=False)
    if method == "peft_lora":
        backbone.requires_grad_(False)
        return LastLayerClassifier(peft_lora(backbone, config), backbone, num_classes, frozen=False)
    if method == "restuning":
        tuned = ResTuningModel(backbone, ResTuningConfig.from_dict(config))
        return LastLayerClassifier(tuned, backbone, num_classes, frozen=False)
    if method in PRESETS:
        tuned = ResTuningModel(backbone, preset_config(method, backbone, config))
        return LastLayerClassifier(tuned, backbone, num_classes, frozen=False)
    raise ConfigError(f"method.name: expected one of {', '.join(METHODS)}; got {method!r}")
