"""Fast cached training: the skinny projection equals the plain form, AdamW takes torch's fused kernel, the
bypass trained from cached features does not recompute, and `torch.compile` of the task falls back to eager."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import CASES
from torch import nn

import restuning
from restuning import BypassConfig, FeatureCache, checkpoint
from restuning.train.optim import adamw, adamw_implementation
from restuning.tuners.skinny import SkinnyLinear, skinny_linear

TOL = dict(atol=1e-6, rtol=1e-6)
SMALL = {"name": "res_adapter", "dim": 1}  # ranks small beside BERT's width of 32: the pooled form keeps less


@pytest.mark.parametrize("shape", [(64, 10), (4, 16, 10), (2, 3, 5, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_linear_equals_the_plain_linear_forward_and_backward(shape, bias):
    # In float64, so that what is compared is the formulas: in float32 the two backward products may run
    # through different BLAS kernels, whose rounding differs by about 1e-6 on some machines.
    exact = dict(atol=1e-12, rtol=1e-12)
    torch.manual_seed(0)
    plain = nn.Linear(10, 48, bias=bias).double()
    skinny = SkinnyLinear(10, 48, bias=bias).double()
    skinny.load_state_dict(plain.state_dict())
    h = torch.randn(shape, dtype=torch.float64)
    h_plain, h_skinny = h.clone().requires_grad_(), h.clone().requires_grad_()
    g = torch.randn(*shape[:-1], 48, dtype=torch.float64)
    y_plain, y_skinny = plain(h_plain), skinny(h_skinny)
    torch.testing.assert_close(y_skinny, y_plain, **exact)
    (y_plain * g).sum().backward()
    (y_skinny * g).sum().backward()
    assert "Skinny" in y_skinny.grad_fn.name()
    torch.testing.assert_close(h_skinny.grad, h_plain.grad, **exact)
    torch.testing.assert_close(skinny.weight.grad, plain.weight.grad, **exact)
    assert skinny.weight.grad.shape == (48, 10) and skinny.weight.grad.is_contiguous()
    if bias:
        torch.testing.assert_close(skinny.bias.grad, plain.bias.grad, **exact)
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


def _mean_bypass(**config):
    torch.manual_seed(0)
    model = CASES["bert"].model()
    torch.manual_seed(1)
    tuned = restuning.get_restuning_model(model, BypassConfig(num_classes=3, **config))
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
        model.task.pooled_form = False  # step by step, which recomputes live (the pooled form never needs to)
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


@pytest.mark.parametrize("pooled", [False, True])
def test_a_compiled_task_equals_the_eager_one(pooled):
    model = _mean_bypass(**(dict(horizontal=SMALL, vertical=SMALL) if pooled else {}))
    features, mask = FeatureCache().get(model, CASES["bert"].inputs()).batch(torch.arange(2))
    assert model.task.reads_pooled(model.task.chosen(features), model.final_norm) is pooled
    eager = model.forward_features(features, mask)
    grads = torch.autograd.grad(eager.sum(), list(model.task.parameters()))
    compiled = model.compile_task(backend="aot_eager")
    out = model.forward_features(features, mask)
    assert compiled.compiled, compiled.failure
    torch.testing.assert_close(out, eager, **TOL)
    for a, b in zip(torch.autograd.grad(out.sum(), list(model.task.parameters())), grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# The fused bypass step (restuning/bypass/fused.py) against the plain step it replaces.


def _networks(dtype: torch.dtype, width: int = 16, **config):
    from restuning.bypass.network import BypassNetwork

    torch.manual_seed(0)
    fused = BypassNetwork([width] * 5, BypassConfig(**config), "tokens").to(dtype)
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


def _map_networks(widths: list[int]):
    """A fused map bypass whose steps resample and project (`widths` of its layers) and its plain twin."""
    from restuning.bypass.network import BypassNetwork

    torch.manual_seed(0)
    config = BypassConfig(horizontal={"name": "res_adapter", "dim": 3}, vertical={"name": "res_adapter", "dim": 2})
    fused = BypassNetwork(widths, config, "map").double()
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.3)
    plain = copy.deepcopy(fused)
    plain.fused = [False] * len(plain.fused)
    return fused, plain


@pytest.mark.parametrize("recompute", [False, True])
def test_the_fused_step_carries_a_map_to_other_sizes_and_widths_as_the_plain_step_does(recompute):
    # A UNet decoder's shape: the resolution grows, the width stays, then grows and halves, then shrinks.
    exact = dict(atol=1e-12, rtol=1e-12)
    sides, widths = [4, 4, 8, 16, 16, 8], [12, 12, 12, 6, 3, 5]
    fused, plain = _map_networks(widths)
    assert all(fused.fused) and sum(v.project is not None for v in fused.vertical) == 3
    features = [torch.randn(2, side, side, width, dtype=torch.float64) for side, width in zip(sides, widths)]
    features[0].requires_grad_()
    weight = torch.randn(2, 8, 8, 5, dtype=torch.float64)
    results = []
    for net in (fused, plain):
        features[0].grad = None
        out = net(features, recompute=recompute)
        (out * weight).sum().backward()
        results.append((out, features[0].grad, {n: p.grad for n, p in net.named_parameters()}))
    (out_f, grad_f, params_f), (out_p, grad_p, params_p) = results
    torch.testing.assert_close(out_f, out_p, **exact)
    torch.testing.assert_close(grad_f, grad_p, **exact)
    for name in params_f:
        torch.testing.assert_close(params_f[name], params_p[name], **exact, msg=name)


@pytest.mark.parametrize("side, width, to_side, to_width, project_first",
                         [(4, 16, 8, 8, True), (4, 8, 8, 16, True), (8, 8, 4, 16, False), (8, 16, 4, 8, False),
                          (8, 32, 4, 2, True), (4, 8, 8, 8, False)])
def test_carrying_the_state_projects_first_where_that_keeps_less_with_the_same_numbers(side, width, to_side,
                                                                                      to_width, project_first):
    from restuning.bypass.network import VerticalStep
    from restuning.memory import SavedTensorMeter
    from restuning.spatial import resample

    torch.manual_seed(0)
    step = VerticalStep(width, to_width, None, "map").double()
    if step.project is not None:
        torch.nn.init.normal_(step.project.bias)
    b = torch.randn(2, side, side, width, dtype=torch.float64, requires_grad=True)
    like = torch.empty(2, to_side, to_side, to_width, dtype=torch.float64)
    with SavedTensorMeter(step.parameters()) as meter:
        carried = step.carry(b, like)
    resampled = resample(b.movedim(-1, 1), (to_side, to_side)).movedim(1, -1)
    reference = resampled if step.project is None else step.project(resampled)
    torch.testing.assert_close(carried, reference, atol=1e-12, rtol=1e-12)
    # The projection keeps its input for its weight's gradient, and area averaging (shrinking) its own input;
    # growing keeps nothing. So the first of the two keeps b, the second the intermediate, if it keeps anything.
    shrinking, positions = to_side < side, 2 * to_side * to_side
    intermediate = 2 * side * side * to_width if project_first else positions * width
    second_keeps = (shrinking if project_first else step.project is not None)
    kept = 8 * (b.numel() * (project_first or shrinking) + intermediate * second_keeps)
    assert meter.bytes == kept, (meter.bytes, kept)


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


# The pooled form (restuning/bypass/pooled.py) against the step-by-step bypass it reads out.

POOLINGS = [("mean", True), ("mean", False), ("avg", False), ("cls", False), ("last", True), ("last", False)]


def _mask() -> torch.Tensor:
    mask = torch.ones(3, 7)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return mask


@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(atol=1e-12, rtol=1e-12)),
                                        (torch.float32, dict(atol=1e-5, rtol=1e-5))])
@pytest.mark.parametrize("how, masked", POOLINGS)
def test_the_pooled_form_equals_pooling_the_step_by_step_bypass(dtype, tol, how, masked):
    from restuning.bypass.pooling import LinearPool

    net, _ = _networks(dtype, width=128, horizontal={"name": "res_adapter", "dim": 3},
                       vertical={"name": "res_adapter", "dim": 5})
    features = [torch.randn(3, 7, 128, dtype=dtype, requires_grad=True) for _ in range(5)]
    assert net.pooled_form_applies(features)
    pool = LinearPool(how, _mask() if masked else None, dtype)
    step_by_step, pooled = pool(net(features, recompute=False)), net.pooled(features, pool)
    torch.testing.assert_close(pooled, step_by_step, **tol)
    grad = torch.randn_like(pooled)
    inputs = [*net.parameters(), *features]
    for a, b, name in zip(torch.autograd.grad(pooled, inputs, grad), torch.autograd.grad(step_by_step, inputs, grad),
                          [n for n, _ in net.named_parameters()] + [f"x_{i}" for i in range(5)], strict=True):
        assert b.abs().sum() > 0 or name.startswith("x_"), name
        # Float rounding of sums reordered: bounded by the tensor's largest entry, not each entry's own size.
        torch.testing.assert_close(a, b, atol=tol["atol"] * b.abs().max().item(), rtol=tol["rtol"],
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_masked_mean_pooling_keeps_its_input_dtype_under_autocast():
    from restuning.bypass.pooling import pool

    b = torch.randn(3, 7, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pool(b, "mean", _mask())
    expected = (b * _mask()[..., None]).sum(1) / _mask().sum(1, keepdim=True).clamp_min(1)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-6)


def test_the_task_reads_the_pooled_form_where_its_read_out_is_linear_and_trains_the_same():
    inputs, target = CASES["bert"].inputs(), torch.tensor([0, 2])
    runs = {}
    for pooled in (True, False):
        model = _mean_bypass(horizontal=SMALL, vertical=SMALL)
        model.task.pooled_form = pooled
        features, mask = FeatureCache().get(model, inputs).batch(torch.arange(2))
        assert model.task.reads_pooled(model.task.chosen(features), model.final_norm) is pooled
        calls = _count_steps(model)
        logits = model(features=features, attention_mask=mask)
        nn.functional.cross_entropy(logits, target).backward()
        assert calls[0] == (0 if pooled else len(model.task.layers))  # no b_l is made in the pooled form
        runs[pooled] = logits, {n: p.grad for n, p in model.task.named_parameters()}
    torch.testing.assert_close(runs[True][0], runs[False][0], **TOL)
    for name, grad in runs[False][1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(runs[True][1][name], grad, **TOL, msg=name)


@pytest.mark.parametrize("config", [dict(pooling="attention"), dict(horizontal={"name": "lora", "dim": 1}),
                                    dict(combine="softmax", vertical=None),
                                    dict(vertical={"name": "res_adapter", "dim": 1, "options": {"act": "relu"}}),
                                    dict(reinject=1)])
def test_the_pooled_form_is_not_taken_where_it_would_not_be_exact(config):
    def reads_pooled(**options) -> bool:
        torch.manual_seed(0)
        model = restuning.get_restuning_model(CASES["bert"].model(), BypassConfig(num_classes=3, **options))
        features, _ = FeatureCache().get(model, CASES["bert"].inputs()).batch(torch.arange(2)) \
            if not model.bypass_config.reinject else (model.features(**CASES["bert"].inputs()), None)
        return model.task.reads_pooled(model.task.chosen(features), model.final_norm)

    assert reads_pooled(horizontal=SMALL, vertical=SMALL)  # the same model without the change takes it
    assert not reads_pooled(**{"horizontal": SMALL, "vertical": SMALL, **config})


def test_the_pooled_form_is_not_taken_on_maps_handed_over_channels_first():
    """Channels-last views of (B, C, H, W) maps would be copied into (N, C) rows and kept: more than it saves."""
    from restuning.bypass.network import BypassNetwork

    net = BypassNetwork([128] * 5, BypassConfig(vertical={"name": "res_adapter", "dim": 2},
                                                horizontal={"name": "res_adapter", "dim": 2}), "map")
    maps = [torch.randn(2, 128, 8, 8) for _ in range(5)]
    assert net.pooled_form_applies([m.movedim(1, -1).contiguous() for m in maps])
    assert not net.pooled_form_applies([m.movedim(1, -1) for m in maps])


def test_the_pooled_form_is_not_taken_under_autocast_or_with_the_final_norm_before_pooling():
    model = _mean_bypass(horizontal=SMALL, vertical=SMALL)
    features, _ = FeatureCache().get(model, CASES["bert"].inputs()).batch(torch.arange(2))
    chosen = model.task.chosen(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.task.reads_pooled(chosen, model.final_norm)
    norm = nn.LayerNorm(chosen[0].shape[-1])
    model.task.uses_final_norm = True
    assert not model.task.reads_pooled(chosen, norm)  # BERT's plan pools after no norm; a norm before is nonlinear
    model.task.plan = dataclasses.replace(model.task.plan, norm_after_pool=True)
    assert model.task.reads_pooled(chosen, norm)


def test_the_pooled_form_keeps_low_precision_features_as_they_are():
    """What autograd saves for backward: the bfloat16 features themselves, no float32 copy of any of them."""
    from restuning.bypass.pooling import LinearPool

    net, _ = _networks(torch.float32, width=64, horizontal={"name": "res_adapter", "dim": 3},
                       vertical={"name": "res_adapter", "dim": 5})
    features = [torch.randn(4, 16, 64).to(torch.bfloat16) for _ in range(5)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net.pooled(features, LinearPool("cls")).sum().backward()  # cls: a pooled view must not keep a cast
    feature_sized = [t for t in saved if t.untyped_storage().nbytes() >= 4 * 16 * 64 * 2]
    assert len(feature_sized) >= 5 and all(t.dtype == torch.bfloat16 for t in feature_sized), [
        (t.dtype, tuple(t.shape)) for t in feature_sized]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("width, ranks, depth", [(64, (5, 3), 4), (48, (4, 4), 6), (32, (10, 10), 2),
                                                 (64, (3, 3), 3)])
@pytest.mark.parametrize("tokens", [1, 8])
def test_the_pooled_form_is_chosen_where_it_keeps_less_than_the_steps(width, ranks, depth, tokens):
    """`kept_per_row` is what autograd keeps, and the choice follows what is measured."""
    from restuning.bypass.network import BypassNetwork
    from restuning.bypass.pooled import kept_per_row
    from restuning.bypass.pooling import LinearPool
    from restuning.memory import SavedTensorMeter

    config = BypassConfig(vertical={"name": "res_adapter", "dim": ranks[0]},
                          horizontal={"name": "res_adapter", "dim": ranks[1]})
    net = BypassNetwork([width] * (depth + 1), config, "tokens")

    def kept(examples: int, pooled: bool) -> int:
        features = [torch.randn(examples, tokens, width) for _ in range(depth + 1)]
        with SavedTensorMeter([*net.parameters(), *features]) as meter:
            net.pooled(features, LinearPool("avg")) if pooled else LinearPool("avg")(net(features))
        return meter.bytes

    per_row = {pooled: (kept(32, pooled) - kept(16, pooled)) / (16 * tokens * 4) for pooled in (True, False)}
    estimate = kept_per_row([ranks[0]] * depth, [ranks[1]] * depth, width, tokens)
    assert estimate == pytest.approx(per_row[True], rel=0.01), (estimate, per_row)
    assert per_row[False] == (depth - 1) * width  # the checkpointed steps' states b_1 ... b_{L-1}
    applies = net.pooled_form_applies([torch.randn(2, tokens, width)] * (depth + 1))
    assert applies is (estimate <= per_row[False]), (estimate, per_row)
