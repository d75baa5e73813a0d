"""AdamW in the fastest implementation torch offers for the parameters at hand.

torch's AdamW has three implementations of the same update: the single-tensor loop (its CPU default: a
Python loop of small ops per parameter), `foreach` (one multi-tensor op per step of the update) and `fused`
(one kernel over all parameters; CPU and CUDA in torch 2.13, floating-point parameters). A bypass has about a
hundred small parameter tensors, so the loop's per-op overhead is most of its optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

FUSED_DEVICES = ("cpu", "cuda")  # where torch 2.13 has a fused AdamW kernel
FOREACH_DEVICES = ("cpu", "cuda")


def adamw_implementation(params: list[nn.Parameter]) -> str:
    """`fused`, `foreach` or `single` (the per-tensor loop): the fastest AdamW torch offers for `params`,
    all of them floating point on one kind of device."""
    devices = {p.device.type for p in params}
    floating = all(torch.is_floating_point(p) and not torch.is_complex(p) for p in params)
    if len(devices) == 1 and floating:
        (device,) = devices
        if device in FUSED_DEVICES:
            return "fused"
        if device in FOREACH_DEVICES:
            return "foreach"
    return "single"


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float, implementation: str | None = None
          ) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, lr, weight_decay=weight_decay)` in `implementation` (`fused`, `foreach` or
    `single`; None: `adamw_implementation(params)`). The update is AdamW's whichever runs it; only float
    rounding differs between them."""
    params = list(params)
    how = implementation or adamw_implementation(params)
    if how not in ("fused", "foreach", "single"):
        raise ValueError(f"AdamW implementation: expected fused, foreach or single, got {how!r}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if how == "fused" else None,
                             foreach=True if how == "foreach" else False if how == "single" else None)
