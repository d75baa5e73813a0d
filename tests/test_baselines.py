"""The baselines of paper Table 3(c) / Table 4 in the trainer: each builds and trains, and each shows the
property that defines it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CASES, hidden, train_steps

from restuning.baselines import PRESETS, LadderSideTuning, LSTConfig, SideTuning, SideTuningConfig, VPTShallow
from restuning.config import ConfigError
from restuning.memory import SavedTensorMeter
from restuning.methods import LastLayerClassifier, build_classifier, names
from restuning.model import ResTuningModel

METHODS = names("classification")

FAMILIES = ["vit", "bert"]
BACKBONE_FROZEN = [m for m in METHODS if m not in ("full", "bitfit")]


def _train_steps(model: torch.nn.Module, inputs: dict, steps: int = 2) -> list[float]:
    return train_steps(model, inputs, torch.tensor([0, 2]), steps=steps)


# --- common: every method in one parametrised suite ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_a_frozen_backbone_stays_untouched(method, family):
    case = CASES[family]
    backbone = case.model()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    model = build_classifier(method, backbone, 3, {})
    logits = model(**case.inputs())
    assert logits.shape == (2, 3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable
    _train_steps(model, case.inputs())
    after = {n.replace(".base_layer", ""): p for n, p in backbone.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()  # PEFT wraps the projections it targets, and adds LoRA weights
    changed = [n for n, p in after.items() if not torch.equal(p, before[n])]
    if method in BACKBONE_FROZEN:
        assert not changed, f"{method} changed frozen backbone weights {changed[:3]}"
    else:
        assert changed


def test_unknown_method_and_options_are_clear_errors():
    with pytest.raises(ConfigError, match="method.name: expected one of .*'adapter'.*got 'houlsby'"):
        build_classifier("houlsby", CASES["vit"].model(), 2, {})
    with pytest.raises(ConfigError, match="bitfit takes no options"):
        build_classifier("bitfit", CASES["vit"].model(), 2, {"dim": 3})
    with pytest.raises(ConfigError, match="method.config.rank: unknown key"):
        build_classifier("adaptformer", CASES["vit"].model(), 2, {"rank": 3})
    with pytest.raises(ConfigError, match="method.config.reduction: expected a positive integer"):
        build_classifier("lst", CASES["vit"].model(), 2, {"reduction": 0})
    with pytest.raises(ConfigError, match="unknown peft LoraConfig"):
        build_classifier("peft_lora", CASES["vit"].model(), 2, {"rank": 3})


def test_presets_are_the_res_tuners_of_table_7_and_take_overrides():
    model = build_classifier("adaptformer", CASES["vit"].model(), 2, {"dim": 6})
    tuners = model.runner.tuners
    assert {s.kind for s in model.runner.sites.values()} == {"ffn"}
    assert all(t.name == "res_adapter" and t.scale == 0.1 and t.down.out_features == 6 for t in tuners.values())
    mam = build_classifier("mam", CASES["bert"].model(), 2, {})
    kinds = {s.kind: mam.runner.tuners[k] for k, s in mam.runner.sites.items()}
    assert kinds["mha"].name == "res_prefix" and kinds["mha"].mode == "exact"
    assert kinds["ffn"].name == "res_adapter" and kinds["ffn"].scale == 4.0
    assert set(PRESETS) <= set(METHODS)


# --- LoRA: zero at init, merges exactly, equals PEFT's ------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_is_zero_at_init_and_merges_into_the_weight_exactly(family):
    case = CASES[family]
    frozen = hidden(case.model()(**case.inputs()))
    tuned = build_classifier("lora", case.model(), 2, {}).runner
    assert {s.exit.rpartition(".")[2] for s in tuned.sites.values()} in ({"q_proj", "v_proj"}, {"query", "value"})
    torch.testing.assert_close(hidden(tuned(**case.inputs())), frozen, atol=0, rtol=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in tuned.tuners.values():
            t.lora_B.normal_(0, 0.1)
    expected = hidden(tuned(**case.inputs())).detach()
    merged = {s.exit: tuned.tuners[k].merged(tuned.base_model.get_submodule(s.exit)) for k, s in tuned.sites.items()}
    base = tuned.unload()
    assert (hidden(base(**case.inputs())) - expected).abs().max() > 1e-3
    for name, linear in merged.items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, linear)
    torch.testing.assert_close(hidden(base(**case.inputs())), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["vit", "bert", "dinov2", "clip_text"])
def test_our_lora_matches_peft_lora(family):
    peft = pytest.importorskip("peft")  # installed by the set-up (extra `peft`); a bare install may lack it
    assert peft.__version__
    case = CASES[family]
    ours = build_classifier("lora", case.model(), 3, {})
    theirs = build_classifier("peft_lora", case.model(), 3, {})
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs)
    torch.manual_seed(0)
    with torch.no_grad():
        theirs.head.load_state_dict(ours.head.state_dict())
        peft_modules = dict(theirs.runner.base_model.model.named_modules())
        for key, site in ours.runner.sites.items():
            layer = peft_modules[site.exit]
            layer.lora_B["default"].weight.normal_(0, 0.1)  # trained-looking B; PEFT also starts it at zero
            ours.runner.tuners[key].lora_A.copy_(layer.lora_A["default"].weight)
            ours.runner.tuners[key].lora_B.copy_(layer.lora_B["default"].weight)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(**case.inputs()), theirs(**case.inputs()), atol=1e-5, rtol=1e-5)
    assert (ours(**case.inputs()) - build_classifier("linear", case.model(), 3, {})(**case.inputs())).abs().max() > 0


# --- BitFit, SSF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_bitfit_trains_only_biases(family):
    case = CASES[family]
    backbone = case.model()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    model = build_classifier("bitfit", backbone, 3, {})
    trains = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trains and all(n.endswith(".bias") for n in trains)
    assert not any(n.startswith("pooler.") for n in trains), "the unused pooler is not counted as trained"
    _train_steps(model, case.inputs())
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trains)
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters() if not n.endswith(".bias"))


def test_ssf_preset_scales_and_shifts_mha_and_ffn_outputs_from_identity():
    case = CASES["vit"]
    frozen = hidden(case.model()(**case.inputs()))
    tuned = build_classifier("ssf", case.model(), 2, {}).runner
    assert sorted({s.kind for s in tuned.sites.values()}) == ["ffn", "mha"]
    torch.testing.assert_close(hidden(tuned(**case.inputs())), frozen, atol=0, rtol=0)
    # The folding into a linear layer is tested in test_merging.py.


# --- VPT-shallow ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_vpt_shallow_adds_tokens_at_the_first_layer_only(family):
    case = CASES[family]
    backbone = case.model().requires_grad_(False)
    inputs = case.inputs()
    tokens = hidden(backbone(**inputs)).shape[1]
    vpt = VPTShallow(backbone, tokens=3)
    blocks = list(backbone.get_submodule("encoder.layer" if family == "bert" else "layers"))
    seen_in, seen_out = [], []

    def record(module, args, kwargs, output) -> None:
        seen_in.append(args[0] if args else kwargs["hidden_states"])
        seen_out.append(output if torch.is_tensor(output) else output[0])

    hooks = [b.register_forward_hook(record, with_kwargs=True) for b in blocks]
    out = hidden(vpt(**inputs))
    for h in hooks:
        h.remove()
    assert out.shape[1] == tokens  # dropped after the last block
    assert [x.shape[1] for x in seen_in] == [tokens + 3] * len(blocks)
    assert torch.equal(seen_in[0][:, tokens:], vpt.prompts.expand(2, -1, -1))  # joined at block 0 ...
    for i in range(1, len(blocks)):  # ... and only carried through the later blocks, never joined again
        torch.testing.assert_close(seen_in[i][:, tokens:], seen_out[i - 1][:, tokens:tokens + 3], atol=0, rtol=0)
    assert [n for n, p in vpt.named_parameters() if p.requires_grad] == ["prompts"]
    assert (out - hidden(case.model()(**inputs))).abs().min() > 0  # every real token attends to the prompts
    vpt.remove()
    torch.testing.assert_close(hidden(backbone(**inputs)), hidden(case.model()(**inputs)), atol=0, rtol=0)


# --- Side-Tuning and LST: never back-propagate into the backbone --------------------------------------
SIDE = {"side_tuning": (SideTuning, SideTuningConfig), "lst": (LadderSideTuning, LSTConfig)}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("method", ["side_tuning", "lst", "bypass"])
def test_side_networks_never_back_propagate_into_the_backbone(method, family):
    case = CASES[family]
    backbone = case.model()
    weights = copy.deepcopy(backbone.state_dict())
    model = build_classifier(method, backbone, 3, {})
    _train_steps(model, case.inputs())
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in backbone.state_dict().items())
    # What autograd saves for a call from inputs equals what it saves for the side network alone on
    # features computed beforehand (run as a live forward runs them: `forward_live`): the backbone adds nothing
    # to the graph.
    with SavedTensorMeter(model.parameters()) as whole:
        model(**case.inputs()).sum()
    features = model.features(**case.inputs())
    with SavedTensorMeter(model.parameters()) as side_only:
        model.forward_live(features, case.inputs().get("attention_mask")).sum()
    assert whole.bytes == side_only.bytes > 0
    # The same call with autograd through the backbone (as a method that trains inside it has) saves more.
    model.taps.grad = True
    model.base_model.requires_grad_(True)
    with SavedTensorMeter(model.parameters()) as through:
        model(**case.inputs()).sum()
    assert through.bytes > whole.bytes


@pytest.mark.parametrize("method", ["side_tuning", "lst"])
def test_side_networks_start_from_the_backbone_and_learn(method):
    cls, config_cls = SIDE[method]
    case = CASES["bert"]
    model = cls(case.model(), config_cls(num_classes=3))
    losses = _train_steps(model, case.inputs(), steps=8)
    assert losses[-1] < losses[0]
    if method == "side_tuning":
        # A zero up-projection: the blend starts as half the last layer, which ViT's final LayerNorm
        # reads as the last layer itself, so the model starts as a linear probe.
        vit = CASES["vit"]
        probe = build_classifier("linear", vit.model(), 3, {})
        fresh = SideTuning(vit.model(), SideTuningConfig(num_classes=3))
        probe.head.load_state_dict(fresh.head.state_dict())
        torch.testing.assert_close(fresh(**vit.inputs()), probe(**vit.inputs()), atol=1e-4, rtol=1e-4)
    else:
        assert model.gates.abs().min() > 0  # every ladder gate (0 at init) was trained
        assert len(model.downs) == len(model.plan.points) + 1  # one ladder rung per layer, and x_0


def test_vpt_shallow_refuses_a_causal_encoder():
    with pytest.raises(ConfigError, match="causal"):
        VPTShallow(CASES["clip_text"].model(), tokens=2)


def test_side_networks_need_token_features():
    from conftest import CNN_CASES

    with pytest.raises(ConfigError, match="reads tokens"):
        build_classifier("lst", CNN_CASES["resnet"].model(), 2, {})


def test_last_layer_classifier_counts_only_what_the_read_out_uses():
    model = build_classifier("full", CASES["bert"].model(), 2, {})
    assert isinstance(model, LastLayerClassifier)
    assert not any(p.requires_grad for p in model.runner.pooler.parameters())
    assert isinstance(build_classifier("restuning", CASES["bert"].model(), 2, {}).runner, ResTuningModel)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vpt_shallow_prompts_never_attend_to_padding(attn):
    """A padded sample gives what it gives alone without padding: the prompts, which are carried from
    block to block, must not read the padding tokens (their query rows keep the key padding mask)."""
    case = CASES["bert"]
    vpt = VPTShallow(case.model(attn).requires_grad_(False), tokens=3)
    inputs = case.inputs()  # the second sample has 5 real tokens and 4 padding tokens
    padded = hidden(vpt(**inputs))[1, :5]
    ids = inputs["input_ids"][1:, :5]
    alone = hidden(vpt(input_ids=ids, attention_mask=torch.ones_like(ids)))[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_preset_overrides_of_dim_reach_every_preset():
    """`{"dim": n}` sets the size of each preset's tuners, LoRA's rank included (default rank 8)."""
    def sizes(method: str, config: dict) -> set[int]:
        runner = build_classifier(method, CASES["vit"].model(), 2, config).runner
        return {t.lora_A.shape[0] for t in runner.tuners.values()}

    assert sizes("lora", {}) == {8}
    assert sizes("lora", {"dim": 16}) == {16}


def test_peft_lora_alpha_follows_its_rank_as_ours_does():
    """Our LoRA scales by alpha/r = 1 at any rank; PEFT's, with `lora_alpha` not given, does the same."""
    pytest.importorskip("peft")
    theirs = build_classifier("peft_lora", CASES["vit"].model(), 3, {"r": 4})
    layers = [m for m in theirs.runner.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    assert layers and all(m.scaling["default"] == 1.0 and m.r["default"] == 4 for m in layers)
    explicit = build_classifier("peft_lora", CASES["vit"].model(), 3, {"r": 4, "lora_alpha": 8})
    assert {m.scaling["default"] for m in explicit.runner.modules() if isinstance(getattr(m, "scaling", None), dict)} \
        == {2.0}
    ours = build_classifier("lora", CASES["vit"].model(), 3, {"dim": 4}).runner
    assert {t.scaling for t in ours.tuners.values()} == {1.0}
