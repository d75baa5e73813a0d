"""Res-Tuning on a Stable Diffusion UNet (diffusers.UNet2DConditionModel), a tiny one built in code.

Ops: self-attention (mha), cross-attention (xattn) and FFN of the transformer blocks, and the ResNet
blocks (block, on (B, C, H, W) maps), in the middle block and the decoder by default (paper Sec. 5).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

from restuning import OpMatchError, ResTuningConfig, ResTuningModel, TunerSpec, get_restuning_model  # noqa: E402
from restuning.testing.reference import BoundVPTDeep  # noqa: E402

TUNERS = ["res_adapter", "res_prefix", "res_prompt", "lora", "bitfit", "ssf"]
OPS = ["mha", "xattn", "ffn", "block"]
MID_RESNETS = [4, 5]  # block numbers of mid_block.resnets (diffusers registers up_blocks before mid_block)
TOL = 1e-5


def tiny_unet(attn: str = "sdpa") -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet.set_attn_processor(AttnProcessor2_0() if attn == "sdpa" else AttnProcessor())
    return unet.eval()


def unet_inputs() -> dict:
    """Latents (2, 4, 8, 8), two timesteps, text states (2, 5, 32) with the second one padded."""
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


def predict(model) -> torch.Tensor:
    return model(**unet_inputs()).sample


def spec(tuner: str, op: str, **options) -> TunerSpec:
    # res_prompt off an attention needs equal widths: only the middle block's ResNets keep theirs.
    layers = MID_RESNETS if (tuner, op) == ("res_prompt", "block") else None
    return TunerSpec(tuner, dim=4, layers=layers, options=options)


def one_op(tuner: str, op: str, **options) -> ResTuningConfig:
    return ResTuningConfig(**{"mha": None, "ffn": None, op: spec(tuner, op, **options)})


def all_ops(tuner: str) -> ResTuningConfig:
    return ResTuningConfig(**{op: spec(tuner, op) for op in OPS})


def train_steps(tuned, steps: int = 2, lr: float = 0.1) -> None:
    """SGD on a fixed linear loss; two steps, so that zero-initialised branches (gates, LoRA B) open."""
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = predict(tuned)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- placement ---------------------------------------------------------------------------------
def test_default_placement_is_middle_block_and_decoder():
    tuned = get_restuning_model(tiny_unet(), ResTuningConfig(xattn="res_adapter", block="res_adapter"))
    sites = list(tuned.sites.values())
    assert all(s.entry.startswith(("mid_block.", "up_blocks.")) for s in sites)
    blocks = [f"{b}.attentions.{i}.transformer_blocks.0" for b, i in
              (("up_blocks.1", 0), ("up_blocks.1", 1), ("mid_block", 0))]
    by_kind = {kind: [s.exit for s in sites if s.kind == kind] for kind in OPS}
    assert by_kind["mha"] == [f"{b}.attn1" for b in blocks]
    assert by_kind["xattn"] == [f"{b}.attn2" for b in blocks]
    assert by_kind["ffn"] == [f"{b}.ff" for b in blocks]
    assert by_kind["block"] == ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0",
                                "up_blocks.1.resnets.1", "mid_block.resnets.0", "mid_block.resnets.1"]
    assert {s.layout for s in sites if s.kind == "block"} == {"map"}
    assert {s.layout for s in sites if s.kind != "block"} == {"tokens"}
    xattn = next(s for s in sites if s.kind == "xattn").attention
    # diffusers' `attention_head_dim=8` of an SD-style UNet is in fact its number of heads.
    assert xattn.key.endswith("attn2.to_k") and xattn.norm is None and xattn.num_heads == 8
    mha = next(s for s in sites if s.kind == "mha").attention
    assert mha.norm.endswith("transformer_blocks.0.norm1") and mha.out.endswith("attn1.to_out.0")
    # Default config (Dual Res-Adapters): mha + ffn of the 3 transformer blocks.
    assert len(get_restuning_model(tiny_unet()).sites) == 6


def test_unet_full_family_adds_the_encoder():
    tuned = get_restuning_model(tiny_unet(), ResTuningConfig(family="unet_full", block="res_adapter"))
    entries = [s.entry for s in tuned.sites.values()]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in entries
    assert {"down_blocks.0.resnets.0", "down_blocks.1.resnets.0"} <= set(entries)


def test_target_modules_reach_any_attention():
    """An override finds a cross-attention's projections by name, here in the encoder."""
    config = ResTuningConfig(mha=None, ffn=None, xattn=TunerSpec("res_prefix", 4),
                             target_modules={"xattn": r"down_blocks\..*\.attn2"})
    tuned = get_restuning_model(tiny_unet(), config)
    (site,) = tuned.sites.values()
    assert site.entry == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert site.attention.key == site.entry + ".to_k" and tuned.tuners[site.key].uses_attention
    torch.testing.assert_close(predict(tuned), predict(tiny_unet()), atol=1e-6, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="res_prompt off an attention needs equal input and output widths"):
        get_restuning_model(tiny_unet(), ResTuningConfig(mha=None, ffn=None, block="res_prompt"))
    from conftest import CASES

    with pytest.raises(OpMatchError, match="vit family has no xattn op"):
        get_restuning_model(CASES["vit"].model(), ResTuningConfig(xattn="res_prefix"))


