"""`ResTuningBypassModel`: a frozen backbone run without autograd, feature taps, one bypass task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint, precision
from ..errors import ConfigError
from ..ops import family_for_model
from ..params import ParameterReport
from ..precision import trainable_dtype
from .compiled import CompiledTask
from .config import BACKBONE_TOKENS, BypassConfig
from .network import BypassTask
from .taps import BlockCalls, FeatureTaps, TapPlan

METHOD = BypassTask.checkpoint_method


class FrozenBackbone(ParameterReport, nn.Module):
    """A backbone that only ever runs in eval mode without autograd, and the taps that read it.

    Subclasses own the tasks. Calls go to the backbone with the backbone's own arguments.
    """

    # Examples per frozen-backbone forward (None: the whole batch), or else chunks of at most `backbone_tokens`
    # positions of x_0 (None: the whole batch). Without autograd the chunks' features are the whole batch's, while
    # the forward's transient activations shrink with the chunk.
    backbone_batch: int | None = None
    backbone_tokens: int | None = BACKBONE_TOKENS
    # Before each frozen forward and after it (or each chunk of it), on the CPU, hand what the C allocator kept of
    # freed memory back to the OS (`precision.release_freed_memory`); False keeps glibc's own behaviour. Between
    # its tapped blocks and after each of its int8 layers too, where the resident set has grown by
    # `hand_back_growth` bytes since the last hand-back: glibc serves a forward's temporaries (an int8 layer's
    # dequantized weights among them) from ever new parts of a fragmented heap, and on SD v1.5's int8 UNet the
    # resident set grew by over 200 MiB within one up block while what was in use stayed flat. Only there,
    # because every hand-back makes the next allocations fault their pages in again: after every tapped block it
    # cost a ViT-B/16 or MiniLM forward 20-40% more CPU time. The int8 layers are those of the backbone as it is
    # wrapped: one quantized after that is checked at its taps only.
    release_host_memory: bool = True
    hand_back_growth: int = 128 * 2**20

    def __init__(self, model: nn.Module, plan: TapPlan, needed: int, first_token_only: bool = False,
                 calls: tuple[str, ...] = ()):
        """`calls`: tapped blocks whose calls each forward records, to run them again (`features_and_calls`)."""
        super().__init__()
        self.base_model = model.eval()
        self.plan = plan
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.taps = FeatureTaps(model, plan.points[:needed], first_token_only, calls=calls,
                                between_taps=self._hand_back_if_grown).attach()
        self._positions: dict[tuple, int] = {}  # shapes of an example's arguments -> positions of its x_0
        self._hand_backs = precision.HandBack()
        self._layer_checks = [m.register_forward_hook(self._after_int8_layer) for m in model.modules()
                              if any(precision.is_quantized(p) for p in m.parameters(recurse=False))]

    @property
    def runner(self) -> nn.Module:
        """What the backbone is called through: the plan's tower, or the model itself."""
        return self.base_model.get_submodule(self.plan.call) if self.plan.call else self.base_model

    @property
    def final_norm(self) -> nn.Module | None:
        return self.base_model.get_submodule(self.plan.final_norm) if self.plan.final_norm else None

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.base_model.eval()  # frozen features: no dropout, no batch-norm statistics updates
        return self

    def forward(self, *args: Any, features: list[torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        """Backbone inputs as the backbone takes them; or `features=` already tapped (from a
        `FeatureCache`), with `attention_mask=` where the pooling needs it."""
        if features is None:
            return self.forward_live(self.features(*args, **kwargs), kwargs.get("attention_mask"))
        return self.forward_features(features, kwargs.get("attention_mask"))

    def forward_features(
        self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the subclass computes from features tapped earlier [x_0, ..., x_L] (e.g. from a `FeatureCache`)."""
        raise NotImplementedError

    def forward_live(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same from features this call's backbone forward just tapped; by default `forward_features`."""
        return self.forward_features(features, attention_mask)

    def features(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """One backbone forward without autograd (through the plan's tower, where it names one): [x_0, x_1, ...]
        as tapped (channels-first for CNNs), in chunks of examples (`backbone_batch`, `backbone_tokens`), each
        chunk's features copied into the whole batch's as it comes (never all held twice)."""
        runner, batch = self.runner, _batch_size(args, kwargs)
        inputs = _batched(args, kwargs)
        if inputs:
            self._hand_back(inputs[0])
        size = self._chunk_size(args, kwargs, batch)
        if size is None or batch <= size:
            return self._released(self.taps(lambda: runner(*args, **kwargs)))
        features: list[torch.Tensor] = []
        for start in range(0, batch, size):
            a, k = _chunk(args, kwargs, batch, start, size)
            part = self.taps(lambda a=a, k=k: runner(*a, **k))
            rows = min(size, batch - start)
            if any(f.shape[0] != rows for f in part):
                raise RuntimeError(
                    f"backbone_batch: a chunk of {rows} examples of the backbone call gave features of "
                    f"{sorted({f.shape[0] for f in part})} rows: not every argument of the call is split by example "
                    f"(backbone_batch: null and backbone_tokens: null run the whole batch at once)")
            if not features:
                features = [f.new_empty((batch, *f.shape[1:])) for f in part]
            for whole, f in zip(features, part, strict=True):
                whole[start:start + rows] = f
            del part
            self._released(features)
        return features

    def _released(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """`features`, after handing the forward's freed host memory back (`release_host_memory`)."""
        if features:
            self._hand_back(features[0])
        return features

    def _hand_back(self, on: torch.Tensor) -> None:
        """Hand freed host memory back (`release_host_memory`) where `on`, a tensor of the forward, is on the CPU."""
        if self.release_host_memory and on.device.type == "cpu":
            self._hand_backs.now()

    def _hand_back_if_grown(self, on: torch.Tensor) -> None:
        """After a tapped block or an int8 layer (`on`, its output): hand back where the resident set grew by
        `hand_back_growth` since the last time."""
        if self.release_host_memory and on.device.type == "cpu":
            self._hand_backs.if_grown(self.hand_back_growth)

    def _after_int8_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self._hand_back_if_grown(output)

    def _chunk_size(self, args: tuple, kwargs: dict, batch: int | None) -> int | None:
        """Examples per chunk (None: the whole batch): `backbone_batch`; else, for a call whose arguments are all
        split by example (`_splits_by_example`), as many as hold `backbone_tokens` positions of x_0, counted once
        per shape of an example by running one example up to the first tap (so a batch of a given shape is
        always cut, and its features rounded, the same way)."""
        if batch is None or batch <= 1:
            return None
        if self.backbone_batch is not None:
            return self.backbone_batch
        if self.backbone_tokens is None or not _splits_by_example(args, kwargs, batch):
            return None
        shapes = _example_shapes(args, kwargs)
        if shapes not in self._positions:
            if len(self._positions) >= 64:  # bounded, for inputs padded to ever new lengths
                self._positions.clear()
            a, k = _chunk(args, kwargs, batch, 0, 1)
            self._positions[shapes] = _positions(self.taps.first_shape(lambda: self.runner(*a, **k)), self.plan.layout)
        return max(1, self.backbone_tokens // self._positions[shapes])

    def features_and_calls(self, *args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], BlockCalls]:
        """As `features` (in one piece), and the recorded calls of the taps' `calls` blocks."""
        runner = self.runner
        return self.taps.with_calls(lambda: runner(*args, **kwargs))

    def _retap(self, needed: int, first_token_only: bool) -> None:
        if len(self.taps.points) != needed or self.taps.first_token_only != first_token_only:
            self.taps.detach()
            self.taps = FeatureTaps(self.base_model, self.plan.points[:needed], first_token_only,
                                    calls=self.taps.calls, between_taps=self._hand_back_if_grown).attach()

    def unload(self) -> nn.Module:
        """Remove the taps and restore requires_grad; return the pristine backbone."""
        self.taps.detach()
        for handle in self._layer_checks:
            handle.remove()
        self._layer_checks.clear()
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        return self.base_model


def _batched(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()]


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The call's batch: the first dimension of its first tensor argument (None: no tensor argument)."""
    tensors = _batched(args, kwargs)
    return tensors[0].shape[0] if tensors else None


def _splits_by_example(args: tuple, kwargs: dict, batch: int) -> bool:
    """Whether a call can be cut into examples without knowing its arguments' meaning: every tensor argument is
    a scalar or (batch, ...) with at least 2 dimensions, and nothing else holds tensors. A 1-d tensor may be
    per example (a UNet's timesteps) or not (GPT-2's position ids); a cache, a dict or a tuple of tensors (SDXL's
    added conditions, ControlNet's residuals) is not cut here, so such calls run whole."""
    def plain(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.dim() == 0 or (value.dim() >= 2 and value.shape[0] == batch)
        return value is None or isinstance(value, (bool, int, float, str))
    return all(plain(v) for v in (*args, *kwargs.values()))


def _example_shapes(args: tuple, kwargs: dict) -> tuple[tuple[int, ...], ...]:
    """The shapes of one example of each tensor argument: what the positions of an example depend on."""
    return tuple(tuple(t.shape[1:]) for t in _batched(args, kwargs))


def _positions(shape: torch.Size, layout: str) -> int:
    """Positions of one example of x_0: tokens of (B, T, D), H x W of a channels-first map (B, C, H, W)."""
    return max(1, shape[1:-1].numel() if layout == "tokens" else shape[2:].numel())


def _chunk(args: tuple, kwargs: dict, batch: int, start: int, size: int) -> tuple[tuple, dict]:
    """The call's arguments for examples [start, start + size): tensors whose first dimension is the batch's are
    sliced, everything else passes whole."""
    def part(value: Any) -> Any:
        is_batched = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch
        return value[start:start + size] if is_batched else value

    return tuple(part(a) for a in args), {k: part(v) for k, v in kwargs.items()}


def _needed(task: BypassTask) -> int:
    return task.needed


class ResTuningBypassModel(FrozenBackbone):
    """Res-Tuning-Bypass on one task. `model(**inputs)` returns logits (B, num_classes), or the pooled
    final bypass state (B, width) when the config has no `num_classes`."""

    task_class: type[BypassTask] = BypassTask

    def __init__(self, model: nn.Module, config: BypassConfig, task: BypassTask | None = None):
        plan = task.plan if task is not None else self.task_class.plan_for(model, config)
        task = task if task is not None else _build_task(model, plan, config, self.task_class)
        super().__init__(model, plan, _needed(task), task.first_token_only, task.reinjected)
        self.backbone_batch, self.backbone_tokens = config.backbone_batch, config.backbone_tokens
        self.bypass_config = config
        self.task = task

    def forward(self, *args: Any, features: list[torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        if features is None and self.task.reinjected:  # the last blocks run again on the bypass state
            if kwargs.get("past_key_values") is not None:
                raise ConfigError("reinject runs the last blocks again on this call's tokens alone; it cannot "
                                  "continue a key/value cache (past_key_values)")
            features, calls = self.features_and_calls(*args, **kwargs)
            return self._task_call()(features, kwargs.get("attention_mask"), self.final_norm, blocks=calls)
        return super().forward(*args, features=features, **kwargs)

    @property
    def cacheable(self) -> bool:
        """Whether training may read this model's features from a feature cache (no block runs again)."""
        return not self.task.reinjected

    @property
    def bypass(self) -> nn.Module:
        return self.task.bypass

    @property
    def head(self) -> nn.Module:
        return self.task.head

    def forward_features(
        self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the task on features tapped earlier (e.g. from a `FeatureCache`), without recomputing its steps
        in backward whatever `config.recompute` says: the cache already holds every `x_l` of the data set, so
        recomputing would save only the batch's step intermediates (a few (B, T, D) per layer, small beside the
        cache) and would run the bypass forward twice."""
        return self._task_call()(features, attention_mask, self.final_norm, recompute=False)

    def forward_live(self, features: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the task on the features of this call's backbone forward, recomputing as `config.recompute` says."""
        return self._task_call()(features, attention_mask, self.final_norm)

    # --- torch.compile ---------------------------------------------------------------------------
    _compiled: CompiledTask | None = None

    def compile_task(self, enabled: bool = True, **options: Any) -> CompiledTask | None:
        """From now on run the task through `torch.compile(task, **options)` (`enabled=False`: eagerly again).
        Where compiling fails, at once or at a later call, the task runs eagerly with a warning
        (`CompiledTask.failure` says why). Parameters and checkpoints are unchanged."""
        if enabled and self.task.reinjected:
            raise ConfigError("compile_task: a re-injecting task (reinject) calls the backbone's blocks from inside "
                              "it, on the arguments of each call; run it eagerly")
        self._compiled = CompiledTask(self.task, **options) if enabled else None
        return self._compiled

    def _task_call(self) -> Callable[..., torch.Tensor]:
        """The task, or its compiled form where `compile_task` made one for this task."""
        compiled = self._compiled
        return compiled if compiled is not None and compiled.task is self.task else self.task

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the task's weights (safetensors) and config (JSON), each atomically; `extra` joins the
        JSON (a run's record of itself)."""
        save_task(self.task, self.base_model, Path(save_directory), extra)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, is_trainable: bool = False
    ) -> ResTuningBypassModel:
        """Build the saved task on `model`. Everything is checked before the backbone is touched."""
        task = load_task(model, Path(directory), cls.task_class)
        tuned = cls(model, task.config, task)
        if not is_trainable:
            tuned.eval()
            for p in tuned.task.parameters():
                p.requires_grad_(False)
        return tuned


def _build_task(model: nn.Module, plan: TapPlan, config: BypassConfig,
                task_class: type[BypassTask] = BypassTask) -> BypassTask:
    ref = next(model.parameters())
    return task_class(plan, config).to(device=ref.device, dtype=trainable_dtype(ref))


def save_task(task: BypassTask, backbone: nn.Module, directory: Path, extra: dict[str, Any] | None = None) -> None:
    meta = {**(extra or {}), "method": task.checkpoint_method, "config": task.config.to_dict(),
            "backbone": checkpoint.backbone_signature(backbone),
            "taps": {"points": list(task.plan.points), "widths": list(task.plan.widths)}}
    checkpoint.save(directory, task.state_dict(), meta)


def load_task(model: nn.Module, directory: Path, task_class: type[BypassTask] = BypassTask) -> BypassTask:
    """Read and check a saved bypass task (of `task_class`) for `model`; nothing is attached to `model`."""
    meta, tensors = checkpoint.load(directory)
    method = task_class.checkpoint_method
    if meta.get("method") != method:
        raise checkpoint.CheckpointError(f"{directory}: holds a {meta.get('method')!r} checkpoint, not {method}")
    checkpoint.check_backbone(meta, model, directory)
    try:
        config = BypassConfig.from_dict(meta["config"])
    except (ConfigError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{directory}: the saved config cannot be read ({err})") from err
    plan = task_class.plan_for(model, config)
    saved = meta.get("taps", {})
    if saved.get("points") != list(plan.points) or saved.get("widths") != list(plan.widths):
        raise checkpoint.CheckpointError(
            f"{directory}: the checkpoint taps {saved.get('points')} (widths {saved.get('widths')}), this backbone "
            f"{list(plan.points)} (widths {list(plan.widths)})"
        )
    task = _build_task(model, plan, config, task_class)
    checkpoint.check_tensors(tensors, task.state_dict(), directory)
    task.load_state_dict({k: v.to(task.state_dict()[k].dtype) for k, v in tensors.items()})
    return task



# Backbone family name -> its single-task bypass model, where it is not `ResTuningBypassModel` (the UNet's
# family registers `UNetBypassModel`).
BYPASS_MODELS: dict[str, type[ResTuningBypassModel]] = {}


def register_bypass_model(family: str, model_class: type[ResTuningBypassModel]) -> None:
    BYPASS_MODELS[family] = model_class


def bypass_model_class(model: nn.Module) -> type[ResTuningBypassModel]:
    """The bypass model for `model`'s family."""
    family = family_for_model(model)
    return BYPASS_MODELS.get(family.name if family else "", ResTuningBypassModel)
