"""Low-precision frozen backbones (`backbone_dtype`: bfloat16, int8 weight-only): one set of checks over model
families x methods x dtypes (the common tester's shape), then checkpoints, the feature cache, configs and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CASES, CNN_CASES, FAMILY_CASES, tiny_vit_folder, train_steps

import restuning
from restuning import BypassConfig, ConfigError, FeatureCache, ResTuningConfig, ResTuningModel, TunerSpec
from restuning.bypass.cache import fingerprint
from restuning.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from restuning.memory import SavedTensorMeter, state_bytes
from restuning.methods import get_method, load_model, save_model
from restuning.precision import (
    MIN_CONV_CHANNELS,
    backbone_dtype,
    is_quantized,
    plain_tensors,
    set_backbone_dtype,
    tensor_bytes,
)
from restuning.train.config import TrainConfig, from_dict
from restuning.train.evaluate import evaluate_run
from restuning.train.trainer import Trainer

TUNED = {**CASES, **FAMILY_CASES}
TUNERS = [("res_adapter", "mha"), ("res_prefix", "mha"), ("res_prompt", "mha"), ("lora", "mha"), ("ssf", "ffn")]
# Frozen-backbone methods read one chain of token layers (side networks) or also CNN stages (bypass, linear).
READERS = {**CASES, **{k: v for k, v in FAMILY_CASES.items() if k not in ("swin", "clip_model")}}
FROZEN_METHODS = ["bypass", "linear", "side_tuning", "lst", "dtl", "dtl_plus", "peft_lora"]
# Every pair in int8 (which computes in bfloat16 too, through quantized linear layers); bfloat16 on a subset.
TUNER_MATRIX = [(m, t, o, "int8") for m in sorted(TUNED) for t, o in TUNERS] + [
    (m, t, o, "bfloat16") for m in sorted(TUNED) for t, o in TUNERS[:2]]
FROZEN_MATRIX = [(m, f, "int8") for m in sorted(READERS) for f in FROZEN_METHODS] + [
    (m, f, "bfloat16") for m in sorted(READERS) for f in ("bypass", "peft_lora")]


def _held(dtype: str, case) -> torch.nn.Module:
    base = case.model()
    return set_backbone_dtype(base, dtype)


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor holding the backbone's own weights (a quantized weight's packed data and scales), copied;
    not the LoRA weights PEFT injects into it."""
    return {f"{n}#{i}": t.detach().clone() for n, p in model.state_dict().items() if "lora_" not in n
            for i, t in enumerate(plain_tensors(p))}


def _assert_held_in(model: torch.nn.Module, dtype: str) -> None:
    assert backbone_dtype(model) == dtype
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(is_quantized(m.weight) == (dtype == "int8") for m in linears)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(is_quantized(m.weight) == (dtype == "int8" and m.weight.shape[1] >= MIN_CONV_CHANNELS)
               for m in convs)


