"""Feature taps: where the bypass reads the backbone, and the hooks that read it during one call."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import ConfigError
from ..hooks import first_input, output_tensor
from ..ops import FAMILIES, OpMatchError, block_stacks, family_for_model, name_matches, token_layout, widths
from ..precision import compute_dtype
from .config import BypassConfig


@dataclass(frozen=True)
class TapPlan:
    """Where a bypass reads a backbone. `x_0` is the input of `points[0]`; `x_l` the output of `points[l-1]`."""

    points: tuple[str, ...]
    widths: tuple[int, ...]  # width (hidden size or channels) of x_0, x_1, ..., x_L
    layout: str  # "tokens": (B, T, D); "map": (B, C, H, W)
    pooling: str
    final_norm: str | None
    norm_after_pool: bool = False
    call: str = ""  # the submodule the backbone is called through (a tower of a multi-tower model); "": the model
    grid: bool = False  # the tokens are an image's patch grid, or feature maps (`ops.token_layout`)
    causal: bool = False  # a decoder's tokens

    @property
    def depth(self) -> int:
        return len(self.points)


def plan_taps(model: nn.Module, config: BypassConfig) -> TapPlan:
    """Find the tapped layers of `model` (its blocks, or a CNN's stages; within `config.tower` if set) without
    touching it."""
    root, prefix = model, ""
    if config.tower:
        try:
            root, prefix = model.get_submodule(config.tower), config.tower + "."
        except AttributeError as err:
            raise OpMatchError(f"tower={config.tower!r}: no such submodule; top-level modules are "
                               f"{[n for n, _ in model.named_children()]}") from err
    if config.taps is not None:
        points = [n for n, _ in root.named_modules() if n and name_matches(n, config.taps)]
        if not points:
            sample = [n for n, _ in root.named_modules() if n][:40]
            raise OpMatchError(f"taps={config.taps!r} matched no module; module names include {sample}")
        family = FAMILIES.get(config.family) if config.family else family_for_model(root)
    else:
        stacks = block_stacks(root, config.family)
        family, points = stacks[0].family, _default_points(root, stacks)
    points = [prefix + p for p in points]
    layout = family.layout if family is not None else "tokens"
    first = widths(model.get_submodule(points[0]), f"tap {points[0]!r}")[0]
    outs = tuple(widths(model.get_submodule(p), f"tap {p!r}")[1] for p in points)
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < len(points)]
        if bad:
            raise ConfigError(f"layers: {bad} out of range; the backbone has tapped layers 0..{len(points) - 1}")
    norm = None
    if config.final_norm and family is not None and family.final_norm is not None:
        # The final norm is the last module of its name after the last tapped layer: blocks, the last tapped one or
        # later ones the taps stop before, may hold norms of the same name. It reads the last tap only at its width.
        names = [n for n, _ in model.named_modules()]
        after = names[names.index(points[-1]) + 1:]
        hits = [n for n in after if re.fullmatch(family.final_norm, n) and not n.startswith(points[-1] + ".")
                and n.startswith(prefix)]
        norm = hits[-1] if hits and _norm_width(model.get_submodule(hits[-1])) in (None, outs[-1]) else None
    grid, causal = token_layout(root)
    pooling = _pooling(root, config.pooling, layout, family)
    if layout == "map" and pooling in ("cls", "last"):
        raise ConfigError(f"pooling: {pooling!r} reads one token, and this backbone's layers are feature maps, "
                          f"which have none; use avg (or mean, the same on maps) or attention")
    return TapPlan(tuple(points), (first, *outs), layout, pooling, norm,
                   bool(family and family.norm_after_pool), config.tower or "", grid or layout == "map", causal)


def _norm_width(norm: nn.Module) -> int | None:
    """The width a norm layer normalises (None where it does not say)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def is_unet(model: nn.Module) -> bool:
    """A diffusers UNet2DConditionModel (the `unet` family), whose bypass is `restuning.diffusion.UNetBypassModel`."""
    family = family_for_model(model)
    return family is not None and family.name == "unet"


def _default_points(model: nn.Module, stacks) -> list[str]:
    family = stacks[0].family
    if family.layout == "tokens" and family.chained and len(stacks) > 1:
        last_stage = re.escape(stacks[-1].name) + r"\.\d+"
        raise OpMatchError(
            f"the bypass carries one token sequence from layer to layer, but the stages of this {family.name} change "
            f"the token count between {[s.name for s in stacks]}; tap the blocks of one stage, e.g. "
            f"BypassConfig(taps={last_stage!r})"
        )
    if family.taps is None:
        if len(stacks) > 1 and not family.chained:
            towers = sorted({s.name.split(".")[0] for s in stacks})
            raise OpMatchError(
                f"the bypass needs one chain of layers, but this model has {len(stacks)} block lists "
                f"{[s.name for s in stacks]} (e.g. two towers); name the tower it reads, "
                f"BypassConfig(tower={towers[0]!r}) (towers: {towers}), or the taps with taps=[...]"
            )
        return [f"{s.name}.{i}" for s in stacks for i in range(len(s.blocks))]
    containers = [n for n, m in model.named_modules() if re.fullmatch(family.taps, n)]
    return [f"{c}.{i}" for c in containers for i in range(len(model.get_submodule(c)))]


def _pooling(model: nn.Module, pooling: str, layout: str, family) -> str:
    if pooling != "auto":
        return pooling
    if layout == "map":
        return "avg"
    if family is not None and family.causal:
        return "last"
    params = [p for p in inspect.signature(model.forward).parameters if p != "self"]
    return "mean" if params and params[0] == "input_ids" else "cls"


class _Done(Exception):
    """Raised by the last tap: the rest of the backbone is not needed."""


class FeatureTaps:
    """Forward hooks (handles kept) that record `x_0` and the tapped layer outputs during one call.

    Features live in the dictionary of the call that asked for them, never on a module. The backbone
    stops after the last tap it needs. With `first_token_only`, only token 0 of each feature is kept.
    With `grad`, the backbone runs with autograd (to read a model that trains through its backbone).
    """

    def __init__(self, model: nn.Module, points: tuple[str, ...], first_token_only: bool = False, grad: bool = False,
                 calls: tuple[str, ...] = (), between_taps: Callable[[torch.Tensor], None] | None = None):
        """`calls`: tapped modules whose call (arguments and keyword arguments) is recorded too (`with_calls`).
        `between_taps(output)`: called after each tapped module but the last, with its output tensor."""
        self.model, self.points, self.first_token_only, self.grad = model, tuple(points), first_token_only, grad
        self.calls, self.between_taps = tuple(calls), between_taps
        self.handles: list[RemovableHandle] = []
        self._record: dict[str, Any] | None = None

    def attach(self) -> FeatureTaps:
        get = self.model.get_submodule
        self.handles.append(get(self.points[0]).register_forward_pre_hook(self._input_hook, with_kwargs=True))
        for name in self.calls:
            self.handles.append(get(name).register_forward_pre_hook(self._call_hook(name), with_kwargs=True))
        for name in self.points:
            hook = self._output_hook(name, last=name == self.points[-1])
            self.handles.append(get(name).register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._record is not None and "" not in self._record:
            x = first_input(args, kwargs)
            if self._record.get("probe"):
                self._record[""] = x.shape
                raise _Done
            self._record[""] = self._keep(x)

    def _call_hook(self, name: str):
        at = self.points.index(name)
        before = self.points[at - 1] if at else ""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._record is None:
                return
            x, previous = first_input(args, kwargs), self._record.get(before)
            if previous is None or not (x is previous or (x.shape == previous.shape and torch.equal(x, previous))):
                raise ConfigError(f"reinject runs {name!r} again on the bypass state of the tap before it, but its "
                                  f"input is not {before or 'the first tap'!r}'s output: the re-run taps must be "
                                  f"consecutive whole blocks (taps: {list(self.points)})")
            # A decoder's key/value cache holds this forward's keys: the second run must not append to it, and
            # it need not stay alive until then.
            args = tuple(None if _is_cache(a) else a for a in args)
            kwargs = {k: (None if _is_cache(v) else False if k == "use_cache" else v) for k, v in kwargs.items()}
            self._record["call:" + name] = (args, kwargs)

        return hook

    def _output_hook(self, name: str, last: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._record is None:
                return
            self._record[name] = self._keep(output_tensor(output))
            if last:
                raise _Done
            if self.between_taps is not None:
                self.between_taps(self._record[name])

        return hook

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].clone() if self.first_token_only else x  # a copy, so the full tensor can be freed

    def __call__(self, run: Callable[[], Any]) -> list[torch.Tensor]:
        """Run `run()` (a backbone call), without autograd unless `grad`; return [x_0, x_1, ..., x_L]."""
        return self.with_calls(run)[0]

    def first_shape(self, run: Callable[[], Any]) -> torch.Size:
        """x_0's full shape in the backbone call `run()`, which stops there (only the modules before the first
        tap run, without autograd)."""
        record = self._recorded(run, {"probe": True}, grad=False)
        if "" not in record:
            raise RuntimeError(f"the backbone call did not run the first tapped module {self.points[0]!r}")
        return record[""]

    def _recorded(self, run: Callable[[], Any], record: dict[str, Any], grad: bool) -> dict[str, Any]:
        """What the hooks record into `record` during `run()`, with autograd if `grad`, until the last tap needed."""
        if not self.handles:
            raise RuntimeError("FeatureTaps are not attached")
        self._record = record
        try:
            with torch.set_grad_enabled(grad):
                run()
        except _Done:
            pass
        finally:
            self._record = None
        return record

    def with_calls(self, run: Callable[[], Any]) -> tuple[list[torch.Tensor], BlockCalls]:
        """As calling the taps, and the recorded calls of the `calls` modules, to run them again (`BlockCalls`)."""
        record = self._recorded(run, {}, grad=self.grad and torch.is_grad_enabled())
        missing = [n for n in ("", *self.points) if n not in record] + [n for n in self.calls
                                                                        if "call:" + n not in record]
        if missing:
            raise RuntimeError(f"the backbone call did not run the tapped modules {missing}")
        calls = BlockCalls(self.model, {n: record["call:" + n] for n in self.calls})
        return [record[""], *(record[n] for n in self.points)], calls


def _is_cache(value: Any) -> bool:
    """A transformers key/value cache (`Cache`), by what it does."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


class BlockCalls:
    """Frozen blocks' calls as one backbone forward made them, to run again on another hidden state.

    The block runs with its own weights (never trained) and the call's other arguments (masks, position
    embeddings); autograd, where enabled, reaches the new hidden state only.
    """

    def __init__(self, model: nn.Module, calls: dict[str, tuple[tuple, dict]]):
        self.model, self.calls = model, calls

    def __call__(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Block `name` on `hidden` (the shape of its recorded input, any floating dtype): its output tensor, in
        the block's own dtype (a low-precision backbone's re-run `x_l` is kept for backward in it)."""
        args, kwargs = self.calls[name]
        block = self.model.get_submodule(name)
        dtype = compute_dtype(block)
        x = hidden if dtype is None else hidden.to(dtype)
        if args:
            args = (x, *args[1:])
        else:  # `first_input` found it there when the call was recorded
            kwargs = {**kwargs, "hidden_states": x}
        return output_tensor(block(*args, **kwargs))
