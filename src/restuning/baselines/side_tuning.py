"""Side-Tuning (Zhang et al., 2020): an additive side network in parallel to all the backbone's blocks.

    out = a * x_L + (1 - a) * side(x_0),   a = sigmoid(blend)

`x_0` is the input of the first block and `x_L` the output of the last, both from a backbone run
without autograd, so nothing is back-propagated into it. `side` is a small transformer of its own
(down-projection, `depth` layers, zero-initialised up-projection) and the backbone's own read-out
(final norm, pooling) and a linear head follow the blend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bypass.network import read_out
from ..config import option
from ..methods.registry import Method, register_method
from .side_network import SideNetworkModel, SideNetworkOptions, padding_mask, side_block

METHOD = "side_tuning"


@dataclass
class SideTuningConfig(SideNetworkOptions):
    """Side-Tuning's options."""

    num_classes: int = option(2, ge=1, help="size of the linear head; a run sets it from its data")
    width: int | None = option(None, ge=1, help="side transformer width; null: a quarter of the backbone's")
    depth: int = option(2, ge=1, help="side transformer layers")
    heads: int = option(4, ge=1, help="attention heads of the side transformer")
    blend_init: float = option(0.0, help="initial `blend`, `a = sigmoid(blend)` in `a * x_L + (1 - a) * side(x_0)` "
                               "(0: a = 0.5)")


class SideTuning(SideNetworkModel):
    """`model(**inputs)` -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module, config: SideTuningConfig):
        super().__init__(model, config, METHOD)
        self.config = config
        dim = self.plan.widths[-1]
        width = config.width or max(config.heads, dim // 4 // config.heads * config.heads)
        self.down = nn.Linear(self.plan.widths[0], width)
        self.blocks = nn.ModuleList(side_block(width, config.heads) for _ in range(config.depth))
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.blend = nn.Parameter(torch.tensor(float(config.blend_init)))
        self.head = nn.Linear(dim, config.num_classes)
        self._place()

    def forward_features(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """features: [x_0 (B, T, D0), ..., x_L (B, T, D)]. Returns logits (B, num_classes)."""
        dtype = self.head.weight.dtype  # features of a low-precision backbone are cast where they are read
        h, padding = self.down(features[0].to(dtype)), padding_mask(attention_mask)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=padding)
        a = torch.sigmoid(self.blend)
        mixed = a * features[-1].to(dtype) + (1 - a) * self.up(h)
        return self.head(read_out(mixed, self.plan, attention_mask, self.final_norm))


register_method(Method(METHOD, lambda backbone, options, num_classes: SideTuning(backbone, options),
                       options=SideTuningConfig, reads_frozen_backbone=True, low_precision=True,
                       summary="Side-Tuning: a side transformer on x_0 blended with x_L (SideTuningConfig)"))