# --- step 0, training, checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tuner", TUNERS)
def test_init_equals_frozen_unet(tuner, op):
    reference = predict(tiny_unet()).detach()
    tuned = get_restuning_model(tiny_unet(), one_op(tuner, op))
    torch.testing.assert_close(predict(tuned), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tuner", TUNERS)
def test_gradients_reach_tuners_only(tuner):
    base = tiny_unet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    reference = predict(base).detach()
    tuned = get_restuning_model(base, all_ops(tuner))
    assert {s.kind for s in tuned.sites.values()} == set(OPS)
    trainable = tuned.trainable_parameters()
    assert trainable and all(n.startswith("adapters.default.tuners.") for n in trainable)
    train_steps(tuned)
    assert all(p.grad is None for p in base.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    for kind in OPS:  # every op kind's tuners received gradient
        grads = [p.grad for key, t in tuned.tuners.items() if key.startswith(kind + "@") for p in t.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), kind
    assert (predict(tuned) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("tuner", ["res_adapter", "res_prefix", "res_prompt"])
def test_save_load_roundtrip(tuner, tmp_path):
    tuned = get_restuning_model(tiny_unet(), all_ops(tuner))
    train_steps(tuned)
    tuned.save_pretrained(tmp_path)
    restored = ResTuningModel.from_pretrained(tiny_unet(), tmp_path)
    saved, loaded = tuned.tuner_state_dict(), restored.tuner_state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # Equal weights, but CPU kernels for the (B, C, H, W) maps' channels-last views round differently when
    # the weights do not require grad (from_pretrained's default): equal to float rounding, not bitwise.
    with torch.no_grad():
        torch.testing.assert_close(predict(restored), predict(tuned), atol=1e-6, rtol=0)
    assert tuned.unload() is not None and not any(m._forward_hooks for m in tuned.base_model.modules())


# --- exact unbinding on the UNet's attention -------------------------------------------------------
class BoundPrefixProcessor:
    """Prefix tuning as published: K_pre, V_pre (H, n, d) joined to the attention's keys and values
    (self- or cross-attention), written as a diffusers attention processor."""

    def __init__(self, prefix_key: torch.Tensor, prefix_value: torch.Tensor):
        self.prefix_key, self.prefix_value = prefix_key, prefix_value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads

        def split(t):  # (B, T, H*d) -> (B, H, T, d)
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        k = torch.cat([self.prefix_key.expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([self.prefix_value.expand(b, -1, -1, -1), v], dim=2)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attention_mask is not None:  # diffusers: additive (B, 1, S); the prefix stays visible
            scores = scores + torch.nn.functional.pad(attention_mask[:, None], (self.prefix_key.shape[-2], 0))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def _compare(bound_model, bound_params, tuned, tuned_params) -> None:
    """Same weights in both forms -> the same noise prediction and the same gradients, to TOL."""
    with torch.no_grad():
        for pb, pu in zip(bound_params, tuned_params):
            pu.copy_(pb)
    outs = []
    for model in (bound_model, tuned):
        out = predict(model)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    assert (outs[0] - outs[1]).abs().max() < TOL
    for pb, pu in zip(bound_params, tuned_params):
        assert (pb.grad - pu.grad).abs().max() < TOL * max(1.0, pb.grad.abs().max().item())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("op", ["mha", "xattn"])
def test_res_prefix_exact_equals_prefix_tuning(op, attn):
    tuned = get_restuning_model(tiny_unet(attn), one_op("res_prefix", op, mode="exact"))
    bound_model = tiny_unet(attn).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    bound_params = []
    for site in tuned.sites.values():
        shape = tuned.tuners[site.key].prefix_key.shape
        k_pre = torch.nn.Parameter(torch.randn(shape, generator=g))
        v_pre = torch.nn.Parameter(torch.randn(shape, generator=g))
        bound_model.get_submodule(site.entry).set_processor(BoundPrefixProcessor(k_pre, v_pre))
        bound_params += [k_pre, v_pre]
    tuned_params = [p for t in tuned.tuners.values() for p in (t.prefix_key, t.prefix_value)]
    # The prefix must change the prediction, or equality would prove nothing.
    assert (predict(bound_model) - predict(tiny_unet(attn))).abs().max() > 1e-3
    _compare(bound_model, bound_params, tuned, tuned_params)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_res_prompt_exact_equals_vpt_deep_on_self_attention(attn):
    """VPT-deep on the transformer blocks: prompts joined to each block's input and dropped after it.
    The cross-attention and FFN are per query token, so only the self-attention sees the prompts."""
    tuned = get_restuning_model(tiny_unet(attn), one_op("res_prompt", "mha", mode="exact"))
    bound_model = tiny_unet(attn).requires_grad_(False)
    bounds = [BoundVPTDeep(bound_model, [s.block], 4, s.in_features) for s in tuned.sites.values()]
    bound_params = [p for b in bounds for p in b.prompts.values()]
    try:
        assert (predict(bound_model) - predict(tiny_unet(attn))).abs().max() > 1e-3
        _compare(bound_model, bound_params, tuned, [t.prompt for t in tuned.tuners.values()])
    finally:
        for b in bounds:
            b.remove()


def test_res_prompt_exact_on_cross_attention_equals_prompts_joined_to_the_text():
    """On a cross-attention the prompts live in the text-state space: exact Res-Prompt equals joining
    them to the text encoder states that this attention reads (its padding mask kept)."""
    tuned = get_restuning_model(tiny_unet(), one_op("res_prompt", "xattn", mode="exact"))
    bound_model = tiny_unet().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    bound_params, handles = [], []

    def join(prompt):
        def hook(module, args, kwargs):
            text = kwargs["encoder_hidden_states"]
            n = prompt.shape[0]
            kwargs = {**kwargs, "encoder_hidden_states": torch.cat([text, prompt.expand(text.shape[0], -1, -1)], 1)}
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = torch.nn.functional.pad(kwargs["attention_mask"], (0, n))
            return args, kwargs

        return hook

    for site in tuned.sites.values():
        assert tuned.tuners[site.key].prompt.shape == (4, 32)  # cross_attention_dim
        prompt = torch.nn.Parameter(torch.randn(4, 32, generator=g))
        module = bound_model.get_submodule(site.entry)
        handles.append(module.register_forward_pre_hook(join(prompt), with_kwargs=True))
        bound_params.append(prompt)
    try:
        _compare(bound_model, bound_params, tuned, [t.prompt for t in tuned.tuners.values()])
    finally:
        for h in handles:
            h.remove()
