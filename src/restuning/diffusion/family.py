"""The diffusers UNet as a backbone family: its op maps and its bypass model, registered on import.

`UNet2DConditionModel` (Stable Diffusion v1.x layout): its transformer blocks hold the token ops
(B, H*W, C) mha, xattn and ffn; its ResNet blocks are the block ops, on (B, C, H, W) maps. `unet` tunes
the middle block and the decoder, as the paper does; `unet_full` (`family="unet_full"`) adds the encoder.
Blocks are numbered in module order, which diffusers registers as down, up, then mid. This module needs
no diffusers install: UNets are recognised by class name.
"""

from __future__ import annotations

from ..bypass import register_bypass_model
from ..ops.maps import CNN_OPS, FamilyMap, register_family
from .bypass import UNetBypassModel

_ATTENTION = dict(mha=("attn1", "attn1"), xattn=("attn2", "attn2"), ffn=("ff", "ff"), query="attn1.to_q",
                  key="attn1.to_k", value="attn1.to_v", out="attn1.to_out.0", norm="norm1", chained=True,
                  block_op=False)


def _unet(name: str, class_names: tuple[str, ...], stages: str) -> FamilyMap:
    return FamilyMap(
        name=name, model_types=(), class_names=class_names,
        blocks=rf"{stages}\.attentions\.\d+\.transformer_blocks", **_ATTENTION,
        parts=(FamilyMap(name=f"{name}_resnets", model_types=(), blocks=rf"{stages}\.resnets", **CNN_OPS),),
    )


register_family(_unet("unet", ("UNet2DConditionModel",), r"(.*\.)?(mid_block|up_blocks\.\d+)"))
register_family(_unet("unet_full", (), r"(.*\.)?(mid_block|(down|up)_blocks\.\d+)"))
register_bypass_model("unet", UNetBypassModel)
