"""The widening projection of a low-rank tuner, `y = h W^T + b` with `W` (out, r) and r small, with its
backward written out: the weight gradient as `(h^T g)^T` and the input gradient as `g W`.

A Res-Adapter's `up` and LoRA's `B` map a rank-r hidden (N, r) to the op's width (N, D), r about 10. Issue 14
measured autograd's `nn.Linear(r, D)` backward at 10-14 GFLOP/s against about 90 for a square GEMM (2 threads).
`SkinnyLinear` is a drop-in `nn.Linear` (the same parameters, names and initialisation, so checkpoints are
unchanged) whose backward picks the operand layouts explicitly; it equals the plain form to float rounding
(tested to 1e-6). Measured on the project's 2-core machine (process CPU time, one thread, as 2-thread timings
were not reproducible while the machine was shared): of four layouts for each product, the fastest were
`(h^T g)^T` for the weight (65 GFLOP/s at N 1024, D 384; `g^T h` 46) and `g W` for the input (57), which are
the layouts autograd already takes, so the custom function only added Python overhead (an up projection's
forward and backward: 745 against 795 us at N 1024, 130 against 215 us at N 32). The built-in tuners
therefore keep `nn.Linear`; this module stays for re-measuring on an idle machine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _grad_weight(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """g: (N, out), h: (N, r) -> g^T h, (out, r), contiguous.

    Computed as (h^T g)^T: an (r, N) x (N, out) product whose left operand is the transposed view of a
    row-major (N, r) matrix (BLAS's `transa`) and whose wide output rows are contiguous."""
    return (h.t() @ g).t().contiguous()


def _grad_input(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g: (N, out), weight: (out, r) -> g W, (N, r): the weight is made contiguous as (out, r) row-major
    (it is), so the product reads g's rows once."""
    return g @ weight


class _SkinnyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(h, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = _grad_input(g, weight).reshape(h.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _grad_weight(g, h.reshape(-1, h.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_h, grad_w, grad_b


def skinny_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(h, weight, bias)` for a narrow input: h (..., r), weight (out, r), bias (out,) or None ->
    (..., out). Plain `F.linear` where nothing needs a gradient, under autocast (whose casts the custom
    backward would not see) or for mixed dtypes."""
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (not needs_grad or torch.is_autocast_enabled(h.device.type) or h.dtype != weight.dtype
            or (bias is not None and bias.dtype != weight.dtype) or h.dim() < 2):
        return F.linear(h, weight, bias)
    return _SkinnyLinear.apply(h, weight, bias)


class SkinnyLinear(nn.Linear):
    """`nn.Linear(in_features, out_features)` (the same parameters, names and initialisation) for a small
    `in_features`, differentiated by `skinny_linear`. Input (..., in_features) -> (..., out_features)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return skinny_linear(h, self.weight, self.bias)
