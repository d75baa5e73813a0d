"""Res-Tuning-Bypass: eq. 8, gradient isolation, every backbone family and every tuner as H and V."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ALL_CASES, CASES, CNN_CASES, FAMILY_CASES, train_steps

import restuning
from restuning import BypassConfig, ResTuningBypassModel, ResTuningConfig, TunerSpec
from restuning.assets import efficientnet_lite0
from restuning.bypass import Residual
from restuning.memory import SavedTensorMeter

TUNER_NAMES = ["res_adapter", "res_prefix", "res_prompt", "lora", "bitfit", "ssf"]


def _bypass(name: str, config: BypassConfig | None = None, depth: int | None = None) -> ResTuningBypassModel:
    case = ALL_CASES[name]
    model = case.model() if depth is None else case.model(depth=depth)
    return restuning.get_restuning_model(model, config or BypassConfig(num_classes=3))


def _train(model, inputs: dict, steps: int = 2, lr: float = 0.1) -> list[float]:
    """A few SGD steps on a fixed cross-entropy target; returns the losses."""
    target = torch.arange(next(iter(inputs.values())).shape[0]) % 3
    return train_steps(model, inputs, target, steps=steps, lr=lr, optimizer=torch.optim.SGD)


def test_default_config_is_dual_res_adapter_with_zero_gates():
    model = _bypass("vit")
    net = model.bypass
    assert torch.equal(net.theta, torch.zeros(2)) and torch.equal(net.gates, torch.full((2,), 0.5))
    for step in [*net.horizontal, *(v.residual for v in net.vertical)]:
        assert type(step.tuner).__name__ == "ResAdapter" and step.tuner.down.out_features == 10
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 3
    assert model(**CASES["vit"].inputs()).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_none_variant_is_the_gated_ensemble_of_eq_8(name):
    """Zero tuners, theta = 0: b_l = 0.5 x_l + 0.5 b_{l-1} over the backbone's own hidden states."""
    case = CASES[name]
    model = _bypass(name, BypassConfig.variant("none", final_norm=False, pooling="mean"))
    hidden = model.base_model(**case.inputs(), output_hidden_states=True).hidden_states
    b = hidden[0]
    for x in hidden[1:]:
        b = 0.5 * x + 0.5 * b
    mask = case.inputs().get("attention_mask")
    expected = b.mean(1) if mask is None else (b * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(model(**case.inputs()), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_bypass_at_init_reads_the_ensemble_through_the_final_norm(name):
    """Dual Res-Adapters are zero at init, so the default bypass equals the `none` variant."""
    case = CASES[name]
    plain = _bypass(name, BypassConfig.variant("none"))
    dual = _bypass(name, BypassConfig())
    torch.testing.assert_close(dual(**case.inputs()), plain(**case.inputs()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant,has_h,has_v", [("none", False, False), ("horizontal", True, False),
                                                 ("vertical", False, True), ("both", True, True)])
def test_table_3b_variants_are_configs(variant, has_h, has_v):
    model = _bypass("vit", BypassConfig.variant(variant, num_classes=3))
    net = model.bypass
    assert all((h.tuner is not None) == has_h for h in net.horizontal)
    assert all((v.residual.tuner is not None) == has_v for v in net.vertical)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"theta", *(["horizontal"] if has_h else []), *(["vertical"] if has_v else [])}
    _train(model, CASES["vit"].inputs())
    assert not torch.equal(net.theta, torch.zeros(2)), "the gates did not learn"


@pytest.mark.parametrize("name", sorted(ALL_CASES))
@pytest.mark.parametrize("tuner", TUNER_NAMES)
def test_any_tuner_as_h_and_v_trains_while_the_backbone_stays_frozen(name, tuner):
    case = ALL_CASES[name]
    model = _bypass(name, BypassConfig(horizontal=TunerSpec(tuner, dim=4), vertical=TunerSpec(tuner, dim=4),
                                       num_classes=3))
    base = model.base_model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = _bypass(name, BypassConfig.variant("none", num_classes=3))
    missing, unexpected = model.task.load_state_dict(plain.task.state_dict(), strict=False)  # same gates/head
    assert not unexpected and all(".tuner." in k for k in missing)
    at_init = model(**case.inputs()).detach()
    torch.testing.assert_close(at_init, plain(**case.inputs()), atol=1e-6, rtol=0)  # zero-init H and V
    _train(model, case.inputs())
    assert all(p.grad is None for p in base.parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    tuners = [m.tuner for m in model.bypass.modules() if isinstance(m, Residual)]
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters()) for t in tuners), (
        "a horizontal or vertical tuner got no gradient"
    )
    assert (model(**case.inputs()) - at_init).abs().max() > 1e-4


