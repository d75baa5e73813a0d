"""SSF (scale and shift of features) in the Res-Tuning frame:
`gamma * OP(x) + beta = OP(x) + ((gamma - 1) * OP(x) + beta)`, with gamma - 1 and beta zero-initialised."""

from __future__ import annotations

import torch
from torch import nn

from .base import OpContext, ResTuner, register_tuner


@register_tuner("ssf")
class SSF(ResTuner):
    """`dim` is ignored: the tuner has 2 * `out_features` parameters."""

    folds = "output"
    option_help = {"dim": "ignored: the tuner has 2 * `out_features` parameters"}

    def __init__(self, ctx: OpContext, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(ctx.out_features))  # gamma - 1
        self.shift = nn.Parameter(torch.zeros(ctx.out_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.shift

    @torch.no_grad()
    def folded(self, linear: nn.Linear) -> nn.Linear:
        """A copy of the linear op this SSF follows with the scale and shift folded in:
        `gamma (W x + b) + beta = (gamma W) x + (gamma b + beta)`. Equal to the tuned op."""
        gamma = (1 + self.scale).to(linear.weight.dtype)
        out = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                        dtype=linear.weight.dtype)
        out.weight.copy_(gamma[:, None] * linear.weight)
        bias = linear.bias if linear.bias is not None else torch.zeros_like(gamma)
        out.bias.copy_(gamma * bias + self.shift.to(gamma.dtype))
        return out

    @torch.no_grad()
    def fold_into(self, linear: nn.Linear) -> None:
        """`folded` in place: `W <- gamma W`, `b <- gamma b + beta` (a bias is added where there was none)."""
        folded = self.folded(linear)
        linear.weight.copy_(folded.weight)
        set_bias(linear, folded.bias)


def set_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Give `linear` this bias, in place, adding a bias parameter where it had none."""
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(bias)