# --- the common checks: Res-Tuners on a low-precision backbone ---------------------------------------
@pytest.mark.parametrize("model_name,tuner,op,dtype", TUNER_MATRIX)
def test_tuners_train_in_float32_on_a_low_precision_backbone(model_name, tuner, op, dtype):
    case = TUNED[model_name]
    base = _held(dtype, case)
    _assert_held_in(base, dtype)
    reference = case.read(base(**case.inputs())).detach()
    before = _plain_state(base)
    tuned = restuning.get_restuning_model(base, ResTuningConfig(**{"mha": None, "ffn": None, op: TunerSpec(tuner, 4)}))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    out = case.read(tuned(**case.inputs()))
    torch.testing.assert_close(out, reference, atol=0, rtol=0)  # zero at init, in the backbone's own dtype
    tuned.train()
    opt = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):  # two steps: zero-initialised branches open after the first
        loss = (case.read(tuned(**case.inputs())).float() * torch.linspace(-1, 1, out.shape[-1])).sum()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or (p.grad.dtype == torch.float32 and p.grad.isfinite().all()) for p in trainable)
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert not torch.equal(case.read(tuned.eval()(**case.inputs())), reference), "training changed nothing"
    after = _plain_state(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- frozen-backbone methods, and PEFT's LoRA QLoRA-style ----------------------------------------------
def _logits(method: str, case, dtype: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    base = _held(dtype, case) if dtype != "float32" else case.model()
    entry = get_method(method)
    torch.manual_seed(seed)
    model = entry.build(base, entry.read_options({}, 3), 3)
    return model, model(**case.inputs())


@pytest.mark.parametrize("model_name,method,dtype", FROZEN_MATRIX)
def test_frozen_backbone_methods_train_in_float32_and_stay_close_to_float32(model_name, method, dtype):
    case = READERS[model_name]
    exact_model, exact = _logits(method, case, "float32")
    model, logits = _logits(method, case, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable) and logits.dtype == torch.float32
    # The same weights and initialisation: only the backbone's precision differs (bf16 rounding, int8 per-channel
    # scales). Bounds for these random width-32 models (measured: median 0.4-0.5%, worst 2% bf16 and 11% int8).
    bound = 0.05 if dtype == "bfloat16" else 0.15
    error = ((logits - exact).norm() / exact.norm()).item()
    assert error < bound, f"relative error {error:.3f} against float32"
    backbone = model.base_model if hasattr(model, "base_model") else model._backbone[0]
    before = _plain_state(backbone)
    start = [p.detach().clone() for p in trainable]
    target = torch.tensor([0, 1])
    losses = train_steps(model, case.inputs(), target, steps=3, lr=1e-3)
    reference = train_steps(exact_model, case.inputs(), target, steps=3, lr=1e-3)
    assert all(abs(a - b) < bound * abs(b) for a, b in zip(losses, reference, strict=True)), (losses, reference)
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start, strict=True)), "nothing trained"
    after = _plain_state(backbone)
    assert all(torch.equal(after[k], before[k]) for k in before), "the frozen backbone changed"


