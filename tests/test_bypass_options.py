"""The common checks over bypass options x backbone families: the layer weighting (`combine: softmax`),
attention pooling, the token-mixing Res-Tuner (LoSA-style) as H or V, Res-Prefix / Res-Prompt as H or V. Each
pair: what it is at init, it trains while the backbone stays untouched, it saves and loads, and a
`MultiTaskBypass` of it and the default answers as each alone (to 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_CASES, CNN_CASES, FAMILY_CASES, train_steps

import restuning
from restuning import BypassConfig, ConfigError, MultiTaskBypass, ResTuningBypassModel
from restuning.bypass.network import read_out
from restuning.spatial import TokenMixing, token_grid_side

MODELS = {**ALL_CASES, **{k: FAMILY_CASES[k] for k in ("llama", "gpt2")}}
TOKEN_MODELS = sorted(k for k in MODELS if k not in CNN_CASES)
# Option -> (its config, what it equals at init: "default" the default bypass's pooled state, "mean" the default
# with mean pooling, "average" the features' plain average, None where the design is not zero at init).
OPTIONS = {
    "softmax": (dict(combine="softmax", vertical=None), "average"),
    "softmax_identity_h": (dict(combine="softmax", horizontal=None, vertical=None), "average"),
    "attention_pool": (dict(pooling="attention"), "mean"),
    "token_mixer_h": (dict(horizontal="res_token_mixer"), "default"),
    "token_mixer_hv": (dict(horizontal="res_token_mixer", vertical="res_token_mixer"), "default"),
    "prefix_h": (dict(horizontal="res_prefix"), None),
    "prompt_v": (dict(vertical="res_prompt"), None),
}
MATRIX = [(m, o) for m in TOKEN_MODELS for o in OPTIONS] + [
    (m, o) for m in sorted(CNN_CASES) for o in ("attention_pool", "token_mixer_h", "token_mixer_hv")]


def _model(name: str, num_classes: int | None = None, depth: int | None = None, **options) -> ResTuningBypassModel:
    torch.manual_seed(0)
    backbone = MODELS[name].model() if depth is None else MODELS[name].model(depth=depth)
    return restuning.get_restuning_model(backbone, BypassConfig(num_classes=num_classes, **options))


def _expected_at_init(name: str, kind: str, model: ResTuningBypassModel, inputs: dict) -> torch.Tensor:
    if kind in ("default", "mean"):  # "mean": over tokens, or over a map's positions
        reference = _model(name) if kind == "default" else _model(
            name, pooling="avg" if model.plan.layout == "map" else "mean")
        # Between CNN stages V_l projects b_{l-1} to the next width with weights random at init: use the same.
        projections = {k: v for k, v in model.task.state_dict().items() if ".project." in k}
        reference.task.load_state_dict(projections, strict=False)
        return reference(**inputs)
    features = model.features(**inputs)  # "average": every H_l is the identity, the weights equal
    average = torch.stack(features[1:]).mean(0)
    if model.plan.layout == "map":
        average = average.movedim(1, -1)
    return read_out(average, model.plan, inputs.get("attention_mask"), model.final_norm)


@pytest.mark.parametrize("model_name,option", MATRIX)
def test_bypass_options(model_name, option, tmp_path):
    case = MODELS[model_name]
    config, at_init = OPTIONS[option]
    inputs = case.inputs()
    with torch.no_grad():
        if at_init is not None:
            state = _model(model_name, **config)
            torch.testing.assert_close(state(**inputs), _expected_at_init(model_name, at_init, state, inputs),
                                       atol=1e-5, rtol=0)
    model = _model(model_name, 3, **config)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, inputs, torch.tensor([0, 2]), steps=3, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in model.base_model.state_dict().items())
    assert all(p.grad is None for p in model.base_model.parameters())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(n.startswith("task.bypass.") for n in changed), changed
    # save / load
    model.save_pretrained(tmp_path / option)
    restored = ResTuningBypassModel.from_pretrained(case.model(), tmp_path / option)
    expected = model.eval()(**inputs)
    torch.testing.assert_close(restored(**inputs), expected, atol=1e-6, rtol=0)
    # one backbone forward for this task and the default one, each as alone
    default = _model(model_name, 3).eval()
    multi = MultiTaskBypass(case.model(), {"option": tmp_path / option, "default": default}).eval()
    answers = multi(**inputs)
    torch.testing.assert_close(answers["option"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(answers["default"], default(**inputs), atol=1e-5, rtol=0)


def test_softmax_weighting_is_a_learned_softmax_and_refuses_what_it_cannot_sum():
    model = _model("vit", 3, combine="softmax", vertical=None)
    assert not hasattr(model.bypass, "theta") and len(model.bypass.vertical) == 0
    torch.testing.assert_close(model.bypass.gates, torch.full((2,), 0.5))
    with torch.no_grad():
        model.bypass.layer_logits.copy_(torch.tensor([0.0, 1.0]))
    e = torch.e
    torch.testing.assert_close(model.bypass.gates, torch.tensor([1 / (1 + e), e / (1 + e)]))
    with pytest.raises(ConfigError, match="combine: softmax .* set vertical: null"):
        BypassConfig(combine="softmax")
    with pytest.raises(ConfigError, match="needs one width"):
        _model("resnet", 3, combine="softmax", vertical=None)


def test_attention_pooling_ignores_padding_and_reads_cls_free_tokens():
    model = _model("bert", 3, pooling="attention")
    pool = model.task.attention_pool
    b = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        pool.query.normal_()
        out = pool(b, mask)
        changed = b.clone()
        changed[0, 3:] = 100.0  # padding: no effect
        torch.testing.assert_close(pool(changed, mask), out)
    assert not model.task.first_token_only


def test_the_token_mixer_mixes_neighbours_on_grids_and_sequences_and_never_reads_ahead_on_decoders():
    def ones(mixing: TokenMixing) -> TokenMixing:
        with torch.no_grad():
            mixing.conv.weight.fill_(1.0)
            mixing.conv.bias.zero_()
        return mixing

    assert token_grid_side(17) == (1, 4) and token_grid_side(16) == (0, 4) and token_grid_side(18) is None
    grid = ones(TokenMixing(1, 3, grid=True))
    tokens = torch.zeros(1, 17, 1)
    tokens[0, 1] = 1.0  # the grid's corner (0, 0), after the class token
    mixed = grid(tokens)
    assert mixed[0, 0, 0] == 0  # the class token is not mixed in
    assert mixed[0, 1:, 0].reshape(4, 4)[:2, :2].eq(1).all() and int(mixed[0, 1:].ne(0).sum()) == 4
    assert int(grid(tokens[:, 1:]).ne(0).sum()) == 4  # a grid without a class token (a UNet's attention)
    with pytest.raises(ValueError, match="neither a square patch grid"):
        grid(torch.zeros(1, 18, 1))
    text = torch.zeros(1, 6, 1)
    text[0, 2] = 1.0
    assert ones(TokenMixing(1, 3, grid=False))(text)[0, :, 0].tolist() == [0, 1, 1, 1, 0, 0]
    assert ones(TokenMixing(1, 3, grid=False, causal=True))(text)[0, :, 0].tolist() == [0, 0, 1, 1, 1, 0]
    for name, is_grid, causal in (("vit", True, False), ("bert", False, False), ("llama", False, True),
                                  ("resnet", True, False)):
        model = _model(name, 3, horizontal="res_token_mixer")
        mixer = model.task.bypass.horizontal[0].tuner.mix
        assert (mixer.grid, mixer.causal) == (is_grid, causal), name
        assert not model.task.bypass.position_wise and not model.task.first_token_only
    with pytest.raises(ValueError, match="odd size"):
        _model("vit", 3, horizontal={"name": "res_token_mixer", "options": {"kernel": 2}})


@pytest.mark.parametrize("model_name", ["bert", "vit", "resnet"])
def test_backbone_batch_runs_the_frozen_backbone_in_chunks_with_the_same_result(model_name):
    case = MODELS[model_name]
    inputs = {k: torch.cat([v] * 3) for k, v in case.inputs().items()}  # a batch of 6
    whole = _model(model_name, 3)
    chunked = _model(model_name, 3, backbone_batch=4)
    calls = []
    chunked.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(chunked(**inputs), whole(**inputs), atol=1e-5, rtol=0)
    assert len(calls) == 2  # 4 + 2 examples


def _counted(model) -> tuple[list[int], list[int]]:
    """(batch of each backbone call, batch of each call that reached the last tap) of `model` from now on."""
    calls, whole = [], []
    model.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(_batch(a, k)), with_kwargs=True)
    model.base_model.get_submodule(model.taps.points[-1]).register_forward_pre_hook(  # the taps' own hook ends it
        lambda m, a, k: whole.append(_batch(a, k)), with_kwargs=True)
    return calls, whole


def _batch(args: tuple, kwargs: dict) -> int:
    return next(len(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim())


@pytest.mark.parametrize("model_name", ["bert", "vit", "resnet"])
def test_backbone_tokens_chunks_by_the_positions_of_an_example_counted_once_per_input_shape(model_name):
    case = MODELS[model_name]
    inputs = {k: torch.cat([v] * 3) for k, v in case.inputs().items()}  # a batch of 6
    whole = _model(model_name, 3, backbone_tokens=None, pooling="mean")  # every token tapped, so x_0 is whole
    x_0 = whole.features(**inputs)[0]
    positions = x_0[0, :, 0].numel() if whole.plan.layout == "tokens" else x_0[0, 0].numel()
    chunked = _model(model_name, 3, backbone_tokens=2 * positions + 1, pooling="mean")  # 2 examples fit, 3 do not
    calls, full = _counted(chunked)
    with torch.no_grad():
        first = chunked(**inputs)
        torch.testing.assert_close(first, whole(**inputs), atol=1e-5, rtol=0)
        assert calls == [1, 2, 2, 2] and full == [2, 2, 2]  # one example up to the first tap, then 2 + 2 + 2
        again = chunked(**inputs)
    assert calls[4:] == [2, 2, 2]  # counted once for inputs of this shape
    torch.testing.assert_close(again, first, atol=0, rtol=0)  # the same chunks, so the same rounding, every call
    del calls[:]
    with torch.no_grad():
        chunked(**{k: v[:1] for k, v in inputs.items()})  # a single example: nothing to chunk or count
    assert calls == [1]


def test_backbone_tokens_counts_again_when_the_inputs_change_shape():
    case = MODELS["bert"]
    inputs = {k: torch.cat([v] * 4) for k, v in case.inputs().items()}  # (8, T) tokens
    tokens = inputs["input_ids"].shape[1]
    model = _model("bert", 3, backbone_tokens=4 * tokens)
    calls, _ = _counted(model)
    with torch.no_grad():
        model(**inputs)
        model(**{k: v[:, : tokens // 2] for k, v in inputs.items()})  # half the tokens: 8 examples fit
    with torch.no_grad():
        model(**inputs)
        model(**{k: v[:, : tokens // 2] for k, v in inputs.items()})
    assert calls == [1, 4, 4, 1, 8, 4, 4, 8]  # each shape was counted once
    whole = MultiTaskBypass(case.model(), backbone_tokens=None)
    assert (whole.backbone_batch, whole.backbone_tokens) == (None, None)
    with pytest.raises(ConfigError, match="backbone_tokens: expected a positive integer"):
        MultiTaskBypass(case.model(), backbone_tokens=0)
    with pytest.raises(ConfigError, match="backbone_tokens: expected"):
        BypassConfig(backbone_tokens=True)


def test_backbone_tokens_runs_whole_a_call_it_cannot_cut_by_example():
    # A KV cache, a 1-d tensor that is not per example (GPT-2's position ids, T == B by accident), and the two
    # towers of a CLIP model with more captions than images: each runs whole, with the whole batch's features.
    llama, clip = MODELS["llama"], FAMILY_CASES["clip_model"]
    ids = torch.randint(3, 100, (6, 10), generator=torch.Generator().manual_seed(0))
    backbone = llama.model()
    model = restuning.get_restuning_model(backbone, BypassConfig(num_classes=3, backbone_tokens=1))
    with torch.no_grad():
        cache = backbone(input_ids=ids[:, :4], use_cache=True).past_key_values
    calls, _ = _counted(model)
    with torch.no_grad():
        assert model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True).shape == (6, 3)
    assert calls == [6]
    model = _model("gpt2", 3, pooling="mean", backbone_tokens=1)
    calls, _ = _counted(model)
    square = torch.randint(3, 100, (8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model.features(input_ids=square, position_ids=torch.arange(8))[0].shape[0] == 8
    assert calls == [8]
    model = restuning.get_restuning_model(clip.model(), BypassConfig(taps=r"vision_model\.encoder\.layers\.\d+",
                                                                     backbone_tokens=1))
    texts, images = torch.randint(3, 100, (5, 7)), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x_0 = model.features(input_ids=texts, pixel_values=images)[0]
    assert x_0.shape[0] == 2


@pytest.mark.parametrize("method", ["side_tuning", "lst"])
def test_side_networks_chunk_their_frozen_forward_as_their_config_says(method):
    from restuning.methods import build_classifier

    case = MODELS["bert"]
    inputs = {k: torch.cat([v] * 3) for k, v in case.inputs().items()}  # a batch of 6
    tokens = inputs["input_ids"].shape[1]
    counts = {}
    for options in ({}, {"backbone_tokens": 2 * tokens}, {"backbone_tokens": None}, {"backbone_batch": 4}):
        torch.manual_seed(0)
        model = build_classifier(method, case.model(), 3, options)
        calls, _ = _counted(model)
        with torch.no_grad():
            out = model(**inputs)
        counts[str(options)] = calls
        if not options:
            expected = out
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert list(counts.values()) == [[1, 6], [1, 2, 2, 2], [6], [4, 2]]


def test_backbone_batch_overrides_backbone_tokens_and_reinject_runs_the_whole_batch():
    case = MODELS["bert"]
    inputs = {k: torch.cat([v] * 3) for k, v in case.inputs().items()}  # a batch of 6
    model = _model("bert", 3, backbone_batch=4, backbone_tokens=1)
    calls, _ = _counted(model)
    with torch.no_grad():
        model(**inputs)
    assert calls == [4, 2]
    reinjected = _model("bert", 3, reinject=1, backbone_tokens=1)
    calls, _ = _counted(reinjected)
    reinjected(**inputs).sum().backward()
    assert calls == [6]


def test_a_multi_task_bypass_runs_its_shared_forward_in_chunks_with_the_same_answers():
    case = MODELS["bert"]
    inputs = {k: torch.cat([v] * 3) for k, v in case.inputs().items()}  # a batch of 6
    tasks = {"a": _model("bert", 3), "b": _model("bert", 2, pooling="mean")}
    whole = MultiTaskBypass(case.model(), {k: v.task for k, v in tasks.items()})
    chunked = MultiTaskBypass(case.model(), {k: v.task for k, v in tasks.items()}, backbone_batch=4)
    calls = []
    chunked.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        expected, answers = whole(**inputs), chunked(**inputs)
    assert answers.keys() == {"a", "b"} and len(calls) == 2
    for name in answers:
        torch.testing.assert_close(answers[name], expected[name], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="backbone_batch: expected a positive integer"):
        MultiTaskBypass(case.model(), backbone_batch=0)


def test_backbone_batch_splits_per_sample_arguments_of_a_unet():
    from test_unet_bypass import inputs as unet_inputs

    from restuning.diffusion.pipeline import tiny_unet

    batch = unet_inputs(batch=5)
    torch.manual_seed(0)
    whole = restuning.get_restuning_model(tiny_unet(cross_attention_dim=32), BypassConfig())
    torch.manual_seed(0)
    chunked = restuning.get_restuning_model(tiny_unet(cross_attention_dim=32), BypassConfig(backbone_batch=2))
    with torch.no_grad():
        torch.testing.assert_close(chunked(**batch), whole(**batch), atol=1e-5, rtol=0)


# --- late re-injection ------------------------------------------------------------------------
REINJECT_MODELS = [m for m in TOKEN_MODELS if m != "clip_model"]


@pytest.mark.parametrize("model_name", REINJECT_MODELS)
@pytest.mark.parametrize("k", [1, 2])
def test_reinjection_starts_as_the_bypass_trains_through_the_last_blocks_and_saves(model_name, k, tmp_path):
    case = MODELS[model_name]
    inputs = case.inputs()
    plain = _model(model_name, 3, depth=k + 1)
    model = _model(model_name, 3, depth=k + 1, reinject=k)
    assert model.task.reinjected == model.plan.points[-k:] and not model.task.first_token_only
    assert not model.cacheable and plain.cacheable
    model.task.load_state_dict(plain.task.state_dict(), strict=False)  # all but the re-injection gates
    with torch.no_grad():  # s = 0: the blocks run again on their own inputs
        torch.testing.assert_close(model(**inputs), plain(**inputs), atol=1e-5, rtol=0)
    before = {key: v.clone() for key, v in model.base_model.state_dict().items()}
    losses = train_steps(model, inputs, torch.tensor([0, 2]), steps=3, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[key]) for key, v in model.base_model.state_dict().items())
    assert all(p.grad is None for p in model.base_model.parameters())
    assert model.task.bypass.reinject_gates.abs().min() > 0  # each gate got a gradient and moved
    model.save_pretrained(tmp_path / "reinject")
    restored = ResTuningBypassModel.from_pretrained(case.model(depth=k + 1), tmp_path / "reinject")
    torch.testing.assert_close(restored(**inputs), model(**inputs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"live backbone forward, model\(\*\*inputs\), not on features"):
        model(features=model.features(**inputs), attention_mask=inputs.get("attention_mask"))
    with pytest.raises(ConfigError, match="re-injects .* run it on its own"):
        MultiTaskBypass(case.model(depth=k + 1), {"reinject": tmp_path / "reinject"})


@pytest.mark.parametrize("model_name", ["vit", "bert", "llama", "gpt2"])
def test_reinjection_runs_each_block_again_on_the_gated_state_and_chains_the_rerun_outputs(model_name):
    """Depth 3, k = 2: block 1 runs again on z_1 = x_1 + s_1 (b_1 - x_1), its output x'_2 feeds the bypass
    step b_2, and block 2 runs again on z_2 = x'_2 + s_2 (b_2 - x'_2), as computed here by hand."""
    case = MODELS[model_name]
    inputs = case.inputs()
    model = _model(model_name, 3, depth=3, reinject=2)
    net = model.task.bypass
    blocks = [model.base_model.get_submodule(p) for p in model.plan.points]
    with torch.no_grad():
        for step in net.vertical:  # b_l != x_l
            step.residual.tuner.up.weight.normal_()
        closed = model(**inputs)
        net.reinject_gates.copy_(torch.tensor([0.7, 0.4]))
        opened = model(**inputs)
        seen: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True) for i, b in enumerate(blocks)]
        model(**inputs)
        for h in hooks:
            h.remove()
        x = model.features(**inputs)
        b1 = net._step(0, net.theta, x[0], x[1])
        z1 = x[1] + 0.7 * (b1 - x[1])
        seen_z1 = seen[1]  # the last call of block 1 is the re-run
        features, calls = model.features_and_calls(**inputs)
        x2 = calls(model.plan.points[1], z1)
        b2 = net._step(1, net.theta, b1, x2)
        z2 = x2 + 0.4 * (b2 - x2)
    assert (opened - closed).abs().max() > 1e-3
    torch.testing.assert_close(seen_z1, z1, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[2], z2, atol=1e-5, rtol=0)


def test_reinjection_refuses_taps_that_are_not_consecutive_blocks_and_feature_caches():
    case = MODELS["vit"]
    for taps in (["layers.0", "layers.2"], ["layers.0", "layers.1.mlp"]):
        model = restuning.get_restuning_model(case.model(depth=3), BypassConfig(num_classes=3, taps=taps,
                                                                               reinject=1))
        with pytest.raises(ConfigError, match="re-run taps must be consecutive whole blocks"):
            model(**case.inputs())
    model = _model("vit", 3, depth=3, reinject=1)
    with pytest.raises(ConfigError, match="trains on a live backbone forward"):
        restuning.FeatureCache().get(model, case.inputs())
    with pytest.raises(ConfigError, match="compile_task: a re-injecting task"):
        model.compile_task()


@pytest.mark.parametrize("model_name", ["vit", "bert"])
def test_reinjection_keeps_the_activations_of_the_rerun_blocks_only(model_name):
    from restuning.memory import SavedTensorMeter

    case = MODELS[model_name]

    def saved(depth: int, k: int) -> int:
        torch.manual_seed(0)
        model = restuning.get_restuning_model(case.model(depth=depth), BypassConfig(num_classes=3, reinject=k,
                                                                                   pooling="mean"))
        model.task.pooled_form = False  # step by step with or without re-injection (the pooled form keeps less)
        model.train()
        with SavedTensorMeter(model.parameters()) as meter:
            loss = model(**case.inputs()).sum()
        loss.backward()
        return meter.bytes

    hidden = case.read(case.model()(**case.inputs()))
    feature = hidden.numel() * hidden.element_size()
    # Blocks before the injection point add what the plain bypass keeps per layer (its checkpointed step's
    # inputs), whether or not the last block runs again.
    assert saved(4, 1) - saved(3, 1) == saved(4, 0) - saved(3, 0)
    # Each re-run block keeps its activations (attention, MLP): several (B, T, D) tensors more.
    assert saved(4, 2) - saved(4, 1) >= 4 * feature and saved(4, 1) - saved(4, 0) >= 4 * feature


def test_reinjection_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="combine: softmax has no chain"):
        BypassConfig(reinject=1, combine="softmax", vertical=None)
    with pytest.raises(ConfigError, match="every layer must feed the bypass"):
        BypassConfig(reinject=1, layers=[0, 1])
    with pytest.raises(ConfigError, match="backbone_batch: null"):
        BypassConfig(reinject=1, backbone_batch=4)
    with pytest.raises(ConfigError, match="reinject: 2 blocks, but the bypass reads 2 layers; at most 1"):
        _model("vit", 3, reinject=2)
    with pytest.raises(ConfigError, match="layers are 'map'"):
        _model("resnet", 3, reinject=1)
    with pytest.raises(ConfigError, match="reinject"):
        BypassConfig.from_dict({"reinject": -1})


@pytest.mark.parametrize("model_name", sorted(CNN_CASES))
def test_pooling_on_feature_maps_averages_every_position_and_refuses_one_token_readouts(model_name):
    inputs = MODELS[model_name].inputs()
    with torch.no_grad():
        mean = _model(model_name, 3, pooling="mean")(**inputs)
        avg = _model(model_name, 3, pooling="avg")(**inputs)
    assert mean.shape == (2, 3)
    torch.testing.assert_close(mean, avg, atol=1e-6, rtol=0)
    for pooling in ("cls", "last"):
        with pytest.raises(ConfigError, match=f"pooling: '{pooling}' reads one token.*feature maps"):
            _model(model_name, 3, pooling=pooling)
