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


def token_grid_side(tokens: int) -> int | None:
    """The side of the square patch grid behind `tokens` tokens that start with one class token (1 + s * s),
    or None when they form no such grid (a text sequence)."""
    side = math.isqrt(tokens - 1) if tokens > 1 else 0
    return side if side > 1 and side * side == tokens - 1 else None


def mix_tokens(h: torch.Tensor, grid: nn.Module, sequence: nn.Module) -> torch.Tensor:
    """Run a token-mixing convolution over `h`: `grid` (a Conv2d, channels first) over a channels-last map
    (B, H, W, C) or over the patch grid of (B, 1 + s * s, C) tokens (the class token passes through unchanged),
    else `sequence` (a Conv1d) along the tokens of (B, T, C). Returns a tensor shaped like `h`."""
    if h.dim() == 4:
        return grid(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    b, t, c = h.shape
    side = token_grid_side(t)
    if side is None:
        return sequence(h.transpose(1, 2)).transpose(1, 2)
    patches = grid(h[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2))
    return torch.cat([h[:, :1], patches.permute(0, 2, 3, 1).reshape(b, side * side, c)], dim=1)
