"""Res-Prompt: prompt tokens whose keys and values come from the op's own frozen projections.

On an MHA (paper eq. 5) `K_pro = N(p) W_k + b_k`, `V_pro = N(p) W_v + b_v`, with N the block's frozen
pre-norm (identity for a post-norm block), then the Res-Prefix mixing: in mode "exact" this equals
VPT-deep (prompts joined to every block's input and dropped after it) for the real tokens.
On a cross-attention the prompts live where its keys come from (width of W_k's input, no norm): in mode
"exact" this equals joining them to that attention's other sequence (the text states of a UNet).
On any other op the prompts are used directly as keys and values.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import split_heads
from ..precision import run_frozen
from .base import OpContext, register_tuner
from .prefix import _PrefixLike


@register_tuner("res_prompt")
class ResPrompt(_PrefixLike):
    """Learnable prompt tokens through the op's frozen projections; its options' meanings are in `option_help`."""

    option_help = {"dim": "number of prompt tokens (paper default 10)",
                   "mode": "`gated` (a learnable gate, zero at init) or `exact` (equals VPT-deep for the real tokens)"}

    def __init__(self, ctx: OpContext, dim: int, mode: str = "gated"):
        super().__init__(ctx, dim, mode)
        if ctx.attention is None and ctx.in_features != ctx.out_features:
            raise ValueError(
                f"res_prompt off an attention needs equal input and output widths, got "
                f"{ctx.in_features} -> {ctx.out_features}"
            )
        width = ctx.attention.in_width if ctx.attention is not None else ctx.in_features
        self.prompt = nn.Parameter(torch.randn(dim, width))

    def prefix_kv(self):
        if self._attention is None:
            return self.prompt, self.prompt
        att = self._attention
        tokens = self.prompt.unsqueeze(0)  # (1, n, D)
        if att.norm is not None:
            tokens = run_frozen(att.norm, tokens)
        keys, values = att.keys_values(tokens)
        return split_heads(keys, att.num_kv_heads), split_heads(values, att.num_kv_heads)
