"""The bypass network of paper eq. 8 and the task that reads it out.

    b_0 = x_0,   b_l = lam_l * H_l(x_l) + (1 - lam_l) * V_l(b_{l-1}),   lam_l = sigmoid(theta_l)

`H_l` and `V_l` are `identity + Res-Tuner`; with zero-initialised tuners and `theta_l = 0` the bypass
is a fixed ensemble of the layer features (paper Table 3b, "none"). Between CNN stages of other
sizes, `V_l` first carries `b_{l-1}` to `x_l`'s resolution and width (`VerticalStep.carry`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, TunerSpec
from ..precision import run_frozen
from ..spatial import resample
from ..tuners import OpContext, ResTuner, build_tuner
from .config import BypassConfig
from .fused import fusable, fused_step
from .pooled import kept_per_row, pooled_bypass
from .pooling import LINEAR_POOLINGS, LinearPool, pool
from .taps import TapPlan, is_unet, plan_taps


class Residual(nn.Module):
    """`x + tuner(x, x)`: a Res-Tuner in parallel to the identity op; the identity when `tuner` is None."""

    def __init__(self, tuner: ResTuner | None):
        super().__init__()
        self.tuner = tuner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tuner is None else x + self.tuner(x, x)


class VerticalStep(nn.Module):
    """`V_l`: carry `b_{l-1}` to layer l (`carry`: resample positions, project width), then `identity + tuner`."""

    def __init__(self, in_width: int, out_width: int, tuner: ResTuner | None, layout: str):
        super().__init__()
        self.layout = layout
        self.project = nn.Linear(in_width, out_width) if in_width != out_width else None
        self.residual = Residual(tuner)

    def forward(self, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """b: (B, T, D) or channels-last (B, H, W, C); like: x_l, whose positions b is carried to."""
        return self.residual(self.carry(b, like))

    def carry(self, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """b at `like`'s positions (resampled) and width (projected): (B, *like.shape[1:-1], out_width).

        Resampling averages positions with weights that sum to one and the projection maps each position on
        its own, so the two commute, bias included; the one that makes the smaller intermediate runs first (a
        decoder stage that doubles the resolution and halves the width projects first, keeping a quarter)."""
        if b.shape[1:-1] == like.shape[1:-1]:
            return b if self.project is None else self.project(b)
        if self.layout != "map":
            raise ValueError(f"bypass: token counts differ between layers ({b.shape} -> {like.shape})")
        size = tuple(like.shape[1:3])
        projected_first, resampled_first = b.shape[1:-1].numel() * like.shape[-1], math.prod(size) * b.shape[-1]
        if self.project is not None and projected_first < resampled_first:
            return _resampled(self.project(b), size)
        b = _resampled(b, size)
        return b if self.project is None else self.project(b)


def _resampled(b: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A channels-last map (B, H, W, C) resampled to (B, *size, C)."""
    return resample(b.movedim(-1, 1), size).movedim(1, -1)


