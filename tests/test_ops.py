"""Finding ops: family maps, the structural fallback, user overrides and their errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, DEPTH, FAMILY_CASES, HEADS, KV_HEADS, WIDTH
from torch import nn

import restuning
from restuning import ConfigError, OpMatchError, ResTuningConfig, find_ops
from restuning.ops import family_for_model

EXPECTED_MHA_EXIT = {
    "vit": "layers.0.attention",
    "dinov2": "encoder.layer.0.attention",
    "bert": "encoder.layer.0.attention.output.dense",
    "clip_text": "encoder.layers.0.self_attn",
    "clip_vision": "encoder.layers.0.self_attn",
}


def test_family_maps_find_every_block(case):
    model = case.model()
    sites = find_ops(model, ResTuningConfig(block="res_adapter"))
    kinds = [s.kind for s in sites]
    assert kinds.count("mha") == kinds.count("ffn") == kinds.count("block") == DEPTH
    mha0 = next(s for s in sites if s.kind == "mha" and s.layer == 0)
    assert mha0.exit == EXPECTED_MHA_EXIT[case.name]
    assert mha0.attention is not None and mha0.attention.num_heads == 4


def test_structural_fallback_agrees_with_the_family_maps(case):
    model = case.model()
    config = dict(block="res_adapter")
    by_map = find_ops(model, ResTuningConfig(**config))
    by_structure = find_ops(model, ResTuningConfig(**config, family="structural"))
    assert [(s.kind, s.entry, s.exit, s.attention) for s in by_map] == \
        [(s.kind, s.entry, s.exit, s.attention) for s in by_structure]


class _Block(nn.Module):
    """A transformer block no map knows: odd names, still q/k/v/out then an FFN."""

    def __init__(self, width=16):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.mixer = nn.ModuleDict(dict(query=nn.Linear(width, width), key=nn.Linear(width, width),
                                        value=nn.Linear(width, width), proj=nn.Linear(width, width)))
        self.ln_2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x)
        q, k, v = (self.mixer[n](h).view(*h.shape[:2], 2, -1).transpose(1, 2) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.mixer["proj"](att.transpose(1, 2).reshape(h.shape))
        return x + self.ff(self.ln_2(x))


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.blocks[0].mixer.num_heads = self.blocks[1].mixer.num_heads = 2

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_structural_fallback_on_an_unknown_encoder():
    model = _Unknown()
    sites = find_ops(model, ResTuningConfig(mha="res_prefix", block="res_adapter"))
    mha = [s for s in sites if s.kind == "mha"]
    assert [s.exit for s in mha] == ["blocks.0.mixer.proj", "blocks.1.mixer.proj"]
    assert mha[0].entry == "blocks.0.mixer.query" and mha[0].attention.num_heads == 2  # ModuleDict: never called
    ffn = [s for s in sites if s.kind == "ffn"]
    assert [(s.entry, s.exit) for s in ffn] == [("blocks.0.ff", "blocks.0.ff"), ("blocks.1.ff", "blocks.1.ff")]
    x = torch.randn(2, 5, 16)
    reference = model(x)
    tuned = restuning.get_restuning_model(model, ResTuningConfig(mha="res_prefix", block="res_adapter"))
    torch.testing.assert_close(tuned(x), reference, atol=1e-6, rtol=0)


def test_no_blocks_found_lists_what_was_seen():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(OpMatchError, match="could not find transformer blocks.*ModuleLists"):
        find_ops(model, ResTuningConfig())


def test_override_with_peft_matching_rules():
    model = CASES["bert"].model()
    regex = ResTuningConfig(mha=None, ffn=None, custom={"qv": "lora"},
                            target_modules={"qv": r".*\.(query|value)"})
    assert [s.exit for s in find_ops(model, regex)] == [
        f"encoder.layer.{i}.attention.self.{n}" for i in range(DEPTH) for n in ("query", "value")]
    suffix = ResTuningConfig(mha=None, ffn=None, custom={"qv": "lora"}, target_modules={"qv": ["query"]})
    assert [s.layer for s in find_ops(model, suffix)] == list(range(DEPTH))


def test_override_zero_matches_lists_candidates():
    model = CASES["vit"].model()
    cfg = ResTuningConfig(mha=None, ffn="res_adapter", target_modules={"ffn": r".*\.feed_forward"})
    with pytest.raises(OpMatchError, match="matched no module.*module names include"):
        find_ops(model, cfg)


def test_override_ambiguous_match_is_an_error():
    model = CASES["bert"].model()
    cfg = ResTuningConfig(mha="res_adapter", ffn=None, target_modules={"mha": r".*\.attention(\.output)?"})
    with pytest.raises(OpMatchError, match="ambiguous.*nested"):
        find_ops(model, cfg)


def test_layer_subsets_and_bad_indices():
    model = CASES["vit"].model()
    sites = find_ops(model, ResTuningConfig(layers=[1]))
    assert {s.layer for s in sites} == {1}
    with pytest.raises(OpMatchError, match=r"out of range; the backbone has blocks 0..1"):
        find_ops(model, ResTuningConfig(layers=[5]))


def test_forced_family_that_does_not_fit():
    with pytest.raises(OpMatchError, match="does not fit this model"):
        find_ops(CASES["dinov2"].model(), ResTuningConfig(family="bert"))
    with pytest.raises(ConfigError, match="family: unknown family 'gpt'"):  # refused with the config
        ResTuningConfig(family="gpt")


def test_tuners_attach_by_hooks_not_patching():
    model = CASES["bert"].model()
    forwards = {name: type(m).forward for name, m in model.named_modules()}
    tuned = restuning.get_restuning_model(model, ResTuningConfig(mha="res_prefix", ffn="res_adapter"))
    assert all("forward" not in vars(m) for m in model.modules())
    assert {name: type(m).forward for name, m in model.named_modules()} == forwards
    handles = sum(len(a.handles) for a in tuned._attachments)
    assert handles == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- target_modules alone, on a plain nn.Module with no blocks (PEFT's first test case) ------------
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return _MLP()


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


PLAIN = {
    "ffn_adapter_regex": (_mlp, ResTuningConfig(mha=None, ffn="res_adapter", target_modules={"ffn": r"fc\d"})),
    "custom_lora_names": (_mlp, ResTuningConfig(mha=None, ffn=None, custom={"fc": "lora"},
                                                target_modules={"fc": ["fc1", "fc2"]})),
    "sequential_ffn": (_sequential, ResTuningConfig(mha=None, ffn="res_adapter", target_modules={"ffn": ["0", "2"]})),
}


@pytest.fixture(params=sorted(PLAIN))
def plain(request):
    return PLAIN[request.param]


def test_target_modules_alone_find_ops_on_a_module_without_blocks(plain):
    build, config = plain
    sites = find_ops(build(), config)
    assert len(sites) == 2 and all(s.layer is None and s.block is None for s in sites)
    assert [(s.in_features, s.out_features) for s in sites] == [(8, 16), (16, 4)]


def test_plain_module_step0_training_checkpoint_and_unload(plain, tmp_path):
    build, config = plain
    x, target = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    model = build()
    reference = model(x).detach()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = restuning.get_restuning_model(model, config)
    torch.testing.assert_close(tuned(x), reference, atol=0, rtol=0)

    tuned.train()
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(tuned(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    trained = tuned(x).detach()
    assert not torch.allclose(trained, reference)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())

    tuned.save_pretrained(tmp_path)
    loaded = restuning.ResTuningModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(loaded(x), trained, atol=0, rtol=0)

    pristine = tuned.unload()
    assert pristine is model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pristine.modules())
    assert all(p.requires_grad for p in pristine.parameters())
    torch.testing.assert_close(pristine(x), reference, atol=0, rtol=0)


def test_layers_without_blocks_is_a_clear_error():
    config = ResTuningConfig(mha=None, ffn="res_adapter", layers=[0], target_modules={"ffn": r"fc\d"})
    with pytest.raises(OpMatchError, match=r"ffn\.layers=\[0\].*no blocks were found in _MLP"):
        find_ops(_mlp(), config)


def test_no_blocks_error_gives_a_target_modules_example_that_works():
    import re

    model = _mlp()
    with pytest.raises(OpMatchError) as info:
        find_ops(model, ResTuningConfig())
    message = str(info.value)
    assert "ModuleLists: []" in message and "Modules: ['fc1', 'act', 'fc2']" in message
    assert "target_modules={'ffn': ['fc1', 'fc2']}" in message
    examples = re.findall(r"ResTuningConfig\([^()]*\)", message)
    assert len(examples) == 2
    x = torch.randn(2, 8)
    for example in examples:
        config = eval(example, {"ResTuningConfig": ResTuningConfig})  # noqa: S307 - our own message
        assert [s.exit for s in find_ops(model, config)] == ["fc1", "fc2"]
        torch.testing.assert_close(restuning.get_restuning_model(_mlp(), config)(x), _mlp()(x), atol=0, rtol=0)


def test_forced_family_is_still_checked_when_every_kind_is_named():
    config = ResTuningConfig(mha=None, ffn="res_adapter", family="vit", target_modules={"ffn": r"fc\d"})
    with pytest.raises(OpMatchError, match="family 'vit'"):
        find_ops(_mlp(), config)
    structural = ResTuningConfig(mha=None, ffn="res_adapter", family="structural", target_modules={"ffn": r"fc\d"})
    assert len(find_ops(_mlp(), structural)) == 2


# --- the further families: decoders with GQA and RoPE, GPT-2's Conv1D, DeBERTa-v2, Swin, CLIPModel ---------------
FAMILY_LAYOUT = {  # case -> (family map, mha exit of block 0, blocks, query heads, key/value heads, exact scores)
    "llama": ("llama", "layers.0.self_attn", DEPTH, 4, KV_HEADS, True),
    "mistral": ("llama", "layers.0.self_attn", DEPTH, 4, KV_HEADS, True),
    "qwen2": ("llama", "layers.0.self_attn", DEPTH, 4, KV_HEADS, True),
    "gpt2": ("gpt2", "h.0.attn", DEPTH, 4, 4, True),
    "deberta_v2": ("deberta_v2", "encoder.layer.0.attention.output.dense", DEPTH, 4, 4, False),
    "swin": ("swin", "encoder.layers.0.blocks.0.attention", 2 * DEPTH, 2, 2, False),
    "clip_model": ("clip", "text_model.encoder.layers.0.self_attn", 2 * DEPTH, 4, 4, True),
}


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_further_families_by_map_and_by_structure(name):
    family, exit0, blocks, heads, kv_heads, exact = FAMILY_LAYOUT[name]
    model = FAMILY_CASES[name].model()
    assert family_for_model(model).name == family
    by_map = find_ops(model, ResTuningConfig(block="res_adapter"))
    kinds = [s.kind for s in by_map]
    assert kinds.count("mha") == kinds.count("ffn") == kinds.count("block") == blocks
    mha0 = next(s for s in by_map if s.kind == "mha")
    assert mha0.exit == exit0 and mha0.layer == 0
    att = mha0.attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.exact) == (heads, kv_heads, 8, exact)
    by_structure = find_ops(model, ResTuningConfig(block="res_adapter", family="structural"))
    assert [(s.kind, s.layer, s.entry, s.exit, s.attention) for s in by_map] == \
        [(s.kind, s.layer, s.entry, s.exit, s.attention) for s in by_structure]


def test_swin_stages_number_their_blocks_globally():
    sites = find_ops(FAMILY_CASES["swin"].model(), ResTuningConfig(mha=None, ffn=None, block="res_adapter"))
    assert [(s.layer, s.exit) for s in sites] == [
        (0, "encoder.layers.0.blocks.0"), (1, "encoder.layers.0.blocks.1"),
        (2, "encoder.layers.1.blocks.0"), (3, "encoder.layers.1.blocks.1")]
    assert [(s.in_features, s.out_features) for s in sites] == [(16, 16), (16, 16), (32, 32), (32, 32)]
    later = find_ops(FAMILY_CASES["swin"].model(), ResTuningConfig(mha=None, ffn=None, block="res_adapter", layers=[3]))
    assert [s.exit for s in later] == ["encoder.layers.1.blocks.1"]


def test_gpt2_conv1d_widths_and_fused_attention():
    model = FAMILY_CASES["gpt2"].model()
    sites = find_ops(model, ResTuningConfig(mha="res_prompt", ffn="res_adapter"))
    ffn = next(s for s in sites if s.kind == "ffn")
    assert (ffn.entry, ffn.in_features, ffn.out_features) == ("h.0.mlp", WIDTH, WIDTH)
    att = next(s for s in sites if s.kind == "mha").attention
    assert att.fused and att.query == "h.0.attn.c_attn" and att.out == "h.0.attn.c_proj"
    lora = ResTuningConfig(mha=None, ffn=None, custom={"qkv": "lora"}, target_modules={"qkv": ["c_attn"]})
    assert [(s.exit, s.in_features, s.out_features) for s in find_ops(model, lora)] == [
        (f"h.{i}.attn.c_attn", WIDTH, 3 * WIDTH) for i in range(DEPTH)]


@pytest.mark.parametrize("name", ["deberta_v2", "swin"])
def test_exact_unbinding_is_refused_where_scores_carry_position_terms(name):
    with pytest.raises(ConfigError, match="relative-position terms.*use mode 'gated'"):
        exact = {"name": "res_prefix", "options": {"mode": "exact"}}
        restuning.get_restuning_model(FAMILY_CASES[name].model(), ResTuningConfig(mha=exact, ffn=None))


def _bloom():
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(0)
    return BloomModel(BloomConfig(hidden_size=WIDTH, n_layer=DEPTH, n_head=HEADS, vocab_size=101)).eval()


def test_a_family_nothing_finds_names_what_it_saw_and_a_config_that_works():
    """BLOOM interleaves its heads in `query_key_value`: no map, and the structural search must not split it."""
    import re

    model = _bloom()
    with pytest.raises(OpMatchError) as info:
        find_ops(model, ResTuningConfig())
    message = str(info.value)
    assert "ModuleLists: ['h']" in message and "query_key_value" in message and "Problems: []" not in message
    examples = re.findall(r"ResTuningConfig\((?:[^()]|\([^()]*\))*\)", message)
    assert len(examples) == 2
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(1))
    reference = model(input_ids=ids).last_hidden_state
    for example in examples:
        config = eval(example, {"ResTuningConfig": ResTuningConfig})  # noqa: S307 - our own message
        tuned = restuning.get_restuning_model(_bloom(), config)
        assert len(tuned.tuners) == 4 * DEPTH
        torch.testing.assert_close(tuned(input_ids=ids).last_hidden_state, reference, atol=1e-6, rtol=0)


def test_skipped_block_lists_are_reported():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(OpMatchError, match=r"Problems: \['layers: a block holds 1 weight layers"):
        find_ops(Tiny(), ResTuningConfig())