@pytest.mark.parametrize("model_name", ["vit", "bert", "llama"])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_reinjecting_bypass_runs_its_blocks_again_in_the_backbone_dtype_and_trains_in_float32(model_name, dtype):
    case = READERS[model_name]
    entry = get_method("bypass")

    def build(held: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = entry.build(_held(held, case) if held != "float32" else case.model(),
                            entry.read_options({"reinject": 1}, 3), 3)
        with torch.no_grad():  # open the gate, so the block really runs on the bypass state
            model.task.bypass.reinject_gates.fill_(0.5)
            model.task.bypass.vertical[0].residual.tuner.up.weight.normal_(std=0.1)
        return model

    exact, model = build("float32"), build(dtype)
    last = model.base_model.get_submodule(model.plan.points[-1])
    dtypes = []
    hook = last.register_forward_pre_hook(
        lambda m, a, kw: dtypes.append((a[0] if a else kw["hidden_states"]).dtype), with_kwargs=True)
    logits = model(**case.inputs())
    hook.remove()
    assert logits.dtype == torch.float32
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the frozen run and the re-run, both in the backbone's
    error = ((logits - exact(**case.inputs())).norm() / exact(**case.inputs()).norm()).item()
    assert error < (0.05 if dtype == "bfloat16" else 0.15), error  # as the frozen-backbone methods' bounds
    before = _plain_state(model.base_model)
    gates = model.task.bypass.reinject_gates.detach().clone()
    losses = train_steps(model, case.inputs(), torch.tensor([0, 1]), steps=3, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert model.task.bypass.reinject_gates.dtype == torch.float32
    assert not torch.equal(model.task.bypass.reinject_gates, gates)
    after = _plain_state(model.base_model)
    assert all(torch.equal(after[k], before[k]) for k in before), "the frozen backbone changed"


@pytest.mark.parametrize("model_name", sorted(CNN_CASES))
@pytest.mark.parametrize("method", ["bypass", "linear", "restuning"])
def test_cnn_backbones_in_int8_train(model_name, method):
    case = CNN_CASES[model_name]
    base = _held("int8", case)
    entry = get_method(method)
    options = {"mha": None, "ffn": None, "block": {"name": "res_adapter", "dim": 4}} if method == "restuning" else {}
    model = entry.build(base, entry.read_options(options, 3), 3)
    losses = train_steps(model, case.inputs(), torch.tensor([0, 2]), steps=3)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# --- checkpoints: the same format whatever the backbone's dtype ----------------------------------------
@pytest.mark.parametrize("method", ["bypass", "restuning", "peft_lora"])
def test_a_checkpoint_is_the_same_whatever_the_backbone_dtype_and_loads_on_any(tmp_path, method):
    case = CASES["vit"]
    saved = {}
    for dtype in ("float32", "bfloat16", "int8"):
        model, _ = _logits(method, case, dtype)
        train_steps(model, case.inputs(), torch.tensor([0, 1]), steps=2)
        backbone = model.base_model if hasattr(model, "base_model") else model._backbone[0]
        save_model(model, method, {}, 3, backbone, tmp_path / dtype)
        saved[dtype] = model
        meta = json.loads((tmp_path / dtype / CONFIG_NAME).read_text())
        assert "backbone_dtype" not in json.dumps(meta), "the checkpoint records nothing of the backbone's dtype"
    from safetensors.torch import load_file

    files = {d: load_file(tmp_path / d / WEIGHTS_NAME) for d in saved}
    for d in ("bfloat16", "int8"):
        assert files[d].keys() == files["float32"].keys()
        assert all(t.dtype == torch.float32 for t in files[d].values())
    # Trained on an int8 backbone, opened on int8 (as trained) and on float32 (format independence).
    again = load_model(_held("int8", case), tmp_path / "int8")
    torch.testing.assert_close(again(**case.inputs()), saved["int8"].eval()(**case.inputs()), atol=1e-5, rtol=0)
    on_fp32 = load_model(case.model(), tmp_path / "int8")(**case.inputs())
    assert ((on_fp32 - again(**case.inputs())).norm() / on_fp32.norm()) < 0.1


# --- the feature cache and what the bypass keeps ------------------------------------------------------
def test_the_feature_cache_key_includes_the_backbone_dtype_and_keeps_low_precision_features(tmp_path):
    case = CASES["vit"]
    inputs = case.inputs()["pixel_values"]
    models = {d: restuning.get_restuning_model(_held(d, case) if d != "float32" else case.model(), BypassConfig())
              for d in ("float32", "bfloat16", "int8")}
    keys = {d: fingerprint(m, inputs) for d, m in models.items()}
    assert len(set(keys.values())) == 3
    for d in ("bfloat16", "int8"):
        cached = FeatureCache().get(models[d], inputs)
        assert all(f.dtype == torch.bfloat16 for f in cached.features)
        store = FeatureCache(tmp_path / d)
        store.get(models[d], inputs)
        assert json.loads((tmp_path / d / "cache.json").read_text())["dtype"] == "torch.bfloat16"
    # One folder, another dtype: the stored features are not reused.
    store = FeatureCache(tmp_path / "int8")
    store.get(models["bfloat16"], inputs)
    assert store.status == "rebuilt"


def _saved_bytes(dtype: str, pooled_form: bool) -> tuple[int, int]:
    """Bytes autograd saves in a live bypass forward (recompute on), and those of its tapped features."""
    case = CASES["bert"]
    base = _held(dtype, case) if dtype != "float32" else case.model()
    small = {"name": "res_adapter", "dim": 1}  # ranks small beside the width of 32: the pooled form keeps less
    model = restuning.get_restuning_model(base, BypassConfig(num_classes=2, horizontal=small, vertical=small))
    model.task.pooled_form = pooled_form
    features = model.features(**case.inputs())
    assert model.task.reads_pooled(model.task.chosen(features), model.final_norm) is pooled_form
    with SavedTensorMeter(model.parameters()) as meter:
        loss = model.forward_live(features, case.inputs()["attention_mask"]).sum()
    loss.backward()
    return meter.bytes, sum(f.numel() * f.element_size() for f in features)


def test_the_bypass_keeps_a_low_precision_backbone_taps_in_low_precision_for_backward():
    saved32, taps32 = _saved_bytes("float32", pooled_form=False)
    saved16, taps16 = _saved_bytes("bfloat16", pooled_form=False)
    assert taps16 * 2 == taps32
    # Each checkpointed step keeps its x_l (bfloat16 here, not a float32 copy) and the float32 state b_{l-1}.
    assert saved16 <= 0.8 * saved32, (saved16, saved32)
    # The pooled form keeps every tap once, as it is, and the same float32 projections whatever the taps' dtype.
    pooled32, _ = _saved_bytes("float32", pooled_form=True)
    pooled16, _ = _saved_bytes("bfloat16", pooled_form=True)
    assert pooled32 - pooled16 == taps32 - taps16, (pooled32, pooled16, taps32, taps16)


def test_parameter_bytes_count_the_packed_int8_weights():
    case = CASES["vit"]
    sizes = {d: state_bytes(_held(d, case) if d != "float32" else case.model())["parameters"]
             for d in ("float32", "bfloat16", "int8")}
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    assert sizes["int8"] < 0.75 * sizes["bfloat16"]


@pytest.mark.parametrize("groups", [1, 2])
def test_int8_convolutions_hold_a_quarter_of_float32_and_compute_close_to_bfloat16(groups):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1, groups=groups),
                              torch.nn.Conv2d(64, 64, 3, padding=1, groups=64),  # depthwise: stays bfloat16
                              torch.nn.Conv2d(64, 8, 1))
    half = set_backbone_dtype(_copy(net), "bfloat16")
    held = set_backbone_dtype(_copy(net), "int8")
    first, depthwise, last = held
    assert is_quantized(first.weight) and is_quantized(last.weight) and not is_quantized(depthwise.weight)
    assert tensor_bytes(first.weight) < 0.3 * first.weight.numel() * 4
    x = torch.randn(2, 32, 8, 8)
    x16 = x.clone().requires_grad_(True)
    x8 = x.clone().requires_grad_(True)
    y16, y8 = half(x16), held(x8)
    assert y8.dtype == torch.bfloat16
    assert (y8 - y16).float().norm() < 0.03 * y16.float().norm()
    g = torch.randn(y16.shape)
    y16.backward(g.to(y16.dtype))
    y8.backward(g.to(y8.dtype))
    assert (x8.grad - x16.grad).norm() < 0.03 * x16.grad.norm()  # gradients reach the input through int8 weights


