"""Feature maps of CNNs and UNets, and token grids: resampling between stages, running channels-last tuners on
them, and mixing tokens over their grid."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size): area averaging when shrinking, bilinear when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def on_channels(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Run a channels-last tuner `fn(x, y)` on (B, C, H, W) maps; `x` is first resampled to `y`'s size
    (a strided block shrinks its input). Returns a (B, C_y, H_y, W_y) delta."""
    x = resample(x, tuple(y.shape[-2:]))
    return fn(x.movedim(1, -1), y.movedim(1, -1)).movedim(-1, 1)


def token_grid_side(tokens: int) -> tuple[int, int] | None:
    """(prefix, side) of `tokens` tokens on a square patch grid: a class token and s * s patches (prefix 1), or
    s * s positions alone (prefix 0, a UNet's attention tokens); None when they form no such grid."""
    for prefix in (0, 1):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side > 1 and side * side == tokens - prefix:
            return prefix, side
    return None


class TokenMixing(nn.Module):
    """A depthwise convolution that mixes each token with its neighbours, in one mode fixed when it is built:
    `grid` (k x k over a channels-last map (B, H, W, C), or over the patch grid of image tokens (B, 1 + s * s, C),
    the class token passed through) or `sequence` (k along the tokens of (B, T, C); with `causal`, a token sees
    only itself and the k - 1 before it, as a decoder's tokens must)."""

    def __init__(self, width: int, kernel: int, grid: bool, causal: bool = False, bias: bool = True):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"token mixing kernel: expected an odd size >= 1, got {kernel}")
        self.grid, self.causal, self.kernel = grid, causal, kernel
        conv = nn.Conv2d if grid else nn.Conv1d
        self.conv = conv(width, width, kernel, padding=0 if causal else kernel // 2, groups=width, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, T, C) tokens or a channels-last map (B, H, W, C). Returns a tensor shaped like `h`."""
        if h.dim() == 4:
            if not self.grid:
                raise ValueError("token mixing: a feature map needs the grid mode")
            return self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if not self.grid:
            x = h.transpose(1, 2)
            if self.causal:
                x = F.pad(x, (self.kernel - 1, 0))
            return self.conv(x).transpose(1, 2)
        b, t, c = h.shape
        layout = token_grid_side(t)
        if layout is None:
            raise ValueError(f"token mixing on a grid: {t} tokens are neither a square patch grid nor a class token "
                             "and one (register or distillation tokens are not supported)")
        prefix, side = layout
        patches = self.conv(h[:, prefix:].reshape(b, side, side, c).permute(0, 3, 1, 2))
        return torch.cat([h[:, :prefix], patches.permute(0, 2, 3, 1).reshape(b, side * side, c)], dim=1)
