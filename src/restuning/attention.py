"""Attention math shared by the prefix/prompt tuners and the bound reference forms.

Shapes: B batch, H heads, T query tokens, S key tokens, n prefix tokens, d head size.
The unbinding identity (paper eq. 3, appendix A) is

    softmax([S_pre, S]) [V_pre; V] = (1 - lam) Attn(Q, K, V) + lam Attn(Q, K_pre, V_pre),
    lam = sigmoid(logsumexp(S_pre) - logsumexp(S))        per query row.
"""

from __future__ import annotations

import torch


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    b, n, width = t.shape
    return t.view(b, n, heads, width // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, S, d) -> (B, heads, S, d): each key/value head serves `heads // H_kv` query heads in turn
    (grouped-query attention, transformers' `repeat_kv`)."""
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' Llama-style models apply it after the projections:
    t: (B, H, T, d); cos, sin: (B|1, T, r), r <= d (the first r features rotate, `rotate_half` convention)."""
    cos, sin = cos.unsqueeze(1).to(t.dtype), sin.unsqueeze(1).to(t.dtype)
    r = cos.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    half = torch.cat((-rot[..., r // 2:], rot[..., : r // 2]), dim=-1)
    return torch.cat((rot * cos + half * sin, rest), dim=-1)


def additive_mask(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """Normalise a transformers attention mask to a float32 additive mask broadcastable to (B, H, T, S).

    transformers passes an additive float mask to eager attention, a boolean "keep" mask to SDPA,
    and may pass `None` with `is_causal=True` (CLIP text under SDPA). diffusers passes an additive
    (B, T|1, S) mask without the head axis (a UNet's `encoder_attention_mask`).
    """
    if mask is None:
        if not is_causal:
            return None
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = keep[None, None]
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return out.masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.float().clamp(min=torch.finfo(torch.float32).min)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-normaliser of each query row.

    q: (B, H, T, d); k, v: (B|1, H, S, d); mask: additive, broadcastable to (B, H, T, S).
    Returns out (B, H, T, d) in q's dtype and lse (B, H, T, 1).
    Scores are formed in at least float32 (bfloat16 runs keep the identity to bf16 rounding; float64
    runs stay float64).
    """
    scores = _scores(q, k, scale, mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse), v.to(scores.dtype))
    return out.to(q.dtype), lse


def log_normaliser(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """logsumexp of each query row's scores, (B, H, T, 1), at least float32."""
    return torch.logsumexp(_scores(q, k, scale, mask), dim=-1, keepdim=True)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    return scores if mask is None else scores + mask.to(dtype)


def mix_prefix(
    context: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    k_pre: torch.Tensor,
    v_pre: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Exact unbound prefix attention.

    context: the frozen attention's output Attn(Q, K, V), (B, H, T, d).
    q, k: the frozen queries and keys, (B, H, T, d) and (B, H, S, d).
    k_pre, v_pre: prefix keys and values, (B|1, H, n, d).
    Returns (1 - lam) * context + lam * Attn(Q, K_pre, V_pre), (B, H, T, d).
    """
    lse = log_normaliser(q, k, scale, mask)
    prefix_out, lse_pre = attend(q, k_pre, v_pre, scale)
    lam = torch.sigmoid(lse_pre - lse).to(context.dtype)
    return (1 - lam) * context + lam * prefix_out
