"""Feature maps of CNNs and UNets: resampling between stages and running channels-last tuners on them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


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
