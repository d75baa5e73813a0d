"""One bypass step with Res-Adapters as both `H_l` and `V_l`, in few passes over the (N, D) tensors.

The plain step, `lerp(b + up_v(gelu(down_v(b))), x + up_h(gelu(down_h(x))), lam)`, makes about eleven passes
over full-width tensors forward and twice that in backward (each residual add, each up projection's output,
the lerp and their gradients). With tokens in the thousands and a rank of 10 those passes, not the products,
are the step's time (issue 14 measured 11 GFLOP/s against 300 for a square GEMM). Rewritten exactly:

    out = lerp(b, x, lam) + [(1 - lam) g_v, lam g_h, 1] @ [W_up_v, W_up_h, (1 - lam) c_v + lam c_h]^T

with `g = gelu(down(.))` (N, r) and `c` the up biases: one lerp and one `addmm` forward. Backward reads the
output gradient a few times (two small products, two dot products for the gate, one `addmm` that writes
`b`'s gradient) and saves only `b`, `x` and the two (N, r) pre-activations. The same numbers as the plain
step to float rounding (tested against it in float64 and float32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..tuners.adapter import ResAdapter


def fusable(horizontal: nn.Module | None, vertical: nn.Module | None) -> bool:
    """Whether a step whose `H_l` tuner is `horizontal` and `V_l` tuner `vertical` can run as `fused_step`:
    both Res-Adapters reading their input, with the exact GELU and no scale."""
    def plain(tuner: nn.Module | None) -> bool:
        return (type(tuner) is ResAdapter and tuner.reads == "input" and tuner.scale == 1
                and type(tuner.act) is nn.GELU and tuner.act.approximate == "none")
    return plain(horizontal) and plain(vertical)


def fused_step(b: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, horizontal: ResAdapter,
               vertical: ResAdapter) -> torch.Tensor:
    """b: b_{l-1} (..., D); x: x_l (..., D), the same shape and dtype; theta: the scalar gate logit theta_l.
    Returns b_l (..., D) = (1 - lam) V_l(b) + lam H_l(x), lam = sigmoid(theta)."""
    h, v = horizontal, vertical
    return _FusedStep.apply(b, x, theta, h.down.weight, h.down.bias, h.up.weight, h.up.bias,
                            v.down.weight, v.down.bias, v.up.weight, v.up.bias)


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, x, theta, down_h, bias_down_h, up_h, bias_up_h, down_v, bias_down_v, up_v, bias_up_v):
        lam = torch.sigmoid(theta)
        b2, x2 = b.reshape(-1, b.shape[-1]), x.reshape(-1, x.shape[-1])
        pre_h = torch.addmm(bias_down_h, x2, down_h.t())  # (N, r_h)
        pre_v = torch.addmm(bias_down_v, b2, down_v.t())  # (N, r_v)
        hidden = torch.cat([F.gelu(pre_v) * (1 - lam), F.gelu(pre_h) * lam, pre_h.new_ones(len(pre_h), 1)], 1)
        weight = torch.cat([up_v, up_h, ((1 - lam) * bias_up_v + lam * bias_up_h)[:, None]], 1)  # (D, r_v+r_h+1)
        out = torch.addmm(torch.lerp(b2, x2, lam), hidden, weight.t())
        ctx.save_for_backward(b, x, theta, pre_h, pre_v, down_h, up_h, bias_up_h, down_v, up_v, bias_up_v)
        return out.view(b.shape)

    @staticmethod
    def backward(ctx, grad):
        b, x, theta, pre_h, pre_v, down_h, up_h, bias_up_h, down_v, up_v, bias_up_v = ctx.saved_tensors
        lam = torch.sigmoid(theta)
        r_v = pre_v.shape[1]
        g2 = grad.reshape(-1, grad.shape[-1])
        b2, x2 = b.reshape(-1, b.shape[-1]), x.reshape(-1, x.shape[-1])
        act_v, act_h = F.gelu(pre_v), F.gelu(pre_h)
        # grad^T [g_v, g_h, 1]: the up weights' gradients before their gate factors, and the bias gradient.
        m = g2.t() @ torch.cat([act_v, act_h, pre_h.new_ones(len(pre_h), 1)], 1)
        m_v, m_h, total = m[:, :r_v], m[:, r_v:-1], m[:, -1]
        # d out / d lam = (x - b) + up_h(g_h) - up_v(g_v), read against the gradient.
        grad_lam = (torch.vdot(g2.flatten(), x2.flatten()) - torch.vdot(g2.flatten(), b2.flatten())
                    + (m_h * up_h).sum() + total @ bias_up_h - (m_v * up_v).sum() - total @ bias_up_v)
        hidden_grad = g2 @ torch.cat([up_v, up_h], 1)  # (N, r_v + r_h)
        pre_grad_v = torch.ops.aten.gelu_backward(hidden_grad[:, :r_v] * (1 - lam), pre_v)
        pre_grad_h = torch.ops.aten.gelu_backward(hidden_grad[:, r_v:] * lam, pre_h)
        grad_b = None
        if ctx.needs_input_grad[0]:
            if g2.device.type == "cpu" and not torch.compiler.is_compiling():
                # (1 - lam) grad + the down projection's input gradient in one pass; reading the gate
                # on the host would stall an accelerator and break a compiled graph, hence the CPU only.
                grad_b = torch.addmm(g2, pre_grad_v, down_v, beta=1 - lam.item())
            else:
                grad_b = g2.mul(1 - lam).addmm_(pre_grad_v, down_v)
            grad_b = grad_b.view(b.shape)
        grad_x = None
        if ctx.needs_input_grad[1]:  # x_l from a block run again on the bypass state (`reinject`)
            grad_x = g2.mul(lam).addmm_(pre_grad_h, down_h).view(x.shape)
        return (grad_b, grad_x, grad_lam * lam * (1 - lam),
                pre_grad_h.t() @ x2, pre_grad_h.sum(0), lam * m_h, lam * total,
                pre_grad_v.t() @ b2, pre_grad_v.sum(0), (1 - lam) * m_v, (1 - lam) * total)
