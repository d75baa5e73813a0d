"""LoRA in the Res-Tuning frame: a parallel low-rank linear map, `x' = W x + (alpha/r) B A x`.

On a linear op this is LoRA exactly (paper Table 7: OP = weight); on a larger op it is a low-rank
linear Res-Tuner.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import OpContext, ResTuner, register_tuner


@register_tuner("lora")
class LoRA(ResTuner):
    """`(alpha / r) B A x`; its options' meanings are in `option_help`."""

    option_help = {"dim": "the rank r", "alpha": "the scaling numerator; null: r (scaling 1)",
                   "dropout": "dropout on x before A"}

    folds = "input"

    def __init__(self, ctx: OpContext, dim: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(dim, ctx.in_features))
        self.lora_B = nn.Parameter(torch.zeros(ctx.out_features, dim))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = (alpha if alpha is not None else dim) / dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update to merge into the op's weight, (out_features, in_features)."""
        return self.lora_B @ self.lora_A * self.scaling

    @torch.no_grad()
    def merged(self, linear: nn.Linear) -> nn.Linear:
        """A copy of `linear` with this LoRA folded in: `W + (alpha/r) B A`. Equal to the tuned op."""
        out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        out.weight.copy_(linear.weight + self.delta_weight().to(linear.weight.dtype))
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out

    @torch.no_grad()
    def fold_into(self, linear: nn.Linear) -> None:
        """`W <- W + (alpha/r) B A` in place (the linear layer is the op, so x is its input)."""
        linear.weight.add_(self.delta_weight().to(linear.weight.dtype))
