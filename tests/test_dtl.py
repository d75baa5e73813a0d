"""DTL and DTL+ (Disentangled Transfer Learning): the frozen model at init, gradients and saved activations only
in the blocks from the injection point on, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, CNN_CASES, FAMILY_CASES, train_steps

from restuning import ConfigError
from restuning.baselines import DisentangledTransfer, DTLConfig
from restuning.bypass import FeatureTaps
from restuning.bypass.network import read_out
from restuning.memory import SavedTensorMeter
from restuning.methods import get_method, load_model, save_model

MODELS = {**CASES, **{k: FAMILY_CASES[k] for k in ("llama", "gpt2", "deberta_v2")}}


def _dtl(case, method: str = "dtl", depth: int = 4, **options) -> DisentangledTransfer:
    entry = get_method(method)
    torch.manual_seed(0)
    return entry.build(case.model(depth=depth), entry.read_options(options, 3), 3)


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_at_init_it_is_the_frozen_read_out_and_training_leaves_the_backbone_untouched(model_name, method):
    case = MODELS[model_name]
    model = _dtl(case, method)
    inputs = case.inputs()
    taps = FeatureTaps(model.base_model, model.plan.points[-1:]).attach()  # the frozen last block's output
    with torch.no_grad():  # B_i = 0: the running sum is zero, so is swish of it, and so is DTL+'s convolution of it
        last = taps(lambda: model.base_model(**inputs))[-1]
        frozen = model.head(read_out(last, model.plan, inputs.get("attention_mask"), model.final_norm))
    taps.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), frozen, atol=1e-6, rtol=0)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    losses = train_steps(model, inputs, torch.tensor([0, 2]), steps=3)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.base_model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.base_model.state_dict().items())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.split(".")[0] in ("maps", "fusion", "head") for n in trained)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".up." in n), "B_i stayed zero"


def _grad_blocks(model: DisentangledTransfer, inputs: dict) -> list[bool]:
    """Whether each block's output is part of the autograd graph in a training forward."""
    seen: list[bool] = []
    handles = [model.base_model.get_submodule(p).register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
        for p in model.plan.points]
    try:
        model(**inputs).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_autograd_reaches_only_the_blocks_from_the_injection_point_on():
    case = CASES["vit"]
    for inject_from in (1, 2, 3):
        model = _dtl(case, depth=4, inject_from=inject_from)
        assert _grad_blocks(model, case.inputs()) == [i >= inject_from for i in range(4)]


def _saved(case, depth: int, inject_from: int) -> int:
    model = _dtl(case, depth=depth, inject_from=inject_from)
    with SavedTensorMeter(model.parameters()) as meter:
        loss = model(**case.inputs()).sum()
    loss.backward()
    return meter.bytes


@pytest.mark.parametrize("model_name", ["vit", "bert"])
def test_saved_bytes_grow_with_the_blocks_after_the_injection_point_not_with_those_before(model_name):
    case = CASES[model_name]
    hidden = case.read(case.model()(**case.inputs()))
    feature = hidden.numel() * hidden.element_size()  # one (B, T, D) float32 tensor
    # The same two blocks after the injection point, two or four before: each block before adds only what its
    # low-rank map keeps, its input (B, T, D) and the rank-2 projection (B, T, 2).
    two_before, four_before = _saved(case, depth=4, inject_from=2), _saved(case, depth=6, inject_from=4)
    assert four_before - two_before == 2 * feature * (1 + 2 / hidden.shape[-1])
    # The same blocks before, one more after: that block's activations (attention, MLP) are kept.
    one_after, two_after = _saved(case, depth=3, inject_from=2), _saved(case, depth=4, inject_from=2)
    assert two_after - one_after >= 4 * feature, (one_after, two_after, feature)


def test_dtl_plus_convolves_the_patch_grid_and_passes_the_class_token():
    fusion = _dtl(CASES["vit"], "dtl_plus").fusion
    assert fusion is not None and fusion.grid and fusion.conv.kernel_size == (3, 3)
    assert not _dtl(CASES["bert"], "dtl_plus").fusion.grid  # text: along the sequence
    assert _dtl(FAMILY_CASES["llama"], "dtl_plus").fusion.causal  # a decoder's tokens never read ahead
    r = torch.zeros(2, 1 + 16, 32)
    r[:, 0] = 1.0  # the class token: not part of the grid
    r[:, 1 + 5] = 1.0  # one patch of the 4 x 4 grid
    with torch.no_grad():
        fusion.conv.weight.fill_(1.0)
        out = fusion(r)
    assert torch.equal(out[:, 0], r[:, 0])
    grid = out[0, 1:, 0].reshape(4, 4)
    assert grid[1, 1] == 1 and grid[0, 0] == 1 and grid[2, 2] == 1 and grid[3, 3] == 0  # the 3 x 3 neighbourhood
    assert int((grid != 0).sum()) == 9


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_save_and_load(tmp_path, method):
    case = CASES["bert"]
    model = _dtl(case, method)
    train_steps(model, case.inputs(), torch.tensor([0, 1]), steps=2)
    save_model(model, method, {}, 3, model.base_model, tmp_path)
    again = load_model(case.model(depth=4), tmp_path)
    torch.testing.assert_close(again(**case.inputs()), model.eval()(**case.inputs()), atol=1e-6, rtol=0)
    assert isinstance(again, DisentangledTransfer) and (again.fusion is not None) == (method == "dtl_plus")


def test_bad_options_and_backbones_are_clear_errors():
    with pytest.raises(ConfigError, match="inject_from: 4 is past the last block"):
        _dtl(CASES["vit"], depth=4, inject_from=4)
    with pytest.raises(ConfigError, match="fusion_size: expected an odd kernel size"):
        DTLConfig(fusion_size=2)
    with pytest.raises(ConfigError, match="this backbone gives feature maps"):
        entry = get_method("dtl")
        entry.build(CNN_CASES["resnet"].model(), entry.read_options({}, 3), 3)


def test_a_failing_forward_leaves_grad_mode_and_the_hooks_as_they_were():
    case = CASES["vit"]
    model = _dtl(case, depth=4)
    block = model.base_model.get_submodule(model.plan.points[1])  # before the injection point (2)
    hooks = {p: len(model.base_model.get_submodule(p)._forward_hooks) for p in model.plan.points}

    def fail(module, args):
        raise RuntimeError("a block failed")

    handle = block.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a block failed"):
        model(**case.inputs())
    handle.remove()
    assert torch.is_grad_enabled() and model._call is None
    assert hooks == {p: len(model.base_model.get_submodule(p)._forward_hooks) for p in model.plan.points}
    model(**case.inputs()).sum().backward()  # and it still trains
