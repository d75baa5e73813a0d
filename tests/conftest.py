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
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

WIDTH, HEADS, DEPTH = 32, 4, 2
_COMMON = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=48)


@dataclass
class ModelCase:
    name: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[[], dict]

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


def hidden(output) -> torch.Tensor:
    return output.last_hidden_state


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
