"""Res-Token-Mixer: a low-rank tuner that mixes tokens (LoSA-style), `up(h + mix(h))`, `h = act(down(x))`.

The other built-in tuners map each position on its own; this one lets each token see its neighbours: a
depthwise convolution in the low-rank space, over the patch grid of an image backbone's tokens (or a CNN's
map) or along the sequence of a text backbone's (causal on a decoder). Which one is fixed when it is built,
from what the op's context says of the backbone. `up` is zero-initialised, so the tuner is zero at init.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spatial import TokenMixing
from .adapter import _ACTIVATIONS
from .base import OpContext, ResTuner, register_tuner


@register_tuner("res_token_mixer")
class ResTokenMixer(ResTuner):
    """`up(h + mix(h))` with `h = act(down(x))`; `mix` a depthwise k x k (grid) or k (sequence) convolution."""

    position_wise = False
    option_choices = {"act": tuple(_ACTIVATIONS)}
    option_help = {
        "dim": "low-rank width the tokens are mixed in",
        "kernel": "odd size of the depthwise convolution over the grid (k x k) or the sequence (k)",
        "act": "the activation after down",
    }

    def __init__(self, ctx: OpContext, dim: int, kernel: int = 3, act: str = "gelu"):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"res_token_mixer kernel: expected an odd size >= 1, got {kernel}")
        self.down = nn.Linear(ctx.in_features, dim)
        self.act = _ACTIVATIONS[act]()
        self.mix = TokenMixing(dim, kernel, grid=ctx.grid, causal=ctx.causal)
        self.up = nn.Linear(dim, ctx.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) tokens or a channels-last map (B, H, W, D). Returns (..., out_features)."""
        h = self.act(self.down(x))
        return self.up(h + self.mix(h))
