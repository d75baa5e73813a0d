"""SSF (scale and shift of features) in the Res-Tuning frame:
`gamma * OP(x) + beta = OP(x) + ((gamma - 1) * OP(x) + beta)`, with gamma - 1 and beta zero-initialised."""

from __future__ import annotations

import torch
from torch import nn

from .base import OpContext, ResTuner, register_tuner


@register_tuner("ssf")
class SSF(ResTuner):
    """`dim` is ignored: the tuner has 2 * `out_features` parameters."""

    def __init__(self, ctx: OpContext, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(ctx.out_features))  # gamma - 1
        self.shift = nn.Parameter(torch.zeros(ctx.out_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.shift
