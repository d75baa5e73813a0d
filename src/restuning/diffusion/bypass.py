"""Res-Tuning-Bypass for a Stable Diffusion UNet (diffusers `UNet2DConditionModel`, paper Fig. 9).

The bypass reads the middle block and the decoder (up) blocks, in forward order:

    x_0 = input of mid_block,  x_1 = mid_block output,  x_2.. = up_blocks.0 .. up_blocks.N outputs
    b_0 = x_0,  b_l = lam_l * H_l(x_l) + (1 - lam_l) * V_l(b_{l-1})        (eq. 8, `BypassNetwork`)

Stages differ in resolution and width, so each `V_l` resamples and projects `b_{l-1}`. The last state
enters the UNet's own output head through a zero-initialised projection `Z`:

    noise = conv_out(act(norm_out(x_L + Z(b_L))))

so at step 0 the noise prediction is the frozen UNet's. The UNet runs once without autograd and stops
after its last up block; only the bypass, `Z` and the (frozen, cheap) output head run with autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..bypass.config import BypassConfig
from ..bypass.model import ResTuningBypassModel
from ..bypass.multitask import MultiTaskBypass
from ..bypass.network import BypassTask
from ..bypass.taps import TapPlan, is_unet
from ..config import ConfigError
from ..spatial import resample


def plan_unet_taps(model: nn.Module, config: BypassConfig) -> TapPlan:
    """Taps of a UNet: `mid_block` (when it has one) and every up block, in forward order.

    diffusers registers `up_blocks` before `mid_block`, so the order comes from the UNet's forward,
    not from `named_modules`. Widths come from `config.block_out_channels`."""
    check_unet_config(model, config)
    channels = list(model.config.block_out_channels)
    ups = [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    has_mid = getattr(model, "mid_block", None) is not None
    points = (["mid_block"] if has_mid else []) + ups
    up_widths = list(reversed(channels))[: len(ups)]
    widths = (channels[-1], *([channels[-1]] if has_mid else []), *up_widths)
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < len(points)]
        if bad:
            raise ConfigError(
                f"layers: {bad} out of range; the UNet bypass taps {points} (layers 0..{len(points) - 1})"
            )
    return TapPlan(tuple(points), widths, layout="map", pooling="avg", final_norm=None)


def check_unet_config(model: nn.Module, config: BypassConfig) -> None:
    """What a UNet bypass cannot honour is an error, not silently ignored."""
    if not is_unet(model):
        raise ConfigError(f"the UNet bypass needs a diffusers UNet2DConditionModel, got {type(model).__name__}")
    if config.num_classes is not None:
        raise ConfigError("num_classes: a UNet bypass predicts noise through the UNet's own output head; "
                          "leave num_classes unset (None)")
    if config.pooling != "auto":
        raise ConfigError(f"pooling={config.pooling!r}: a UNet bypass does not pool; leave pooling 'auto'")
    if config.taps is not None:
        raise ConfigError("taps: a UNet bypass always taps mid_block and the up blocks; use layers=[...] to "
                          "choose among them (0 = mid_block)")
    if config.family not in (None, "unet"):
        raise ConfigError(f"family={config.family!r}: a UNet bypass taps the 'unet' family (middle + decoder)")


class UNetBypassTask(BypassTask):
    """One generative task: the bypass over the chosen UNet taps and the zero-initialised projection `Z`.

    `forward(features)` returns the input of the UNet's output head, `x_L + Z(b_L)`, (B, C_0, H, W);
    the owner of the UNet applies its frozen head, so several tasks can share one UNet forward.
    """

    checkpoint_method = "restuning_bypass_unet"

    @classmethod
    def plan_for(cls, model: nn.Module, config: BypassConfig) -> TapPlan:
        return plan_unet_taps(model, config)

    def __init__(self, plan: TapPlan, config: BypassConfig):
        super().__init__(plan, config)  # no num_classes, so `head` is the identity
        chosen = plan.widths[0] if not self.layers else plan.widths[self.layers[-1] + 1]
        self.out = nn.Linear(chosen, plan.widths[-1])
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def needed(self) -> int:
        return self.plan.depth  # the head reads x_L, the last up block's output, whatever the bypass reads

    def forward(self, features: list[torch.Tensor], *_: Any, recompute: bool | None = None  # type: ignore[override]
                ) -> torch.Tensor:
        """features: [x_0, x_1, ..., x_L], channels-first (B, C_l, H_l, W_l); `recompute` as
        `BypassNetwork.forward`. Returns x_L + Z(b_L), (B, C_L, H, W)."""
        chosen = [features[0], *(features[i + 1] for i in self.layers)]
        b = self.bypass([f.movedim(1, -1) for f in chosen], recompute)  # channels-last (B, H, W, C)
        last = features[-1]
        if b.shape[1:3] != last.shape[-2:]:  # the bypass ends before the last up block
            b = resample(b.movedim(-1, 1), tuple(last.shape[-2:])).movedim(1, -1)
        return last + self.out(b).movedim(-1, 1).to(last.dtype)


def unet_output_head(unet: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The UNet's post-processing (conv_norm_out -> conv_act -> conv_out): (B, C_0, H, W) -> (B, C_out, H, W)."""
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class UNetBypassModel(ResTuningBypassModel):
    """Res-Tuning-Bypass on a diffusers `UNet2DConditionModel`, one task.

    `model(sample, timestep, encoder_hidden_states, **unet_kwargs)` returns the noise prediction as a
    tensor (B, out_channels, H, W), not diffusers' `UNet2DConditionOutput`. `features=[x_0, ..., x_L]`
    (from `model.features(...)`) skips the UNet. Checkpoints hold the bypass and `Z` only.
    """

    task_class = UNetBypassTask

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor | None = None, timestep: torch.Tensor | float | int | None = None,
        encoder_hidden_states: torch.Tensor | None = None, *, features: list[torch.Tensor] | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """sample: latents (B, C_in, H, W); timestep: scalar or (B,); encoder_hidden_states: (B, T, D_text).
        Returns the noise prediction (B, C_out, H, W)."""
        if features is None:
            features = self.features(sample, timestep, encoder_hidden_states, **_without_return_dict(unet_kwargs))
            return self.forward_live(features)
        return self.forward_features(features)

    def forward_features(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """From features tapped earlier: no recompute (as `ResTuningBypassModel.forward_features`)."""
        return unet_output_head(self.base_model, self.task(features, recompute=False))

    def forward_live(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return unet_output_head(self.base_model, self.task(features))


class UNetMultiTaskBypass(MultiTaskBypass):
    """Several UNet bypass tasks over one UNet forward per call (multi-task generation).

    `model(sample, timestep, encoder_hidden_states, task_ids=[...])` routes each sample to its own task
    and returns one noise tensor (B, C_out, H, W); without `task_ids`, `{task: (B, C_out, H, W)}`.
    Tasks come from `UNetBypassModel`s, `UNetBypassTask`s, `BypassConfig`s or checkpoint folders.
    """

    task_class = UNetBypassTask
    single_class = UNetBypassModel

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
        task_ids: Any = None, **unet_kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return super().forward(sample, timestep, encoder_hidden_states, task_ids=task_ids,
                               **_without_return_dict(unet_kwargs))

    def _run(self, task: BypassTask, features: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        return unet_output_head(self.base_model, task(features))

    def _gather(self, answers: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(answers)


def _without_return_dict(kwargs: dict[str, Any]) -> dict[str, Any]:
    # The UNet is stopped after its last up block, so how it would return its output does not matter.
    return {k: v for k, v in kwargs.items() if k != "return_dict"}
