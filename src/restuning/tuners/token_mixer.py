"""Res-Token-Mixer: a low-rank tuner that mixes tokens (LoSA-style), `up(h + mix(h))`, `h = act(down(x))`.

The other built-in tuners map each position on its own; this one lets each token see its neighbours: a
depthwise convolution over the patch grid (tokens of a class token and a square grid, or a CNN's
channels-last map) or along the sequence, in the low-rank space. `up` is zero-initialised, so the tuner is
zero at init wherever it is attached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spatial import mix_tokens
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
        self.grid = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.sequence = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.up = nn.Linear(dim, ctx.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) tokens or a channels-last map (B, H, W, D). Returns (..., out_features)."""
        h = self.act(self.down(x))
        return self.up(h + mix_tokens(h, self.grid, self.sequence))