def _saved_bytes(model, inputs: dict) -> int:
    model.train()
    with SavedTensorMeter(model.parameters()) as meter:
        out = model(**inputs)
        loss = (out if isinstance(out, torch.Tensor) else out.last_hidden_state).square().mean()
    loss.backward()
    return meter.bytes


def test_saved_activations_do_not_grow_with_backbone_depth():
    inputs = CASES["vit"].inputs()
    config = BypassConfig(layers=[0, 1], num_classes=3)  # the same bypass on every depth
    bypass = {d: _saved_bytes(_bypass("vit", config, depth=d), inputs) for d in (2, 6)}
    assert bypass[2] > 0 and bypass[2] == bypass[6], bypass
    # Contrast: Res-Tuning back-propagates through the backbone, so what it saves grows with depth.
    tuned = {d: _saved_bytes(restuning.get_restuning_model(CASES["vit"].model(depth=d), ResTuningConfig()), inputs)
             for d in (2, 6)}
    assert tuned[6] > 2 * tuned[2] > 0, tuned


def test_backbone_runs_without_autograd_and_stops_after_the_last_tap():
    case = CASES["bert"]
    model = _bypass("bert", BypassConfig(layers=[0], num_classes=3), depth=3)
    calls = []
    for i, layer in enumerate(model.base_model.encoder.layer):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, torch.is_grad_enabled())))
    model.train()
    model(**case.inputs()).sum().backward()
    assert calls == [(0, False)]
    assert all(p.grad is None for p in model.base_model.parameters())


