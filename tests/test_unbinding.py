"""Exact unbinding (paper Sec. 2, Table 1): the unbound Res-Tuners reproduce the bound methods."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES

from restuning.attention import additive_mask, attend, mix_prefix
from restuning.bound import compare_forms

TOL = 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model_name", ["vit", "bert"])
@pytest.mark.parametrize("form", ["prefix", "prompt", "adapter"])
def test_unbound_form_equals_bound(form, model_name, attn):
    case = CASES[model_name]
    result = compare_forms(case.model(attn), case.inputs(), form, tokens=5)
    assert result.output_diff < TOL, result
    assert result.grad_diff < TOL, result


def test_prefix_identity_with_padding_mask():
    """mix_prefix equals softmax over the concatenated keys; ignoring the mask breaks it."""
    g = torch.Generator().manual_seed(0)
    b, h, t, n, d = 2, 3, 6, 4, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    k_pre, v_pre = torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g)
    keep = torch.ones(b, 1, 1, t, dtype=torch.bool)
    keep[1, ..., 3:] = False
    mask = additive_mask(keep, False, t, t, q.device)
    scale = d**-0.5
    context, _ = attend(q, k, v, scale, mask)
    joined_mask = torch.cat([torch.zeros(b, 1, 1, n), mask.expand(b, 1, 1, t)], dim=-1)
    expected, _ = attend(q, torch.cat([k_pre.expand(b, -1, -1, -1), k], 2),
                         torch.cat([v_pre.expand(b, -1, -1, -1), v], 2), scale, joined_mask)
    torch.testing.assert_close(mix_prefix(context, q, k, k_pre, v_pre, scale, mask), expected, atol=1e-6, rtol=0)
    unmasked = mix_prefix(context, q, k, k_pre, v_pre, scale, None)
    assert (unmasked - expected).abs().max() > 1e-3