def test_int8_linear_layers_take_one_scale_per_128_weights_of_a_row_where_the_width_allows():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 64).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight[:, 128:] *= 50  # the two halves of every row at very different scales
    per_channel = _copy(plain)
    quantize_(per_channel, Int8WeightOnlyConfig())
    grouped = set_backbone_dtype(torch.nn.Sequential(_copy(plain)), "int8")[0]
    assert tuple(grouped.weight.scale.shape) == (64, 2) and tuple(per_channel.weight.scale.shape) == (64, 1)
    error = {name: (layer.weight.dequantize().float() - plain.weight.float())[:, :128].norm().item()
             for name, layer in (("grouped", grouped), ("per_channel", per_channel))}
    assert error["grouped"] < 0.1 * error["per_channel"], error  # the small half keeps its own scale
    narrow = set_backbone_dtype(torch.nn.Sequential(torch.nn.Linear(48, 8)), "int8")[0]
    assert tuple(narrow.weight.scale.shape) == (8, 1)  # 48 is no multiple of 128: one scale per row


@pytest.mark.parametrize("layer", ["linear", "linear_in_slices", "conv", "conv_in_slices"])
def test_backpropagating_through_an_int8_layer_saves_nothing_and_matches_its_dequantized_weight(layer, monkeypatch):
    import restuning.int8

    if layer.endswith("in_slices"):  # a layer too large to dequantize at once: 5 slices of 10 output channels
        monkeypatch.setattr(restuning.int8, "DEQUANTIZE_CHUNK", 10 * 32 * (1 if layer.startswith("linear") else 9))
    torch.manual_seed(0)
    linear = layer.startswith("linear")
    plain = torch.nn.Linear(32, 48) if linear else torch.nn.Conv2d(32, 48, 3, padding=1, stride=2)
    held = set_backbone_dtype(torch.nn.Sequential(_copy(plain)), "int8")[0]
    assert isinstance(held, type(plain)) and is_quantized(held.weight)
    reference = set_backbone_dtype(torch.nn.Sequential(_copy(plain)), "bfloat16")[0]
    with torch.no_grad():
        reference.weight.copy_(held.weight.dequantize())  # the same numbers, in a plain bfloat16 layer
    x = torch.randn((2, 5, 32) if linear else (2, 32, 9, 9), dtype=torch.bfloat16)
    x8, x16 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with SavedTensorMeter() as meter:
        y8 = held(x8)
    assert meter.bytes == 0  # no dequantized weight, not even the input (the weight is frozen)
    y16 = reference(x16)
    torch.testing.assert_close(y8, y16, rtol=1e-2, atol=1e-2)
    g = torch.randn(y16.shape, dtype=torch.bfloat16)
    y8.backward(g)
    y16.backward(g)
    torch.testing.assert_close(x8.grad, x16.grad, rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # no autograd: the plain product
        torch.testing.assert_close(held(x), y8.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(256, 96), (100, 40)])  # one scale per 128 weights of a row; one per row
