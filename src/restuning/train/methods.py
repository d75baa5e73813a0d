"""One classifier per method, all called as `model(**inputs) -> logits (B, num_classes)`.

Linear probing, full fine-tuning and Res-Tuning read the backbone's last layer the way its own
read-out does (final norm, CLS / mean / spatial pooling), then a linear head. Res-Tuning-Bypass is
`ResTuningBypassModel` with `num_classes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..bypass import BypassConfig, FeatureTaps, ResTuningBypassModel, plan_taps
from ..bypass.network import read_out
from ..config import ConfigError, ResTuningConfig
from ..model import ResTuningModel
from ..params import ParameterReport


class LastLayerClassifier(ParameterReport, nn.Module):
    """`head(read_out(last layer of backbone))`. `frozen`: the backbone runs without autograd (linear
    probing); otherwise gradients flow into whatever in `runner` trains (full fine-tuning, tuners)."""

    def __init__(self, runner: nn.Module, backbone: nn.Module, num_classes: int, frozen: bool):
        super().__init__()
        self.runner, self.frozen = runner, frozen
        self.plan = plan_taps(backbone, BypassConfig())
        self._backbone = [backbone]  # a plain reference: the backbone is already a submodule of runner
        self.taps = FeatureTaps(backbone, self.plan.points[-1:], grad=not frozen).attach()
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


def build_classifier(method: str, backbone: nn.Module, num_classes: int, config: dict[str, Any]) -> nn.Module:
    """The trainable model for `method` (restuning | bypass | linear | full) on `backbone`."""
    if method == "bypass":
        return ResTuningBypassModel(backbone, BypassConfig.from_dict({**config, "num_classes": num_classes}))
    if config and method in ("linear", "full"):
        raise ConfigError(f"method.config: {method} takes no options, got {sorted(config)}")
    if method == "linear":
        backbone.requires_grad_(False)
        return LastLayerClassifier(backbone, backbone, num_classes, frozen=True)
    if method == "full":
        backbone.requires_grad_(True)
        return LastLayerClassifier(backbone, backbone, num_classes, frozen=False)
    if method == "restuning":
        tuned = ResTuningModel(backbone, ResTuningConfig.from_dict(config))
        return LastLayerClassifier(tuned, backbone, num_classes, frozen=False)
    raise ConfigError(f"method.name: expected restuning, bypass, linear or full, got {method!r}")
