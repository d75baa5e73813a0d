"""BitFit in the Res-Tuning frame (paper Table 7: OP = bias): a learnable vector added to the op's
output, zero-initialised. On an op with a bias it equals tuning that bias."""

from __future__ import annotations

import torch
from torch import nn

from .base import OpContext, ResTuner, register_tuner
from .ssf import set_bias


@register_tuner("bitfit")
class BitFit(ResTuner):
    """`dim` is ignored: the tuner has exactly `out_features` parameters."""

    folds = "output"
    option_help = {"dim": "ignored: the tuner has exactly `out_features` parameters"}

    def __init__(self, ctx: OpContext, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(ctx.out_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bias.to(y.dtype).expand_as(y)

    @torch.no_grad()
    def fold_into(self, linear: nn.Linear) -> None:
        """`b <- b + bias` in place (a bias is added where there was none)."""
        bias = self.bias.to(linear.weight.dtype)
        set_bias(linear, bias if linear.bias is None else linear.bias + bias)
