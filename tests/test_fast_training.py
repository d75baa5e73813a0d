"""Fast cached training: the skinny projection equals the plain form, AdamW takes torch's fused kernel, the
bypass trained from cached features does not recompute, and `torch.compile` of the task falls back to eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CASES
from torch import nn

import restuning
from restuning import BypassConfig, FeatureCache, checkpoint
from restuning.train.optim import adamw, adamw_implementation
from restuning.tuners.skinny import SkinnyLinear, skinny_linear

TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 10), (4, 16, 10), (2, 3, 5, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_the_plain_linear_forward_and_backward(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(10, 48, bias=bias)
    skinny = SkinnyLinear(10, 48, bias=bias)
    skinny.load_state_dict(plain.state_dict())
    h = torch.randn(shape)
    h_plain, h_skinny = h.clone().requires_grad_(), h.clone().requires_grad_()
    g = torch.randn(*shape[:-1], 48)
    y_plain, y_skinny = plain(h_plain), skinny(h_skinny)
    torch.testing.assert_close(y_skinny, y_plain, **TOL)
    (y_plain * g).sum().backward()
    (y_skinny * g).sum().backward()
    torch.testing.assert_close(h_skinny.grad, h_plain.grad, **TOL)
    torch.testing.assert_close(skinny.weight.grad, plain.weight.grad, **TOL)
    assert skinny.weight.grad.shape == (48, 10) and skinny.weight.grad.is_contiguous()
    if bias:
        torch.testing.assert_close(skinny.bias.grad, plain.bias.grad, **TOL)
    assert skinny.state_dict().keys() == plain.state_dict().keys()


def test_skinny_linear_takes_the_custom_backward_only_where_it_applies():
    weight = torch.randn(8, 3, requires_grad=True)
    h = torch.randn(5, 3)
    assert skinny_linear(h, weight).grad_fn.name().endswith("_SkinnyLinearBackward")
    with torch.no_grad():
        assert skinny_linear(h, weight).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = skinny_linear(h, weight)
    assert out.dtype == torch.bfloat16 and "Skinny" not in out.grad_fn.name()  # autocast's own casts
    # A frozen weight and a leaf input that needs no gradient: no work for the input gradient either.
    frozen = torch.randn(8, 3)
    x = torch.randn(5, 3, requires_grad=True)
    skinny_linear(x, frozen).sum().backward()
    torch.testing.assert_close(x.grad, frozen.sum(0).expand(5, 3), **TOL)


def test_adamw_is_fused_on_cpu_and_takes_the_same_steps():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    assert adamw_implementation(params) == "fused"
    assert adamw_implementation([torch.randn(2, device="meta", requires_grad=True)]) == "single"
    with pytest.raises(ValueError, match="fused, foreach or single"):
        adamw(params, 1e-2, 0.0, implementation="fast")
    runs = {}
    for how in ("fused", "foreach", "single"):
        copies = [p.detach().clone().requires_grad_() for p in params]
        opt = adamw(copies, lr=1e-2, weight_decay=0.05, implementation=how)
        assert opt.defaults["fused"] is (True if how == "fused" else None)
        for step in range(3):
            opt.zero_grad()
            sum(((p - step) ** 2).sum() for p in copies).backward()
            opt.step()
        runs[how] = copies
    assert not torch.equal(runs["single"][0], params[0])
    for how in ("fused", "foreach"):
        for a, b in zip(runs[how], runs["single"], strict=True):
            torch.testing.assert_close(a, b, **TOL)


def _mean_bypass():
    torch.manual_seed(0)
    model = CASES["bert"].model()
    torch.manual_seed(1)
    tuned = restuning.get_restuning_model(model, BypassConfig(num_classes=3))
    with torch.no_grad():
        for p in tuned.task.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tuned.train()


def _count_steps(model) -> list[int]:
    calls = [0]
    step = model.task.bypass._step

    def counted(*args):
        calls[0] += 1
        return step(*args)

    model.task.bypass._step = counted
    return calls


def test_cached_features_do_not_recompute_and_give_the_same_gradients():
    inputs = CASES["bert"].inputs()
    target = torch.tensor([0, 2])
    grads = {}
    for source in ("live", "cached"):
        model = _mean_bypass()
        assert model.bypass_config.recompute and not model.task.first_token_only
        calls = _count_steps(model)
        if source == "live":
            logits = model(**inputs)
        else:
            features, mask = FeatureCache().get(model, inputs).batch(torch.arange(2))
            logits = model(features=features, attention_mask=mask)
        nn.functional.cross_entropy(logits, target).backward()
        depth = len(model.task.layers)
        assert calls[0] == (2 * depth if source == "live" else depth), (source, calls[0])
        grads[source] = {n: p.grad for n, p in model.task.named_parameters()}
    for name, grad in grads["live"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["cached"][name], grad, **TOL)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compiling_the_task_falls_back_to_eager_with_a_warning(tmp_path):
    model = _mean_bypass()
    features, mask = FeatureCache().get(model, CASES["bert"].inputs()).batch(torch.arange(2))
    eager = model.forward_features(features, mask)
    compiled = model.compile_task(backend=_broken_backend)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = model.forward_features(features, mask)
    assert not compiled.compiled and "no compiler here" in compiled.failure
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    model.save_pretrained(tmp_path)  # the task module itself was never replaced: the same checkpoint keys
    assert set(checkpoint.load(tmp_path)[1]) == set(model.task.state_dict())
    assert model.compile_task(enabled=False) is None


def test_a_compiled_task_equals_the_eager_one():
    model = _mean_bypass()
    features, mask = FeatureCache().get(model, CASES["bert"].inputs()).batch(torch.arange(2))
    eager = model.forward_features(features, mask)
    grads = torch.autograd.grad(eager.sum(), list(model.task.parameters()))
    compiled = model.compile_task(backend="aot_eager")
    out = model.forward_features(features, mask)
    assert compiled.compiled, compiled.failure
    torch.testing.assert_close(out, eager, **TOL)
    for a, b in zip(torch.autograd.grad(out.sum(), list(model.task.parameters())), grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# The fused bypass step (restuning/bypass/fused.py) against the plain step it replaces.


def _networks(dtype: torch.dtype, **config):
    from restuning.bypass.network import BypassNetwork

    torch.manual_seed(0)
    fused = BypassNetwork([16] * 5, BypassConfig(**config), "tokens").to(dtype)
    for p in fused.parameters():  # away from the zero init, so every term of the step counts
        torch.nn.init.normal_(p, std=0.3)
    plain = copy.deepcopy(fused)
    plain.fused = [False] * len(plain.fused)
    return fused, plain


@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(atol=1e-12, rtol=1e-12)),
                                        (torch.float32, dict(atol=1e-5, rtol=1e-5))])
@pytest.mark.parametrize("recompute", [False, True])
def test_the_fused_step_equals_the_plain_step_forward_and_backward(dtype, tol, recompute):
    fused, plain = _networks(dtype, horizontal={"name": "res_adapter", "dim": 3},
                             vertical={"name": "res_adapter", "dim": 5})
    assert all(fused.fused)
    features = [torch.randn(2, 7, 16, dtype=dtype) for _ in range(5)]
    features[0].requires_grad_()  # b_0's gradient goes through every V_l
    features[3].requires_grad_()  # as a block run again on the bypass state (`reinject`) makes x_l
    results = []
    for net in (fused, plain):
        features[0].grad = features[3].grad = None
        out = net(features, recompute=recompute)
        (out * torch.linspace(-1, 1, 16, dtype=dtype)).sum().backward()
        results.append((out, [features[0].grad, features[3].grad], {n: p.grad for n, p in net.named_parameters()}))
    (out_f, grad_f, params_f), (out_p, grad_p, params_p) = results
    torch.testing.assert_close(out_f, out_p, **tol)
    torch.testing.assert_close(grad_f, grad_p, **tol)
    assert grad_f[1].abs().sum() > 0
    assert params_f.keys() == params_p.keys()
    for name in params_f:
        torch.testing.assert_close(params_f[name], params_p[name], **tol, msg=name)
    if not recompute:  # (under recompute the step runs inside the checkpoint)
        assert "_FusedStep" in type(out_f.grad_fn).__name__


def test_the_fused_step_runs_only_where_its_rewrite_is_exact():
    from restuning.bypass.fused import fusable

    assert all(_networks(torch.float32)[0].fused)  # the default: Dual Res-Adapters
    for config in (dict(vertical=None), dict(horizontal=None),
                   dict(horizontal={"name": "res_adapter", "options": {"act": "relu"}}),
                   dict(vertical={"name": "res_adapter", "options": {"scale": 0.5}}),
                   dict(horizontal={"name": "res_adapter", "options": {"reads": "output"}}),
                   dict(horizontal="lora")):
        assert not any(_networks(torch.float32, **config)[0].fused), config
    assert not fusable(None, None)


def test_the_fused_step_keeps_the_bypass_state_trainable_under_autocast_by_falling_back():
    fused, plain = _networks(torch.float32)
    features = [torch.randn(2, 3, 16) for _ in range(5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_p = fused(features, recompute=False), plain(features, recompute=False)
    assert "_FusedStep" not in type(out_f.grad_fn).__name__
    torch.testing.assert_close(out_f, out_p)
