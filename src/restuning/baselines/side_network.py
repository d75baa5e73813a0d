"""What Side-Tuning and LST share: a frozen backbone read through taps (no autograd, as the bypass),
a small side transformer over tokens, and a classification head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bypass import BypassConfig, plan_taps
from ..bypass.config import backbone_batch_option, backbone_tokens_option
from ..bypass.model import FrozenBackbone
from ..config import ConfigBase, check_family, option
from ..errors import ConfigError
from ..precision import trainable_dtype

SIDE_POOLINGS = ("auto", "cls", "mean")  # a side network reads tokens


@dataclass
class SideNetworkOptions(ConfigBase):
    """The options every side network has: where it reads the frozen backbone and how that forward runs."""

    pooling: str = option("auto", choices=SIDE_POOLINGS, help="as `pooling` of bypass (`auto`, `cls` or `mean`)")
    family: str | None = option(None, help="force an op map (as `family` of restuning)")
    backbone_batch: int | None = backbone_batch_option()
    backbone_tokens: int | None = backbone_tokens_option()

    def validate(self) -> None:
        check_family(self.family)


def side_block(width: int, heads: int) -> nn.TransformerEncoderLayer:
    """One pre-norm transformer layer of the side network, (B, T, width) -> (B, T, width)."""
    if width % heads:
        raise ConfigError(f"side network: width {width} is not divisible by heads {heads}")
    return nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                      norm_first=True)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A transformers keep-mask (B, T) of 1/0 as the padding mask of `nn.TransformerEncoderLayer`."""
    return None if attention_mask is None else ~attention_mask.bool()


class SideNetworkModel(FrozenBackbone):
    """Base of the side-network baselines: taps every layer of a frozen token backbone."""

    def __init__(self, model: nn.Module, config: SideNetworkOptions, what: str):
        plan = plan_taps(model, BypassConfig(pooling=config.pooling, family=config.family))
        if plan.layout != "tokens":
            raise ConfigError(f"{what}: the side network reads tokens (B, T, D); this backbone gives feature maps")
        super().__init__(model, plan, plan.depth)
        self.backbone_batch, self.backbone_tokens = config.backbone_batch, config.backbone_tokens

    def _place(self) -> None:
        ref = next(self.base_model.parameters())
        for name, child in self.named_children():
            if name != "base_model":
                child.to(device=ref.device, dtype=trainable_dtype(ref))
