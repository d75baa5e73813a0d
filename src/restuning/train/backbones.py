"""Backbones by name: the shipped assets, a Hugging Face id, or a local folder; and how their inputs are made."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import assets
from ..config import ConfigError
from ..data import LabelledData
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, resize
from ..precision import set_backbone_dtype

SHIPPED = ("all-MiniLM-L6-v2", "dinov2-small", "efficientnet-lite0")


@dataclass
class Backbone:
    """A frozen-able model and the recipe for its inputs. `input_name` is the keyword the model's
    forward takes (`pixel_values`, `input_ids`, or `inputs` for EfficientNet)."""

    name: str
    model: nn.Module
    kind: str  # "image" | "text"
    input_name: str
    tokenizer: Any = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def encode(self, data: LabelledData, image_size: int, max_length: int) -> dict[str, torch.Tensor]:
        """Model inputs for a whole set: images resized and normalised, or texts tokenised and padded."""
        if data.kind != self.kind:
            raise ConfigError(f"backbone {self.name!r} takes {self.kind} inputs, the data holds {data.kind}s")
        if self.kind == "text":
            batch = self.tokenizer(list(data.inputs), padding="max_length", truncation=True, max_length=max_length,
                                   return_tensors="pt")
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return {self.input_name: self.prepare(resize(data.inputs, image_size))}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> what the model expects."""
        return normalise(images, self.mean, self.std)


def load_backbone(name: str, dtype: str = "float32") -> Backbone:
    """`name`: a shipped asset, a local folder or a Hugging Face id (needs the network unless cached), held in
    `dtype` (`backbone_dtype`: a folder or id is read straight into bfloat16 for a low-precision one, so that
    no float32 copy is ever made; int8 then quantizes its linear layers)."""
    backbone = _load(name, dtype)
    set_backbone_dtype(backbone.model, dtype)
    return backbone


def _load(name: str, dtype: str) -> Backbone:
    if name == "all-MiniLM-L6-v2":
        model, tokenizer = assets.minilm()
        return Backbone(name, model, "text", "input_ids", tokenizer)
    if name == "dinov2-small":
        return Backbone(name, assets.dinov2_small(), "image", "pixel_values")
    if name == "efficientnet-lite0":  # expects x * 2 - 1 for x in [0, 1]
        return Backbone(name, assets.efficientnet_lite0(), "image", "inputs", mean=(0.5,) * 3, std=(0.5,) * 3)
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(name, **({} if dtype == "float32" else {"dtype": torch.bfloat16}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"backbone: cannot load {name!r} (shipped: {SHIPPED}; else a HF id or folder): {err}"
                          ) from err
    first = next(iter(p for p in inspect.signature(model.forward).parameters if p != "self"), "")
    if first == "input_ids":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # most causal LMs: pad with EOS (the
            tokenizer.pad_token = tokenizer.eos_token  # mask hides it; decoders read the last real token)
        return Backbone(name, model, "text", "input_ids", tokenizer)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:  # no processor config: ImageNet statistics
        pass
    return Backbone(name, model, "image", "pixel_values", mean=mean, std=std)
