"""LST, ladder side-tuning (Sung et al., 2022): a narrow side transformer fed by gated "ladders" of
down-projected backbone features.

    h = D_0(x_0);   for l = 1..L:  h = mu_l * D_l(x_l) + (1 - mu_l) * h;  h = S_l(h)
    mu_l = sigmoid(alpha_l / T),  alpha_l = 0 at init

`x_l` come from a backbone run without autograd (LST's detached features), `D_l` are linear
down-projections to `width = D / reduction`, `S_l` pre-norm transformer layers of that width, and a
LayerNorm, the pooling and a linear head read the last `h`. LST initialises `S_l` from pruned backbone
weights and up-projects `h` for a frozen LM head; here `S_l` start at random (PyTorch's default
initialisation) and the trained head reads `h` directly, since an up-projection before a linear head
adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bypass.pooling import pool
from ..config import option
from ..methods.registry import Method, register_method
from .side_network import SideNetworkModel, SideNetworkOptions, padding_mask, side_block

METHOD = "lst"


@dataclass
class LSTConfig(SideNetworkOptions):
    """LST's options."""

    num_classes: int = option(2, ge=1, help="size of the linear head; a run sets it from its data")
    reduction: int = option(8, ge=1, help="side width = backbone width / reduction (LST: 8)")
    heads: int = option(4, ge=1, help="attention heads of the side transformer")
    temperature: float = option(0.1, gt=0, help="temperature T of the ladder gates (LST: 0.1)")


class LadderSideTuning(SideNetworkModel):
    """`model(**inputs)` -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module, config: LSTConfig):
        super().__init__(model, config, METHOD)
        self.config = config
        widths = self.plan.widths
        width = max(config.heads, widths[-1] // config.reduction // config.heads * config.heads)
        self.downs = nn.ModuleList(nn.Linear(w, width) for w in widths)
        self.gates = nn.Parameter(torch.zeros(len(widths) - 1))
        self.blocks = nn.ModuleList(side_block(width, config.heads) for _ in widths[1:])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.num_classes)
        self._place()

    def forward_features(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """features: [x_0 (B, T, D_0), ..., x_L (B, T, D_L)]. Returns logits (B, num_classes)."""
        dtype = self.head.weight.dtype  # features of a low-precision backbone are cast where they are read
        h, padding = self.downs[0](features[0].to(dtype)), padding_mask(attention_mask)
        mu = torch.sigmoid(self.gates / self.config.temperature)
        for layer in range(1, len(features)):
            h = mu[layer - 1] * self.downs[layer](features[layer].to(dtype)) + (1 - mu[layer - 1]) * h
            h = self.blocks[layer - 1](h, src_key_padding_mask=padding)
        return self.head(pool(self.norm(h), self.plan.pooling, attention_mask))


register_method(Method(METHOD, lambda backbone, options, num_classes: LadderSideTuning(backbone, options),
                       options=LSTConfig, reads_frozen_backbone=True, low_precision=True,
                       summary="LST: ladder side-tuning, a narrow side transformer fed by gated ladders (LSTConfig)"))