def test_features_are_not_kept_between_calls():
    model = _bypass("vit")
    model(**CASES["vit"].inputs())
    assert model.taps._record is None
    tensors = [v for m in model.base_model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert not tensors


def test_cnn_stages_of_other_shapes_are_resampled_and_projected():
    model = _bypass("convnext")
    assert model.plan.layout == "map" and model.plan.widths == (8, 8, 16, 24, 32)
    assert model.plan.pooling == "avg" and model.plan.final_norm == "layernorm" and model.plan.norm_after_pool
    projections = [v.project for v in model.bypass.vertical]
    assert [p is None for p in projections] == [True, False, False, False]
    features = model.features(**CNN_CASES["convnext"].inputs())
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 8), (8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("taps, norm", [(r"encoder\.stages\.[0-2]", None), (r"encoder\.stages\.[0-3]", "layernorm")])
def test_a_cnn_tapped_to_an_earlier_stage_reads_it_without_norms_of_other_widths(taps, norm):
    # Stage 3 holds a block norm named like the final norm, and the final norm has stage 3's width: tapped to stage
    # 2 (width 24), neither is the bypass's (both were, and the forward failed on the width).
    model = restuning.get_restuning_model(CNN_CASES["convnext"].model(), BypassConfig(num_classes=3, taps=taps))
    assert model.plan.final_norm == norm and model.task.uses_final_norm is (norm is not None)
    assert model(**CNN_CASES["convnext"].inputs()).shape == (2, 3)


def test_a_transformer_tapped_to_an_earlier_layer_keeps_its_final_norm_of_the_same_width():
    model = restuning.get_restuning_model(CASES["vit"].model(), BypassConfig(num_classes=3, taps=r"layers\.0"))
    assert model.plan.depth == 1 and model.plan.final_norm == "layernorm" and model.task.uses_final_norm
    assert model(**CASES["vit"].inputs()).shape == (2, 3)


def test_efficientnet_lite0_asset_bypass_and_block_tuning():
    """The shipped, pretrained EfficientNet-Lite0: a bypass over its 16 blocks, and block-level Res-Tuning."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    backbone = efficientnet_lite0().eval()
    reference = backbone(x).detach()
    model = restuning.get_restuning_model(backbone, BypassConfig(num_classes=5))
    assert model.plan.depth == 16 and model.plan.widths[0] == 32 and model.plan.widths[-1] == 320
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    backbone = model.unload()
    tuned = restuning.get_restuning_model(backbone, ResTuningConfig(mha=None, ffn=None, block="res_adapter"))
    assert len(tuned.tuners) == 16
    torch.testing.assert_close(tuned(x), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CNN_CASES))
@pytest.mark.parametrize("tuner", ["res_adapter", "lora", "ssf", "bitfit"])
def test_block_tuners_on_cnns(name, tuner):
    """Res-Tuning on CNN blocks (paper Table 16): zero at init, trainable, backbone untouched."""
    case = CNN_CASES[name]
    base = case.model()
    reference = base(**case.inputs()).last_hidden_state.detach()
    tuned = restuning.get_restuning_model(base, ResTuningConfig(mha=None, ffn=None, block=TunerSpec(tuner, dim=4)))
    torch.testing.assert_close(tuned(**case.inputs()).last_hidden_state, reference, atol=1e-6, rtol=0)
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = tuned(**case.inputs()).last_hidden_state.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (tuned(**case.inputs()).last_hidden_state - reference).abs().max() > 1e-5


def test_cnn_block_kinds_other_than_block_are_a_clear_error():
    with pytest.raises(restuning.OpMatchError, match="no mha op"):
        restuning.get_restuning_model(CNN_CASES["resnet"].model(), ResTuningConfig())


@pytest.mark.parametrize("name", ["vit", "bert", "resnet"])
def test_save_load_roundtrip(name, tmp_path):
    case = ALL_CASES[name]
    model = _bypass(name, BypassConfig(vertical="lora", layers=[1], num_classes=3))
    _train(model, case.inputs())
    expected = model(**case.inputs()).detach()
    model.save_pretrained(tmp_path)
    restored = ResTuningBypassModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(restored(**case.inputs()), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in restored.parameters())


def test_load_onto_another_backbone_fails_before_touching_it(tmp_path):
    _bypass("vit").save_pretrained(tmp_path)
    other = CASES["vit"].model(depth=3)
    with pytest.raises(restuning.CheckpointError, match="another backbone|taps"):
        ResTuningBypassModel.from_pretrained(other, tmp_path)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in other.modules())
    assert all(p.requires_grad for p in other.parameters())


def test_bad_configs_are_clear_errors():
    with pytest.raises(restuning.ConfigError, match="num_classes"):
        BypassConfig(num_classes=0)
    with pytest.raises(restuning.ConfigError, match="pooling"):
        BypassConfig(pooling="max")
    with pytest.raises(restuning.ConfigError, match="variant"):
        BypassConfig.variant("diagonal")
    with pytest.raises(restuning.ConfigError, match="layers"):
        _bypass("vit", BypassConfig(layers=[5]))
    with pytest.raises(restuning.ConfigError, match="unknown tuner"):
        _bypass("vit", BypassConfig(horizontal="nope"))
    with pytest.raises(restuning.ConfigError, match="num_clases: unknown key; expected some of"):
        BypassConfig.from_dict({"num_clases": 3})


def test_unload_gives_the_pristine_backbone():
    case = CASES["vit"]
    model = _bypass("vit")
    reference = model.base_model(**case.inputs()).last_hidden_state.detach()
    base = model.unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(base(**case.inputs()).last_hidden_state, reference, atol=0, rtol=0)


def test_recompute_gives_the_same_gradients_and_keeps_less():
    case = CASES["vit"]
    grads, saved = {}, {}
    for recompute in (True, False):
        torch.manual_seed(0)
        model = _bypass("vit", BypassConfig(num_classes=3, recompute=recompute))
        with torch.no_grad():  # open the zero-initialised branches so every gradient is non-trivial
            for p in model.task.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.train()
        with SavedTensorMeter(model.parameters()) as meter:
            loss = torch.nn.functional.cross_entropy(model(**case.inputs()), torch.tensor([0, 2]))
        loss.backward()
        saved[recompute] = meter.bytes
        grads[recompute] = {n: p.grad.clone() for n, p in model.task.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5)
    assert saved[True] < saved[False], saved


def test_cnn_checkpoint_onto_another_cnn_fails(tmp_path):
    _bypass("resnet").save_pretrained(tmp_path)
    with pytest.raises(restuning.CheckpointError, match="depths"):
        ResTuningBypassModel.from_pretrained(CNN_CASES["resnet"].model(depth=3), tmp_path)


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip_vision"])
@pytest.mark.parametrize("tuner", TUNER_NAMES)
def test_first_token_bypass_equals_the_bypass_over_all_tokens(name, tuner):
    """With CLS pooling and position-wise tuners the bypass runs on token 0 only; that must be exact."""
    case = CASES[name]
    torch.manual_seed(0)
    model = _bypass(name, BypassConfig(horizontal=TunerSpec(tuner, dim=4), vertical=TunerSpec(tuner, dim=4),
                                       num_classes=3))
    with torch.no_grad():
        for p in model.task.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert model.task.first_token_only and model.taps.first_token_only
    features = model.features(**case.inputs())
    assert all(f.shape[1] == 1 for f in features)
    full = model.base_model(**case.inputs(), output_hidden_states=True).hidden_states
    b = model.bypass(list(full))  # every token
    if model.task.uses_final_norm:
        b = model.final_norm(b)
    torch.testing.assert_close(model(**case.inputs()), model.head(b[:, 0]), atol=1e-6, rtol=1e-6)


def test_mean_pooling_keeps_every_token():
    model = _bypass("bert")
    assert model.plan.pooling == "mean" and not model.task.first_token_only
    assert model.features(**CASES["bert"].inputs())[1].shape[1] == 9


@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_bypass_runs_under_bf16_autocast(name):
    """Projections between stages of other widths return bf16 under autocast; the gated sum still works."""
    case = ALL_CASES[name]
    model = restuning.get_restuning_model(case.model(), BypassConfig(num_classes=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**case.inputs())
    logits.float().sum().backward()
    assert logits.shape == (2, 3) and model.bypass.theta.grad is not None


# --- a model with two towers (CLIPModel): the bypass reads the tower it is told to ------------------------------
def test_a_two_tower_model_needs_its_tower_named():
    with pytest.raises(restuning.OpMatchError, match=r"BypassConfig\(tower='text_model'\) \(towers: \['text_model', "
                                                     r"'vision_model'\]\)"):
        restuning.get_restuning_model(FAMILY_CASES["clip_model"].model(), BypassConfig(num_classes=3))
    with pytest.raises(restuning.OpMatchError, match="tower='towers': no such submodule"):
        restuning.get_restuning_model(FAMILY_CASES["clip_model"].model(), BypassConfig(tower="towers"))


@pytest.mark.parametrize("tower,inputs", [("vision_model", ("pixel_values",)),
                                          ("text_model", ("input_ids", "attention_mask"))])
def test_the_bypass_reads_the_named_tower_of_a_clip_model(tower, inputs, tmp_path):
    case = FAMILY_CASES["clip_model"]
    data = {k: v for k, v in case.inputs().items() if k in inputs}
    torch.manual_seed(3)
    tuned = restuning.get_restuning_model(case.model(), BypassConfig(tower=tower, num_classes=3))
    assert all(p.startswith(f"{tower}.encoder.layers.") for p in tuned.plan.points) and len(tuned.plan.points) == 2
    assert tuned.plan.final_norm.startswith(tower + ".")
    torch.manual_seed(3)  # the same task on the tower taken out of the model: the same answer
    alone = restuning.get_restuning_model(case.model().get_submodule(tower), BypassConfig(num_classes=3))
    out = tuned(**data)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, alone(**data), atol=0, rtol=0)
    train_steps(tuned, data, torch.tensor([0, 2]))
    trained = tuned(**data)
    assert (trained - out).abs().max() > 1e-4
    tuned.save_pretrained(tmp_path)
    restored = ResTuningBypassModel.from_pretrained(case.model(), tmp_path)
    torch.testing.assert_close(restored(**data), trained, atol=0, rtol=0)


def test_a_swin_bypass_taps_one_stage_as_its_error_says():
    case = FAMILY_CASES["swin"]
    with pytest.raises(restuning.OpMatchError, match="change the token count") as info:
        restuning.get_restuning_model(case.model(), BypassConfig(num_classes=3))
    taps = re.search(r"BypassConfig\(taps='(.*)'\)", str(info.value)).group(1).replace("\\\\", "\\")
    tuned = restuning.get_restuning_model(case.model(), BypassConfig(taps=taps, num_classes=3))
    assert tuned.plan.points == ("encoder.layers.1.blocks.0", "encoder.layers.1.blocks.1")
    assert tuned(**case.inputs()).shape == (2, 3)
