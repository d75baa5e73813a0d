"""The pooled output of a bypass of Res-Adapters, computed without materialising any full-width state.

With `H_l` and `V_l` plain Res-Adapters (`x + up(gelu(down(x)))`, see `fused.py`), each step is linear in
`b_{l-1}` and `x_l` except through the (N, r) pre-activations, so (steps 0-based, `lam_i = sigmoid(theta_i)`)

    b_{i+1} = (1 - lam_i) b_i + lam_i x_{i+1} + z_i W_i^T,
    z_i = [(1 - lam_i) gelu(a_i), lam_i gelu(c_i), 1]   (N, r_v + r_h + 1),
    W_i = [U_v, U_h, (1 - lam_i) u_v + lam_i u_h]       (D, r_v + r_h + 1),

with `a_i = b_i D_{v,i}^T + d_{v,i}` and `c_i = x_{i+1} D_{h,i}^T + d_{h,i}`. Every later `a_j` needs only `b_i`
projected on the later down weights, `t_i = b_i [D_{v,i}; ...; D_{v,L-1}]^T` (N, sum of their ranks), which
follows the same recursion in (N, r)-wide tensors:

    t_{i+1} = (1 - lam_i) t_i[later] + lam_i x_{i+1} F^T + z_i (W_i^T F^T),   F = [D_{v,i+1}; ...].

A linear pooling (`mean`, `avg`, `cls`, `last`) commutes with all of it, so the read-out is

    pool(b_{i+1}) = (1 - lam_i) pool(b_i) + lam_i pool(x_{i+1}) + pool(z_i) W_i^T.

Each tapped layer is read by one product `x [D_h; F]^T` (and once more for its weights' gradient in backward)
instead of a dozen passes over (N, D) tensors per step. Autograd keeps the (N, r)-wide projections and the
features themselves, in their own dtype (`_Project`: a low-precision tap is never kept again in float32), so
this form never needs `recompute`; `BypassNetwork.pooled_form_applies` takes it where that keeps less than the
checkpointed steps (`kept_per_row`: not for a bypass on one token, or ranks near the width). The same numbers
as the step-by-step bypass to float rounding (tested in float64 and float32). A hand-written backward of the
whole recursion was tried and measured no faster: the step's time is its products and the per-op cost of
(N, r)-wide ops, which autograd adds little to.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..tuners.adapter import ResAdapter
from .pooling import LinearPool


class _Project(torch.autograd.Function):
    """`x @ weight^T` for features x (N, D) of any floating dtype and a weight (k, D): x is cast to the weight's
    dtype in forward and again in backward, so what autograd keeps is x itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.to(weight.dtype) @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def pooled_bypass(features: list[torch.Tensor], lam: torch.Tensor, horizontal: list[ResAdapter],
                  vertical: list[ResAdapter], pool: LinearPool) -> torch.Tensor:
    """features: [x_0, ..., x_L], each (B, ..., D) of one shape, any floating dtype; lam: the gates (L,);
    `horizontal[i]`, `vertical[i]`: step i's plain Res-Adapters (`fused.fusable`); pool: the read-out's
    pooling. Returns pool(b_L), (B, D), in lam's dtype."""
    dtype, lead = lam.dtype, features[0].shape[:-1]
    flat = [f.reshape(-1, f.shape[-1]) for f in features]
    down_v = [v.down.weight for v in vertical]
    # unbind and split, not indexing and slices: their backward writes each part's gradient once instead
    # of a zero-filled whole per part.
    gates = lam.unbind()
    t = _Project.apply(flat[0], torch.cat(down_v))  # b_0 = x_0 on every vertical down weight, (N, R_0)
    p = pool(features[0].to(dtype))
    for i, (h, v) in enumerate(zip(horizontal, vertical, strict=True)):
        g, r, r_h = gates[i], v.down.out_features, h.down.out_features
        a, t_later = t.split([r, t.shape[1] - r], 1)
        weight = torch.cat([h.down.weight, *down_v[i + 1:]])  # [D_h; F]
        q = _Project.apply(flat[i + 1], weight)
        c, q_later = q.split([r_h, q.shape[1] - r_h], 1)
        z = torch.cat([F.gelu(a + v.down.bias) * (1 - g), F.gelu(c + h.down.bias) * g, a.new_ones(len(a), 1)], 1)
        w = torch.cat([v.up.weight, h.up.weight, torch.lerp(v.up.bias, h.up.bias, g)[:, None]], 1)
        if i + 1 < len(vertical):
            t = torch.lerp(t_later, q_later, g) + z @ (w.t() @ weight[r_h:].t())
        # p + g (pool(x) - p), not lerp: autograd keeps one (B, D) difference per step instead of both ends (and
        # never a pooled view, which would keep the whole float32 cast of a low-precision tap).
        p = p + g * (pool(features[i + 1].to(dtype)) - p) + pool(z.view(*lead, -1)) @ w.t()
    return p


def kept_per_row(vertical_ranks: list[int], horizontal_ranks: list[int], width: int, positions: int) -> float:
    """How many float32 values per position `pooled_bypass` keeps for backward besides the features (measured
    against autograd in a test): each step's t_i and q_i and its activations, and per example and step the
    (D,) difference of pooled states and the pooled z_i. The checkpointed steps keep b_1 ... b_{L-1}, (L - 1) D."""
    depth = len(vertical_ranks)
    later = [sum(vertical_ranks[i:]) for i in range(depth)] + [0]
    columns = sum(later[i] + r_h + later[i + 1] + (3 * (r_v + r_h) + 1 if i + 1 < depth else r_v + r_h)
                  for i, (r_v, r_h) in enumerate(zip(vertical_ranks, horizontal_ranks, strict=True)))
    per_example = sum(width + r_v + r_h + 1 for r_v, r_h in zip(vertical_ranks, horizontal_ranks, strict=True))
    return columns + per_example / positions
