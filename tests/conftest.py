"""Tiny backbones built in code, one per supported family, with inputs and an output reader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    DebertaV2Config,
    DebertaV2Model,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
    ResNetConfig,
    ResNetModel,
    SwinConfig,
    SwinModel,
    ViTConfig,
    ViTModel,
)

WIDTH, HEADS, DEPTH = 32, 4, 2
_COMMON = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=48)


def hidden(output) -> torch.Tensor:
    return output.last_hidden_state


@dataclass
class ModelCase:
    name: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[[], dict]
    read: Callable[[object], torch.Tensor] = hidden  # the model output -> one tensor (B, T, D) to compare

    def model(self, attn: str = "eager", depth: int = DEPTH) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build(attn, depth).eval()


def _with(config, attn: str):
    config._attn_implementation = attn
    return config


def _vit(attn, depth):
    return ViTModel(_with(ViTConfig(**{**_COMMON, "num_hidden_layers": depth}, image_size=16, patch_size=4,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), attn))


def _dinov2(attn, depth):
    return Dinov2Model(_with(Dinov2Config(hidden_size=WIDTH, num_hidden_layers=depth, num_attention_heads=HEADS,
                                          mlp_ratio=2, image_size=16, patch_size=4), attn))


def _bert(attn, depth):
    return BertModel(_with(BertConfig(**{**_COMMON, "num_hidden_layers": depth}, vocab_size=101,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), attn))


def _clip_text(attn, depth):
    return CLIPTextModel(_with(CLIPTextConfig(**{**_COMMON, "num_hidden_layers": depth}, vocab_size=101), attn))


def _clip_vision(attn, depth):
    return CLIPVisionModel(_with(CLIPVisionConfig(**{**_COMMON, "num_hidden_layers": depth}, image_size=16,
                                                  patch_size=4), attn))


def _pixels():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def _tokens():
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}


# Families beyond the encoders above, for the common tester's matrix and the discovery tests: Llama-style
# decoders with grouped-query attention (4 query heads, 2 key/value heads) and RoPE, GPT-2 (Conv1D, fused
# c_attn), DeBERTa-v2 (query_proj/key_proj/value_proj, relative attention as in v3), a Swin with two blocks per
# stage, and CLIPModel with both towers.
KV_HEADS = 2
_DECODER = dict(hidden_size=WIDTH, intermediate_size=48, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _decoder(model_class, config_class, **extra):
    def build(attn, depth):
        return model_class(_with(config_class(**_DECODER, num_hidden_layers=depth, **extra), attn))

    return build


def _gpt2(attn, depth):
    return GPT2Model(_with(GPT2Config(n_embd=WIDTH, n_layer=depth, n_head=HEADS, vocab_size=101, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2), attn))


def _deberta(attn, depth):
    return DebertaV2Model(_with(DebertaV2Config(**{**_COMMON, "num_hidden_layers": depth}, vocab_size=101,
                                                relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                max_relative_positions=16, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0), attn))


def _swin(attn, depth):
    return SwinModel(_with(SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[depth, depth],
                                      num_heads=[2, 4], window_size=4, drop_path_rate=0.0), attn))


def _clip(attn, depth):
    tower = dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=depth, num_attention_heads=HEADS)
    return CLIPModel(_with(CLIPConfig(text_config={**tower, "vocab_size": 101, "bos_token_id": 1, "eos_token_id": 2},
                                      vision_config={**tower, "image_size": 16, "patch_size": 4},
                                      projection_dim=16), attn))


def _tokens_and_pixels():
    return {**_tokens(), **_pixels()}


def _both_towers(output) -> torch.Tensor:
    """CLIPModel: both towers' last hidden states, side by side along the tokens, (B, T_text + T_image, D)."""
    return torch.cat([output.text_model_output.last_hidden_state, output.vision_model_output.last_hidden_state], 1)


FAMILY_CASES = {
    c.name: c
    for c in (
        ModelCase("llama", _decoder(LlamaModel, LlamaConfig), _tokens),
        ModelCase("mistral", _decoder(MistralModel, MistralConfig), _tokens),
        ModelCase("qwen2", _decoder(Qwen2Model, Qwen2Config), _tokens),
        ModelCase("gpt2", _gpt2, _tokens),
        ModelCase("deberta_v2", _deberta, _tokens),
        ModelCase("swin", _swin, _pixels),
        ModelCase("clip_model", _clip, _tokens_and_pixels, _both_towers),
    )
}

CASES = {
    c.name: c
    for c in (
        ModelCase("vit", _vit, _pixels),
        ModelCase("dinov2", _dinov2, _pixels),
        ModelCase("bert", _bert, _tokens),
        ModelCase("clip_text", _clip_text, _tokens),
        ModelCase("clip_vision", _clip_vision, _pixels),
    )
}


def tiny_vit_folder(root: str | Path) -> Path:
    """The tiny ViT of CASES saved as a model folder under `root` (once), for run configs' `backbone`."""
    folder = Path(root) / "tiny-vit"
    if not folder.exists():
        CASES["vit"].model().save_pretrained(folder)
    return folder


def train_steps(model: torch.nn.Module, inputs: dict, target: torch.Tensor, loss=torch.nn.functional.cross_entropy,
                steps: int = 2, lr: float = 1e-2, optimizer=torch.optim.AdamW) -> list[float]:
    """`steps` optimizer steps of `loss(model(**inputs), target)` on the trainable parameters, in train
    mode; leaves the model in eval mode and returns the losses."""
    model.train()
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(model(**inputs), target)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    model.eval()
    return losses


@pytest.fixture(params=sorted(CASES))
def case(request) -> ModelCase:
    return CASES[request.param]


# CNNs: stage outputs of different resolution and width. Built in code; the real EfficientNet-Lite0
# asset has its own targeted tests.
def _convnext(attn, depth):
    return ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, depth, 1], num_channels=3))


def _resnet(attn, depth):
    return ResNetModel(ResNetConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, depth, 1], embedding_size=8,
                                    layer_type="bottleneck"))


def _image32():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


CNN_CASES = {c.name: c for c in (ModelCase("convnext", _convnext, _image32), ModelCase("resnet", _resnet, _image32))}
ALL_CASES = {**CASES, **CNN_CASES}


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (precision included); a test that needs another precision
    starts from a fresh one and leaves a fresh one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