class BypassNetwork(nn.Module):
    """Gated horizontal/vertical Res-Tuners over `L` tapped layers of widths `widths[1:]`."""

    def __init__(self, widths: list[int], config: BypassConfig, layout: str, grid: bool = False, causal: bool = False):
        """`grid`, `causal`: what the tuners may know of the tokens (`TapPlan.grid`, `TapPlan.causal`)."""
        super().__init__()
        grid = grid or layout == "map"
        depth = len(widths) - 1
        self.recompute, self.combine = config.recompute, config.combine
        if config.combine == "softmax":
            if len(set(widths[1:])) != 1:
                raise ConfigError(f"combine: softmax sums the layers' features, which needs one width; the tapped "
                                  f"layers have widths {sorted(set(widths[1:]))}")
            self.layer_logits = nn.Parameter(torch.zeros(depth))  # equal weights at init
        else:
            self.theta = nn.Parameter(torch.full((depth,), float(config.gate_init)))
        if config.reinject >= depth:  # the first block run again reads the state of at least one layer
            raise ConfigError(f"reinject: {config.reinject} blocks, but the bypass reads {depth} layers; at most "
                              f"{depth - 1} (the first block run again reads the bypass state after a layer)")
        self.reinject = config.reinject
        # s_j of `z = x + s_j (b - x)` for the last `reinject` blocks: zero, so the blocks first see their own input.
        self.reinject_gates = nn.Parameter(torch.zeros(config.reinject)) if config.reinject else None
        self.horizontal = nn.ModuleList(
            Residual(_tuner(config.horizontal, OpContext(w, w, grid=grid, causal=causal), config.dim,
                            f"bypass horizontal {i}"))
            for i, w in enumerate(widths[1:])
        )
        self.vertical = nn.ModuleList(  # no chain under softmax weighting
            VerticalStep(w_in, w_out, _tuner(config.vertical, OpContext(w_out, w_out, grid=grid, causal=causal),
                                             config.dim, f"bypass vertical {i}"), layout)
            for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True))
        ) if config.combine == "gates" else nn.ModuleList()
        # Steps that can run as `fused_step` (two plain Res-Adapters, no width projection).
        self.fused = [fusable(h.tuner, v.residual.tuner) for h, v in zip(self.horizontal, self.vertical, strict=False)]

    @property
    def gates(self) -> torch.Tensor:
        """lam_l = sigmoid(theta_l), (L,) (`combine: gates`); the layer weights softmax(w), (L,), otherwise."""
        return torch.sigmoid(self.theta) if self.combine == "gates" else torch.softmax(self.layer_logits, 0)

    @property
    def mixing(self) -> nn.Parameter:
        """The parameter that joins the layers (gates or layer logits): it always trains and sets the dtype."""
        return self.theta if self.combine == "gates" else self.layer_logits

    def forward(self, features: list[torch.Tensor], recompute: bool | None = None,
                rerun: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """features: [x_0, x_1, ..., x_L], each (B, T, D_l) or channels-last (B, H_l, W_l, C_l), in any floating
        dtype: each `x_l` is cast to the bypass's dtype inside its step, so a low-precision backbone's features
        are not copied to float32 all at once (under `recompute`, backward keeps the low-precision `x_l`).
        Returns b_L. `recompute`: recompute each step in backward (None: the config's `recompute`).
        `rerun(i, z)`: the frozen block of step i (0-based; it made `x_{i+1}`) on the hidden state z (B, T, D),
        with autograd through its activations (kept for backward whatever `recompute` says); needed, and then
        used, for the last `reinject` steps, whose `x_{i+1}` it recomputes from `z = x_i + s (b_i - x_i)`
        (`x_i` the frozen or re-run input's source, `s` a learned gate, unbounded, zero at init)."""
        mixing = self.mixing
        recompute = self.recompute if recompute is None else recompute
        recompute = recompute and torch.is_grad_enabled() and mixing.requires_grad
        if self.combine == "softmax":
            return self._weighted(features[1:], recompute)
        if self.reinject and rerun is None:
            raise ValueError(f"this bypass re-injects its state into the last {self.reinject} blocks, so it runs on "
                             f"a live backbone forward, model(**inputs), not on features tapped earlier (features=, "
                             f"a feature cache)")
        b = features[0].to(mixing.dtype)
        first_rerun = len(features) - 1 - self.reinject
        x_prev = features[first_rerun]
        for i, x in enumerate(features[1:]):
            if i >= first_rerun:
                z = torch.lerp(x_prev.to(b.dtype), b, self.reinject_gates[i - first_rerun].to(b.dtype))
                x = x_prev = rerun(i, z)
            if recompute:
                # Reentrant: the step's inputs go through ctx.save_for_backward, so what is kept stays
                # visible to saved_tensors_hooks (and to SavedTensorMeter); theta makes the step need grad.
                b = checkpoint(self._step, i, self.theta, b, x, use_reentrant=True)
            else:
                b = self._step(i, self.theta, b, x)
        return b

    def _weighted(self, features: list[torch.Tensor], recompute: bool) -> torch.Tensor:
        """sum_l softmax(w)_l H_l(x_l)."""
        weights, b = torch.softmax(self.layer_logits, 0), None
        for i, x in enumerate(features):
            if b is not None and x.shape != b.shape:
                raise ValueError(f"bypass combine softmax: layer {i} is {tuple(x.shape)}, the earlier ones "
                                 f"{tuple(b.shape)}; the layers must agree to be summed")
            if recompute and self.horizontal[i].tuner is not None:  # keep x_l (backbone dtype), recompute H_l
                h = checkpoint(self._horizontal, i, self.layer_logits, x, use_reentrant=True)
            else:
                h = self._horizontal(i, self.layer_logits, x)
            term = weights[i].to(h.dtype) * h
            b = term if b is None else b + term
        return b

    def _horizontal(self, i: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal[i](x.to(logits.dtype))

    def _step(self, i: int, theta: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.fused[i] and not torch.is_autocast_enabled(x.device.type):
            carried = self.vertical[i].carry(b, x)  # autograd through the resampling and projection, if any
            x = x.to(carried.dtype, memory_format=torch.contiguous_format)  # a map's channels-last view: one copy
            return fused_step(carried, x, theta[i], self.horizontal[i].tuner, self.vertical[i].residual.tuner)
        h = self.horizontal[i](x.to(theta.dtype))
        v = self.vertical[i](b, like=x).to(h.dtype)  # under autocast a projection may change the dtype
        return torch.lerp(v, h, torch.sigmoid(theta[i]).to(h.dtype))  # (1 - lam) V + lam H

    def pooled_form_applies(self, features: list[torch.Tensor]) -> bool:
        """Whether `pooled` computes this bypass on `features` (gates, every step two plain Res-Adapters, one
        contiguous shape for every layer, no re-injection, no autocast) and keeps less for backward than the
        checkpointed steps would: its (N, r)-wide projections grow with depth times rank (and it keeps a (D,)
        vector per example and step), the steps' states with depth times width; so a bypass on the CLS token
        alone, one position, runs step by step."""
        if not (self.combine == "gates" and not self.reinject and len(self.fused) == len(features) - 1
                and all(self.fused) and all(v.project is None for v in self.vertical)
                and all(f.shape == features[0].shape for f in features)
                and all(f.is_contiguous() for f in features)  # (N, D) views, not copies (maps come channels-first)
                and not torch.is_autocast_enabled(features[0].device.type)):
            return False
        width, positions = features[0].shape[-1], features[0].shape[1:-1].numel()
        kept = kept_per_row([v.residual.tuner.down.out_features for v in self.vertical],
                            [h.tuner.down.out_features for h in self.horizontal], width, positions)
        return kept <= (len(self.vertical) - 1) * width

    def pooled(self, features: list[torch.Tensor], pool: LinearPool) -> torch.Tensor:
        """pool(b_L), (B, D), without materialising any b_l
        (`restuning.bypass.pooled`; only where `pooled_form_applies`). features: as `forward`."""
        return pooled_bypass(features, self.gates, [h.tuner for h in self.horizontal],
                             [v.residual.tuner for v in self.vertical], pool)

    @property
    def position_wise(self) -> bool:
        """True when every step maps each position on its own (no resampling, position-wise tuners)."""
        steps = [*self.horizontal, *(v.residual for v in self.vertical)]
        return all(s.tuner is None or s.tuner.position_wise for s in steps)


def _tuner(spec: TunerSpec | None, ctx: OpContext, dim: int, where: str) -> ResTuner | None:
    return None if spec is None else build_tuner(spec, ctx, dim, where)


class BypassTask(nn.Module):
    """One task: a bypass network over the chosen tapped layers, pooling, and a head.

    It reads tapped features and knows nothing else of the backbone, so several tasks can share one
    backbone forward. The backbone's frozen final norm is passed in by the owner of the backbone.
    Subclasses for other backbones (the UNet's) change `plan_for`, `checkpoint_method` and the read-out.
    """

    checkpoint_method = "restuning_bypass"
    # Read a bypass of plain Res-Adapters out through `BypassNetwork.pooled` where the read-out is linear
    # (False: always step by step, e.g. to measure the difference).
    pooled_form = True

    @classmethod
    def plan_for(cls, model: nn.Module, config: BypassConfig) -> TapPlan:
        """Where a task of this kind reads `model`; nothing is attached."""
        if is_unet(model) and config.taps is None:
            raise ConfigError("a diffusers UNet has its own bypass (middle and decoder blocks into its output head): "
                              "restuning.get_restuning_model(unet, BypassConfig(...)), or restuning.diffusion's "
                              "UNetBypassModel / UNetMultiTaskBypass")
        return plan_taps(model, config)

    def __init__(self, plan: TapPlan, config: BypassConfig):
        super().__init__()
        self.plan, self.config = plan, config
        self.layers = sorted(set(config.layers)) if config.layers is not None else list(range(plan.depth))
        chosen = [plan.widths[0], *(plan.widths[i + 1] for i in self.layers)]
        self.bypass = BypassNetwork(chosen, config, plan.layout, plan.grid, plan.causal)
        self.head = nn.Linear(chosen[-1], config.num_classes) if config.num_classes else nn.Identity()
        self.attention_pool = AttentionPool(chosen[-1]) if plan.pooling == "attention" else None
        # The backbone's final norm fits the bypass state if it ends at the last layer, or all widths agree.
        self.uses_final_norm = plan.final_norm is not None and (
            self.layers[-1] == plan.depth - 1 or len(set(plan.widths)) == 1
        )
        # The head reads the first token and nothing mixes tokens: the bypass on that token alone is exact.
        self.first_token_only = (plan.layout == "tokens" and plan.pooling == "cls" and self.bypass.position_wise
                                 and not config.reinject)
        if config.reinject and plan.layout != "tokens":
            raise ConfigError(f"reinject runs token blocks again on the bypass state; this backbone's layers are "
                              f"{plan.layout!r} (reinject: 0)")

    @property
    def reinjected(self) -> tuple[str, ...]:
        """The tapped blocks that run again on the bypass state (`config.reinject`), in forward order."""
        return self.plan.points[len(self.plan.points) - self.config.reinject:] if self.config.reinject else ()

    @property
    def needed(self) -> int:
        """How many tapped layers the backbone must run to feed this task."""
        return max(self.layers) + 1

    def forward(
        self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None,
        final_norm: nn.Module | None = None, recompute: bool | None = None,
        blocks: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """features: [x_0, x_1, ..., x_depth] as tapped; attention_mask: (B, T) for mean pooling; `recompute`:
        as `BypassNetwork.forward`; `blocks(name, hidden)`: the frozen block `name` run again on `hidden` (a
        `BlockCalls` of this forward), for `reinjected`. Returns logits (B, num_classes), or the pooled final
        state (B, width) without a head."""
        chosen = self.chosen(features)
        if self.reads_pooled(chosen, final_norm):  # the same numbers, without any full-width b_l
            pooled = self.bypass.pooled(chosen, LinearPool(self.plan.pooling, attention_mask, self.bypass.mixing.dtype))
            if final_norm is not None and self.uses_final_norm:
                pooled = run_frozen(final_norm, pooled)
            return self.head(pooled)
        rerun = None if blocks is None else (lambda i, z: blocks(self.plan.points[i], z))
        b = self.bypass(chosen, recompute, rerun)
        return self.head(read_out(b, self.plan, attention_mask, final_norm if self.uses_final_norm else None,
                                  self.attention_pool))

    def chosen(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """[x_0, x_l for l in `layers`] of the tapped features, as the bypass reads them: the first token alone
        where `first_token_only`, maps channels-last."""
        chosen = [features[0], *(features[i + 1] for i in self.layers)]
        if self.first_token_only:
            chosen = [f[:, :1] for f in chosen]
        return [f.movedim(1, -1) for f in chosen] if self.plan.layout == "map" else chosen

    def reads_pooled(self, chosen: list[torch.Tensor], final_norm: nn.Module | None) -> bool:
        """Whether `forward` reads the bypass out through `BypassNetwork.pooled` on `chosen` features: the
        read-out is linear in b_L (a pooling of positions, the final norm, if any, after it), the bypass has the
        pooled form, and `pooled_form` is on."""
        norm_first = final_norm is not None and self.uses_final_norm and not self.plan.norm_after_pool
        return (self.pooled_form and self.plan.pooling in LINEAR_POOLINGS and not norm_first
                and self.bypass.pooled_form_applies(chosen))


def read_out(b: torch.Tensor, plan: TapPlan, attention_mask: torch.Tensor | None = None,
             final_norm: nn.Module | None = None, attention_pool: AttentionPool | None = None) -> torch.Tensor:
    """The backbone's own read-out of a last-layer state: its final norm and the plan's pooling (`attention`:
    through `attention_pool`). b: (B, T, D) or channels-last (B, H, W, C). Returns (B, D)."""
    if final_norm is not None and not plan.norm_after_pool:
        b = run_frozen(final_norm, b)
    if plan.pooling == "attention":
        if attention_pool is None:
            raise ValueError("pooling 'attention' needs the task's AttentionPool")
        pooled = attention_pool(b, attention_mask)
    else:
        pooled = pool(b, plan.pooling, attention_mask)
    if final_norm is not None and plan.norm_after_pool:
        pooled = run_frozen(final_norm, pooled)
    return pooled


class AttentionPool(nn.Module):
    """A learned query attends over the tokens (or map positions) of the final state: `sum_t a_t b_t`,
    `a = softmax(b q / sqrt(D))` over the unmasked tokens; `q` is zero at init, so it starts as the mean."""

    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))

    def forward(self, b: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """b: (B, T, D) or channels-last (B, H, W, D); attention_mask: (B, T) or None. Returns (B, D)."""
        b = b.flatten(1, -2)
        scores = b @ self.query.to(b.dtype) / b.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask.to(b.device) == 0, float("-inf"))
        return (torch.softmax(scores, dim=1).unsqueeze(-1) * b).sum(1)