@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_linear_layer_in_slices_computes_torchaos_own_product_exactly(shape, bias, monkeypatch):
    import restuning.int8

    torch.manual_seed(0)
    layer = set_backbone_dtype(torch.nn.Sequential(torch.nn.Linear(*shape, bias=bias)), "int8")[0]
    x = torch.randn(3, 7, shape[0], dtype=torch.bfloat16)
    with torch.no_grad():
        whole = torch.nn.functional.linear(x, layer.weight, layer.bias)  # torchao's product, the weight at once
        torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)  # one slice
        torch.testing.assert_close(layer(x.float()), torch.nn.functional.linear(x.float(), layer.weight, layer.bias),
                                   rtol=0, atol=0)  # another input dtype: torchao's own path
        monkeypatch.setattr(restuning.int8, "DEQUANTIZE_CHUNK", shape[0] * 11)  # slices of at most 11 channels
        assert len(restuning.int8._output_slices(layer.weight)) == -(-shape[1] // 11)
        torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)


def test_an_int8_convolution_in_slices_computes_torchaos_own_product_exactly(monkeypatch):
    import restuning.int8

    torch.manual_seed(0)
    layer = set_backbone_dtype(torch.nn.Sequential(torch.nn.Conv2d(32, 48, 3, padding=1)), "int8")[0]
    x = torch.randn(2, 32, 9, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        whole = torch.nn.functional.conv2d(x, layer.weight, layer.bias, 1, 1)  # torchao's product (positional)
        torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)
        monkeypatch.setattr(restuning.int8, "DEQUANTIZE_CHUNK", 32 * 9 * 10)
        torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_an_int8_layer_with_a_trainable_bias_or_a_plain_weight_or_an_unbatched_input_computes_as_nn_does(layer):
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 48) if layer == "linear" else torch.nn.Conv2d(32, 48, 3, padding=1)
    held = set_backbone_dtype(torch.nn.Sequential(_copy(plain)), "int8")[0]
    reference = set_backbone_dtype(torch.nn.Sequential(_copy(plain)), "bfloat16")[0]
    with torch.no_grad():
        reference.weight.copy_(held.weight.dequantize())
    held.bias.requires_grad_(True)  # e.g. PEFT's bias: all
    reference.bias.requires_grad_(True)
    x = torch.randn((4, 32) if layer == "linear" else (2, 32, 6, 6), dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(reference(x).shape, dtype=torch.bfloat16)
    held(x).backward(g)
    reference(x.detach()).backward(g)
    assert held.bias.grad is not None
    torch.testing.assert_close(held.bias.grad, reference.bias.grad, rtol=1e-2, atol=1e-2)
    if layer == "conv":  # unbatched (C, H, W), with and without autograd, sliced or not
        single = x.detach()[0].clone().requires_grad_(True)
        torch.testing.assert_close(held(single), reference(single), rtol=1e-2, atol=1e-2)
    held.weight = torch.nn.Parameter(reference.weight.detach().clone(), requires_grad=False)  # replaced: plain
    torch.testing.assert_close(held(x), reference(x), rtol=0, atol=0)
    held(x).sum().backward()


def test_peft_lora_on_int8_convolutions_trains_them_in_bfloat16_and_keeps_linear_layers_int8():
    from test_unet_bypass import inputs

    from restuning.diffusion.pipeline import tiny_unet
    from restuning.int8 import Int8Conv2d

    unet = set_backbone_dtype(tiny_unet(cross_attention_dim=32), "int8")
    targets = [n for n, m in unet.named_modules() if isinstance(m, Int8Conv2d) and n.endswith(("proj_in", "proj_out"))]
    assert targets
    model = get_method("peft_lora").build(unet, {"target_modules": ["to_q", "proj_in", "proj_out"]}, None)
    bases = {n: m.get_base_layer() for n, m in model.named_modules() if n.endswith(("proj_in", "proj_out", "to_q"))
             and hasattr(m, "get_base_layer")}
    assert bases and all(is_quantized(b.weight) == n.endswith("to_q") for n, b in bases.items())
    batch = inputs()
    out = model(**batch)
    (out if isinstance(out, torch.Tensor) else out.sample).float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_res_tuning_on_an_int8_backbone_saves_what_it_saves_on_a_bfloat16_one():
    case = CASES["vit"]

    def saved(dtype: str) -> int:
        torch.manual_seed(0)
        model = ResTuningModel(_held(dtype, case), ResTuningConfig())
        with SavedTensorMeter(model.parameters()) as meter:
            out = model(**case.inputs())
        (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float().sum().backward()
        return meter.bytes

    # A frozen bfloat16 weight is kept for backward without a copy; an int8 one is dequantized again there.
    assert saved("int8") == saved("bfloat16") > 0


def _copy(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net)


# --- configs and errors -------------------------------------------------------------------------------
def test_bad_backbone_dtypes_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone_dtype: expected one of \['float32', 'bfloat16', 'int8'\]"):
        from_dict(TrainConfig, {"backbone_dtype": "float16"})
    with pytest.raises(ConfigError, match=r"backbone_dtype: bfloat16 .* method 'full' does not support it .*'bypass'"):
        from_dict(TrainConfig, {"backbone_dtype": "bfloat16", "method": {"name": "full"}})
    with pytest.raises(ConfigError, match="method 'bitfit' does not support it"):
        from_dict(TrainConfig, {"backbone_dtype": "int8", "method": {"name": "bitfit"}})
    base = _held("int8", CASES["vit"])
    with pytest.raises(ConfigError, match="already held in int8; load it again to hold it in bfloat16"):
        set_backbone_dtype(base, "bfloat16")
    with pytest.raises(ConfigError, match="expected one of"):
        set_backbone_dtype(CASES["vit"].model(), "int4")


def test_merging_into_an_int8_backbone_is_refused_and_into_a_bfloat16_one_folds():
    config = ResTuningConfig(mha=None, ffn=None, target_modules={"q": r".*\.q_proj"}, custom={"q": "lora"})
    with pytest.raises(ConfigError, match=r"weight is int8 \(backbone_dtype int8\).*bfloat16 copy"):
        restuning.get_restuning_model(_held("int8", CASES["vit"]), config).merge_and_unload()
    tuned = restuning.get_restuning_model(_held("bfloat16", CASES["vit"]), config)
    with torch.no_grad():
        for p in tuned.tuners.parameters():
            p.add_(0.05)
        expected = tuned(**CASES["vit"].inputs()).last_hidden_state
    merged = tuned.merge_and_unload()
    got = merged(**CASES["vit"].inputs()).last_hidden_state
    assert ((got.float() - expected.float()).norm() / expected.float().norm()) < 0.02  # bf16 rounding of the fold


def test_a_module_to_save_trains_in_float32_on_a_bfloat16_backbone_and_is_refused_on_int8(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def build(dtype: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=48, vocab_size=101, num_labels=3)).eval()
        return set_backbone_dtype(model, dtype)

    inputs = CASES["bert"].inputs()
    tuned = restuning.get_restuning_model(build("bfloat16"), ResTuningConfig(modules_to_save=["classifier"]))
    head = tuned.saved_module("classifier")
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    logits = tuned(**inputs).logits
    assert logits.dtype == torch.bfloat16  # handed back in the backbone's dtype, as the module it stands in for
    logits.float().sum().backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(build("bfloat16"), tmp_path)
    torch.testing.assert_close(restored(**inputs).logits, tuned(**inputs).logits, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="cannot train a copy of an int8-quantized module"):
        restuning.get_restuning_model(build("int8"), ResTuningConfig(modules_to_save=["classifier"]))


# --- runs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,dtype", [("bypass", "int8"), ("restuning", "bfloat16"), ("lst", "bfloat16")])
def test_a_run_with_a_low_precision_backbone_trains_and_its_final_model_evaluates_the_same(tmp_path, method, dtype):
    config = from_dict(TrainConfig, {
        "backbone": str(tiny_vit_folder(tmp_path)), "method": {"name": method}, "backbone_dtype": dtype,
        "data": {"name": "mnist", "train_size": 96, "test_size": 64, "image_size": 16},
        "optim": {"epochs": 2, "batch_size": 16, "lr": 0.01, "warmup_epochs": 0.5},
        "output_dir": str(tmp_path / "run"),
    })
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    assert backbone_dtype(trainer.backbone.model) == dtype
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    # final/ is opened on a backbone held as the run held it, so it evaluates to the run's own accuracy.
    assert evaluate_run(config.output_dir)["test_accuracy"] == result["test_accuracy"]


def test_predict_and_serve_answer_on_a_backbone_held_as_the_runs_were_trained(tmp_path):
    from restuning.train.finished import open_run
    from restuning.train.task_table import Query, TaskTable

    def run(method: str, dtype: str) -> str:
        config = from_dict(TrainConfig, {
            "backbone": str(tiny_vit_folder(tmp_path)), "method": {"name": method}, "backbone_dtype": dtype,
            "data": {"name": "mnist", "train_size": 48, "test_size": 16, "image_size": 16},
            "optim": {"epochs": 1, "batch_size": 16, "lr": 0.01}, "output_dir": str(tmp_path / f"{method}-{dtype}"),
        })
        Trainer(config, progress=False).run()
        return config.output_dir

    bypass, restuning_run, plain = run("bypass", "int8"), run("restuning", "int8"), run("bypass", "float32")
    images = torch.rand(3, 3, 16, 16)
    table = TaskTable(str(tiny_vit_folder(tmp_path)))
    table.add("bypass", bypass)
    table.add("restuning", restuning_run)  # its own copy of the backbone, also in int8
    assert table.backbone_dtype == "int8" and backbone_dtype(table.multi.base_model) == "int8"
    assert backbone_dtype(table.tasks["restuning"].model._backbone[0]) == "int8"
    answers = table.answer([Query(["bypass", "restuning"], images)])[0]
    for name, path in (("bypass", bypass), ("restuning", restuning_run)):
        finished = open_run(path)
        backbone = finished.backbone()  # held as the run held it
        with torch.no_grad():
            expected = finished.model(backbone).eval()(**table.encode(images))
        torch.testing.assert_close(answers[name], expected, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="trained on a float32 backbone; this table holds it in int8"):
        table.add("plain", plain)
    assert TaskTable(str(tiny_vit_folder(tmp_path)), backbone_dtype="float32").add("plain", plain).shared


def test_the_unet_bypass_on_an_int8_unet_starts_at_the_frozen_unet_and_trains():
    from test_unet_bypass import inputs

    from restuning.diffusion.pipeline import tiny_unet

    unet = set_backbone_dtype(tiny_unet(cross_attention_dim=32), "int8")
    _assert_held_in(unet, "int8")
    batch = inputs()
    with torch.no_grad():
        frozen = unet(**batch).sample
    model = restuning.get_restuning_model(unet, BypassConfig())
    torch.testing.assert_close(model(**batch), frozen, atol=0, rtol=0)
    before = _plain_state(unet)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    losses = train_steps(model, batch, target, lambda out, t: torch.nn.functional.mse_loss(out.float(), t), steps=4)
    assert losses[-1] < losses[0]
    after = _plain_state(unet)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_diffusion_run_from_a_stable_diffusion_folder_loads_its_unet_held_in_int8(tmp_path):
    from test_diffusion import run_config

    from restuning.diffusion.pipeline import save_sd, tiny_pipeline
    from restuning.diffusion.train import DiffusionTrainer, load_run
    from restuning.diffusion.train_config import DiffusionTrainConfig
    from restuning.int8 import Int8Conv2d

    save_sd(tiny_pipeline(0), tmp_path / "sd")
    config = run_config(tmp_path, "bypass").to_dict()
    config.update(backbone_dtype="int8", model=str(tmp_path / "sd"))
    trainer = DiffusionTrainer(from_dict(DiffusionTrainConfig, config), progress=False)
    result = trainer.run()
    assert result["eval_loss"] < result["eval_loss_start"], result
    for unet in (trainer.components.unet, load_run(config["output_dir"])[0].unet):
        _assert_held_in(unet, "int8")
        assert any(isinstance(m, Int8Conv2d) for m in unet.modules())


@pytest.mark.parametrize("method", ["bypass", "restuning"])
def test_a_diffusion_run_on_an_int8_unet_trains_and_reopens_on_an_int8_unet(tmp_path, method):
    from test_diffusion import run_config

    from restuning.diffusion.pipeline import tiny_pipeline
    from restuning.diffusion.train import DiffusionTrainer, load_run
    from restuning.diffusion.train_config import DiffusionTrainConfig

    config = run_config(tmp_path, method).to_dict()
    config["backbone_dtype"] = "int8"
    components = tiny_pipeline(0)
    trainer = DiffusionTrainer(from_dict(DiffusionTrainConfig, config), progress=False, components=components)
    _assert_held_in(components.unet, "int8")
    before = _plain_state(components.unet)
    result = trainer.run()
    assert result["eval_loss"] < result["eval_loss_start"], result
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    after = _plain_state(components.unet)
    assert all(torch.equal(after[k], before[k]) for k in before), "the frozen UNet changed"
    reopened, denoiser, _ = load_run(config["output_dir"])
    _assert_held_in(reopened.unet, "int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_stable_diffusion_unet_loads_held_module_by_module_as_converting_it_after_loading_would_hold_it(
        tmp_path, dtype):
    from restuning.diffusion.pipeline import load_sd, save_sd, tiny_pipeline

    components = tiny_pipeline(0)
    save_sd(components, tmp_path / "sd")
    held = load_sd(tmp_path / "sd", max_length=components.max_length, unet_dtype=dtype).unet
    converted = set_backbone_dtype(tiny_pipeline(0).unet, dtype)
    _assert_held_in(held, dtype)
    assert not held.training and held.config._name_or_path == str(tmp_path / "sd")  # as from_pretrained
    if dtype == "int8":
        assert any(is_quantized(m.weight) for m in held.modules() if isinstance(m, torch.nn.Conv2d))
    assert _plain_state(held).keys() == _plain_state(converted).keys()
    assert all(torch.equal(a, b) for a, b in zip(_plain_state(held).values(), _plain_state(converted).values()))
    g = torch.Generator().manual_seed(0)
    batch = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                 encoder_hidden_states=torch.randn(1, 5, components.unet.config.cross_attention_dim, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(held(**batch).sample, converted(**batch).sample, atol=0, rtol=0)


def test_a_safetensors_file_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from restuning.precision import SafetensorsWeights, build_held

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))

    state = {k: v.contiguous() for k, v in build().state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "1.bias"}, r"has no tensor '1.bias'"),
        "shape": ({**state, "0.weight": torch.zeros(4, 4)}, r"'0.weight' has shape \(4, 4\); the model's .* \(3, 4\)"),
        "extra": ({**state, "2.weight": torch.zeros(1)}, r"1 tensors match no parameter of the model.*2.weight"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ConfigError, match=message):
            build_held(build, "int8", SafetensorsWeights(tmp_path / f"{name}.safetensors"))
    save_file(state, tmp_path / "good.safetensors")
    model = build_held(build, "bfloat16", SafetensorsWeights(tmp_path / "good.safetensors"))
    assert all(torch.equal(p, state[n].to(torch.bfloat16)) for n, p in model.named_parameters())

    class WithIds(torch.nn.Module):  # a non-persistent buffer, which an older file may still hold
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)
            self.register_buffer("ids", torch.arange(5), persistent=False)

    save_file({"emb.weight": torch.randn(5, 4), "ids": torch.arange(5)}, tmp_path / "ids.safetensors")
    with_ids = build_held(WithIds, "bfloat16", SafetensorsWeights(tmp_path / "ids.safetensors"))
    assert torch.equal(with_ids.ids, torch.arange(5))


def test_build_held_frees_each_layers_wider_weight_once_it_is_quantized():
    import gc

    from restuning.precision import build_held

    shape = (37, 32)  # no other test's parameter has it

    def build() -> torch.nn.Module:
        model = torch.nn.Sequential(*(torch.nn.Linear(shape[1], shape[0]) for _ in range(4)))
        model.shared = model[0]  # a module registered twice: its parameters are read once
        return model

    def wide_weights() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and tuple(o.shape) == shape
                   and o.dtype == torch.bfloat16 and not is_quantized(o))

    def weights(name: str, like: torch.Tensor) -> torch.Tensor:
        if name == "3.weight":  # the three earlier layers are int8 by now, and their bfloat16 weights freed
            assert wide_weights() == 0
        return torch.randn(like.shape, dtype=torch.bfloat16)

    model = build_held(build, "int8", weights)
    assert all(is_quantized(layer.weight) for layer in model[:4]) and model.shared.weight is model[0].weight
