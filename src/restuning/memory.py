"""Counting training memory: what autograd saves for backward, and parameter/gradient/optimizer bytes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .precision import plain_tensors, tensor_bytes


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward inside the `with` block, each storage counted
    once. Storages of `exclude` (typically the model's parameters, which exist anyway) are not counted.

        with SavedTensorMeter(model.parameters()) as meter:
            loss = model(x).sum()
        meter.bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for p in exclude for t in plain_tensors(p)}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for plain in plain_tensors(tensor):  # a quantized weight: its packed data and scales
            storage = plain.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._excluded:
                self._seen.setdefault(ptr, storage.nbytes())
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of all parameters, of their gradients, and of the optimizer's state tensors."""
    params = list(model.parameters())
    optim = 0
    if optimizer is not None:
        optim = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
    return {
        "parameters": sum(tensor_bytes(p) for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": optim,
    }
