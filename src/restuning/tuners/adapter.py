"""Res-Adapter: a bottleneck MLP in parallel to the op, `up(act(down(x)))`, `up` zero-initialised."""

from __future__ import annotations

import torch
from torch import nn

from .base import OpContext, ResTuner, register_tuner

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


@register_tuner("res_adapter")
class ResAdapter(ResTuner):
    """`up(act(down(x)))`, scaled; its options' meanings are in `option_help`."""

    option_choices = {"act": tuple(_ACTIVATIONS), "reads": ("input", "output")}
    option_help = {
        "dim": "bottleneck width (paper default 10)",
        "act": "the activation between down and up",
        "scale": "fixed multiplier of the delta",
        "reads": "`input` (the free Res-Tuner, reads the op's input) or `output` (reads OP(x): the exact parallel "
                 "form of a serial Houlsby adapter placed after the op, paper eq. 6)",
    }

    def __init__(self, ctx: OpContext, dim: int, act: str = "gelu", scale: float = 1.0, reads: str = "input"):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"res_adapter act: expected one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if reads not in ("input", "output"):
            raise ValueError(f"res_adapter reads: expected 'input' or 'output', got {reads!r}")
        self.reads, self.scale = reads, scale
        self.down = nn.Linear(ctx.out_features if reads == "output" else ctx.in_features, dim)
        self.act = _ACTIVATIONS[act]()
        self.up = nn.Linear(dim, ctx.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        source = y if self.reads == "output" else x
        delta = self.up(self.act(self.down(source)))
        return delta if self.scale == 1 else delta * self.scale
