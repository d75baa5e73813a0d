"""Poolings of a final state's positions into one vector per example, as linear maps."""

from __future__ import annotations

import torch

LINEAR_POOLINGS = ("cls", "mean", "avg", "last")  # the plan's poolings that are linear in the final state


class LinearPool:
    """`how` (cls, mean, avg or last) as a linear map (B, T, k) or channels-last (B, H, W, k) -> (B, k) for
    inputs of `dtype`; the mask's weights are computed once for every call."""

    def __init__(self, how: str, attention_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        if how not in LINEAR_POOLINGS:
            raise ValueError(f"pooling: expected cls, mean, avg or last, got {how!r}")
        self.how = "avg" if how == "mean" and attention_mask is None else how  # a map's positions, or the tokens
        self.weights = self.at = None
        if self.how == "mean":
            weights = attention_mask.to(dtype).unsqueeze(1)  # (B, 1, T)
            self.weights = weights / weights.sum(2, keepdim=True).clamp_min(1)
        elif self.how == "last" and attention_mask is not None:
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            self.at = (attention_mask.long() * (positions + 1)).argmax(1)  # the last position whose mask is 1

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        if self.how == "cls":
            return b[:, 0]
        if self.how == "avg":
            return b.flatten(1, -2).mean(1)
        if self.how == "mean":  # a product, not a (B, T, D) temporary; in b's dtype even under autocast
            with torch.autocast(b.device.type, enabled=False):
                return (self.weights.to(device=b.device, dtype=b.dtype) @ b).squeeze(1)
        if self.at is None:
            return b[:, -1]
        return b[torch.arange(b.shape[0], device=b.device), self.at.to(b.device)]


def pool(b: torch.Tensor, how: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) or channels-last (B, H, W, C) -> (B, D)."""
    return LinearPool(how, attention_mask, b.dtype)(b)
