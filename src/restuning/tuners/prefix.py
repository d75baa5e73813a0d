"""Res-Prefix: attention of the op's frozen queries over learnable prefix keys and values.

On an MHA (paper eq. 3) it rewrites the per-head context before the frozen output projection:
- mode "gated" (default, zero at init): context + g * Attn(Q, K_pre, V_pre), g a per-head gate = 0;
- mode "exact": (1 - lam) * context + lam * Attn(Q, K_pre, V_pre) with lam from the log-normalisers,
  which equals prefix tuning with K_pre, V_pre concatenated to the keys and values.
On any other op (FFN, block, ...) it is a free tuner: `g * softmax(x K_pre^T / sqrt(D)) V_pre`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import attend, merge_heads, mix_prefix, repeat_kv, split_heads
from ..errors import ConfigError
from .base import AttentionTuner, OpContext, register_tuner

MODES = ("gated", "exact")


class _PrefixLike(AttentionTuner):
    """Shared machinery of Res-Prefix and Res-Prompt: subclasses say where K and V come from."""

    option_choices = {"mode": MODES}

    def __init__(self, ctx: OpContext, dim: int, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"{self.name} mode: expected one of {MODES}, got {mode!r}")
        self.mode, self.tokens, self._attention = mode, dim, ctx.attention
        if mode == "exact" and ctx.attention is not None and not ctx.attention.exact:
            raise ConfigError(
                f"{self.name} mode 'exact': this attention adds relative-position terms to its scores (DeBERTa, Swin), "
                "so the prefix identity does not hold for it; use mode 'gated'"
            )
        heads = ctx.attention.num_heads if ctx.attention is not None else 1
        self.gate = nn.Parameter(torch.zeros(heads, 1, 1)) if mode == "gated" else None

    @property
    def uses_attention(self) -> bool:
        return self._attention is not None

    @property
    def needs_keys(self) -> bool:
        return self.mode == "exact"

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values: (1, H_kv, n, d) each on an MHA (no position: RoPE never rotates them, as in
        prefix tuning), (n, D) each elsewhere."""
        raise NotImplementedError

    def mix(self, context, query, key, mask):
        heads = self._attention.num_heads
        q, ctx_h = query, split_heads(context, heads)
        k_pre, v_pre = (repeat_kv(t, heads) for t in self.prefix_kv())
        scale = self._attention.score_scale
        if self.mode == "exact":
            out = mix_prefix(ctx_h, q, repeat_kv(key, heads), k_pre, v_pre, scale, mask)
        else:
            prefix_out, _ = attend(q, k_pre, v_pre, scale)
            out = ctx_h + self.gate.to(ctx_h.dtype) * prefix_out
        return merge_heads(out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, v = self.prefix_kv()
        out, _ = attend(x.unsqueeze(1), k[None, None], v[None, None], x.shape[-1] ** -0.5)  # one head
        out = out.squeeze(1)
        if self.gate is not None:
            out = self.gate.view(()) * out
        return out.to(y.dtype)


@register_tuner("res_prefix")
class ResPrefix(_PrefixLike):
    """Learnable prefix keys and values; its options' meanings are in `option_help`."""

    option_help = {"dim": "number of prefix tokens (paper default 10)",
                   "mode": "`gated` (a learnable gate, zero at init) or `exact` (the weight `lam` that equals prefix "
                           "tuning)",
                   "init_std": "standard deviation of the prefix keys at init"}

    def __init__(self, ctx: OpContext, dim: int, mode: str = "gated", init_std: float = 0.02):
        super().__init__(ctx, dim, mode)
        if ctx.attention is not None:
            shape_k = shape_v = (ctx.attention.num_kv_heads, dim, ctx.attention.head_dim)
        else:
            shape_k, shape_v = (dim, ctx.in_features), (dim, ctx.out_features)
        self.prefix_key = nn.Parameter(torch.randn(shape_k) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape_v))

    def prefix_kv(self):
        if self._attention is not None:
            return self.prefix_key.unsqueeze(0), self.prefix_value.unsqueeze(0)
        return self.prefix_key, self.prefix_value
