"""Poolings of a final state's positions into one vector per example, as linear maps with their transposes."""

from __future__ import annotations

import torch


class LinearPool:
    """`how` (cls, mean, avg or last) as a linear map (B, T, k) or channels-last (B, H, W, k) -> (B, k) for
    inputs of `dtype`, with `transpose`, its adjoint; the mask's weights are computed once for every call."""

    def __init__(self, how: str, attention_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        if how not in ("cls", "mean", "avg", "last"):
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
        if self.how == "mean":
            return (self.weights.to(b.device) @ b).squeeze(1)  # a product, not a (B, T, D) temporary
        if self.at is None:
            return b[:, -1]
        return b[torch.arange(b.shape[0], device=b.device), self.at.to(b.device)]

    def transpose(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The adjoint: grad (B, k) -> (B, ..., k) of `shape`, the gradient of the pooled input."""
        if self.how == "mean":
            return (self.weights.to(grad.device).transpose(1, 2) @ grad.unsqueeze(1)).view(shape)
        if self.how == "avg":
            positions = shape[1:-1].numel()
            return (grad / positions).unsqueeze(1).expand(shape[0], positions, shape[-1]).reshape(shape)
        out = grad.new_zeros(shape[0], shape[1:-1].numel(), shape[-1])
        if self.how == "cls":
            out[:, 0] = grad
        elif self.at is None:
            out[:, -1] = grad
        else:
            out[torch.arange(shape[0], device=grad.device), self.at.to(grad.device)] = grad
        return out.view(shape)


def pool(b: torch.Tensor, how: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) or channels-last (B, H, W, C) -> (B, D)."""
    return LinearPool(how, attention_mask, b.dtype)(b)
