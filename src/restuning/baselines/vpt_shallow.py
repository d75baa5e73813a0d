"""VPT-shallow (Jia et al., 2022): n learnable prompt tokens joined to the input of the first block only.

They then pass through every block like the other tokens and are dropped after the last block, so the
read-out sees the original tokens. Attention is blind to token order (position embeddings are added
before the first block), so joining the prompts at the end equals VPT's placement after [CLS].
Every query sees the prompts; the prompts' own query rows see the prompts and every key that some real
query sees, never the padding (their outputs are carried to the next block, so this matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase, check_family, option
from ..errors import ConfigError
from ..hooks import first_input, output_tensor, with_input
from ..methods.classifier import LastLayerClassifier
from ..methods.registry import Method, register_method
from ..ops import block_stacks, widths
from ..params import ParameterReport


@dataclass
class VPTShallowConfig(ConfigBase):
    """VPT-shallow's options."""

    tokens: int = option(10, ge=1, help="prompt tokens joined at block 0 (VPT: 10 to 200)")
    family: str | None = option(None, help="force an op map (as `family` of restuning)")

    def validate(self) -> None:
        check_family(self.family)


class VPTShallow(ParameterReport, nn.Module):
    """Prompts (n, D) joined at block 0; later blocks get their attention masks widened by n.
    Calls go to the backbone with its own arguments; its parameters stay as they are (freeze them)."""

    def __init__(self, model: nn.Module, tokens: int = 10, family: str | None = None):
        super().__init__()
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ConfigError(f"vpt_shallow tokens: expected a positive integer, got {tokens!r}")
        config = getattr(model, "config", None)
        if getattr(config, "is_decoder", False) or getattr(config, "model_type", "") == "clip_text_model":
            raise ConfigError("vpt_shallow joins prompts after the last token, which a causal mask hides from "
                              "every real token; use it on bidirectional encoders")
        stacks = block_stacks(model, family)
        if stacks[0].family.layout != "tokens" or len(stacks) != 1:
            raise ConfigError("vpt_shallow needs one stack of transformer blocks over tokens")
        self.base_model, self.tokens = model, tokens
        blocks = stacks[0].blocks
        ref = next(blocks[0].parameters())
        width = widths(blocks[0], "vpt_shallow: block 0")[0]
        self.prompts = nn.Parameter(torch.empty(tokens, width, dtype=ref.dtype, device=ref.device))
        nn.init.uniform_(self.prompts, -0.1, 0.1)  # narrow, like VPT's Xavier-uniform prompts
        self.handles = [blocks[0].register_forward_pre_hook(self._join, with_kwargs=True)]
        self.handles += [b.register_forward_pre_hook(self._widen, with_kwargs=True) for b in blocks[1:]]
        self.handles.append(blocks[-1].register_forward_hook(self._drop))

    def _join(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = first_input(args, kwargs)
        prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        return with_input(args, kwargs, torch.cat([x, prompts], dim=1), self._widen_mask)

    def _widen(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return with_input(args, kwargs, None, self._widen_mask)

    def _widen_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return _prompt_mask(mask, self.tokens)

    def _drop(self, module: nn.Module, args: tuple, output: Any) -> Any:
        out = output_tensor(output)[:, : -self.tokens]
        return out if isinstance(output, torch.Tensor) else (out, *output[1:])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Detach the hooks; return the backbone as it was."""
        for handle in self.handles:
            handle.remove()
        return self.base_model


def _prompt_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A transformers attention mask (additive float or boolean keep, (..., Q, K)) for `n` prompts joined
    at the end: every query sees them (n more key columns), and with per-query rows (Q > 1) the prompts'
    rows see the prompts and the keys that any real query sees (the non-padding ones), not the padding."""
    keep = mask.dtype == torch.bool
    mask = F.pad(mask, (0, n), value=True if keep else 0.0)
    if mask.ndim > 2 and mask.shape[-2] > 1:  # (B, T) keep masks and (B, 1, 1, T) ones have no query rows
        seen = mask.any(dim=-2, keepdim=True) if keep else mask.amax(dim=-2, keepdim=True)
        mask = torch.cat([mask, seen.expand(*mask.shape[:-2], n, mask.shape[-1])], dim=-2)
    return mask


def build(backbone: nn.Module, options: VPTShallowConfig, num_classes: int | None) -> nn.Module:
    backbone.requires_grad_(False)
    return LastLayerClassifier(VPTShallow(backbone, options.tokens, options.family), backbone, num_classes,
                               frozen=False)


register_method(Method("vpt_shallow", build, options=VPTShallowConfig,
                       summary="VPT-shallow: prompts joined at block 0 only (VPTShallowConfig)"))
