"""Attaching a tuner to a frozen op with forward hooks whose handles are kept.

Nothing is monkey-patched. Where an op spans two modules (BERT's MHA: heads in `attention.self`,
projection in `attention.output.dense`), the op's input is captured by a pre-hook on the entry
and consumed by the hook on the exit within the same forward call; the slot is cleared when read,
so no tensor outlives the call.

For a mixed batch (each sample through its own adapter), an attachment is given the rows of the batch that
are its adapter's for the one call (`attach(rows=...)`); it computes its tuner on those rows only and leaves
the others as the op made them. While one adapter's tuner calls frozen modules itself (Res-Prompt's keys and
values from its prompt tokens), the other adapters' hooks stand aside and its own apply in full, as when that
adapter runs alone.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .attention import additive_mask, rotate, split_heads
from .errors import ConfigError
from .ops import OpSite
from .precision import compute_dtype, in_dtype
from .spatial import on_channels
from .tuners import AttentionTuner, ResTuner


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The op's input: the first positional argument, else `hidden_states`."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError(f"cannot find the op's input among keyword arguments {sorted(kwargs)}")


def extend_mask(mask: torch.Tensor | None, n: int, at_end: bool, rows: bool) -> torch.Tensor | None:
    """Make `n` extra key columns visible in a transformers mask (additive float or boolean keep);
    with `rows`, also add `n` query rows (their outputs are discarded)."""
    if mask is None:
        return None
    visible = True if mask.dtype == torch.bool else 0.0
    mask = F.pad(mask, (0, n) if at_end else (n, 0), value=visible)
    if rows:
        mask = F.pad(mask, (0, 0, 0, n), value=visible) if mask.shape[-2] > 1 else mask
    return mask


def with_input(
    args: tuple, kwargs: dict, x: torch.Tensor | None, widen: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple, dict]:
    """A block's call arguments with its input replaced by `x` (unless None) and its attention mask
    (keyword, or second positional) passed through `widen`; for a forward pre-hook that joins tokens."""
    if x is not None:
        args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    if kwargs.get("attention_mask") is not None:
        kwargs = {**kwargs, "attention_mask": widen(kwargs["attention_mask"])}
    elif "attention_mask" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor):
        args = (args[0], widen(args[1]), *args[2:])
    return args, kwargs


def add_to_output(output: Any, delta: torch.Tensor) -> Any:
    """Add `delta` to an op's output, which is a tensor or a tuple whose first item is one."""
    if isinstance(output, torch.Tensor):
        return output + delta
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] + delta, *output[1:])
    raise TypeError(f"cannot add a tuner delta to an op output of type {type(output).__name__}")


def output_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class Attachment:
    """One tuner on one op of `model`, and the hook handles that run it."""

    def __init__(self, model: nn.Module, site: OpSite, tuner: ResTuner):
        self.model, self.site, self.tuner = model, site, tuner
        self.handles: list[RemovableHandle] = []
        self._slot: dict[str, Any] = {}
        self.rows: Rows | None = None

    def attach(self, rows: Rows | None = None) -> None:
        """Register the hooks; with `rows`, the tuner runs on those rows of each batch only."""
        if self.handles:
            raise RuntimeError(f"{self.site.key} is already attached")
        self.rows = rows
        if isinstance(self.tuner, AttentionTuner) and self.tuner.uses_attention:
            self._attach_attention()
        elif self.site.entry == self.site.exit:
            module = self.model.get_submodule(self.site.exit)
            self.handles.append(module.register_forward_hook(self._op_hook, with_kwargs=True))
        else:
            entry, exit_ = (self.model.get_submodule(n) for n in (self.site.entry, self.site.exit))
            self.handles.append(entry.register_forward_pre_hook(self._capture_input, with_kwargs=True))
            self.handles.append(exit_.register_forward_hook(self._exit_hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._slot.clear()
        self.rows = None

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    # --- plain tuners: x' = OP(x) + tuner(x, OP(x)) -------------------------------------------
    def _delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.tuner)
        if dtype is not None and y.dtype != dtype and not torch.is_autocast_enabled(y.device.type):
            return self._delta(*in_dtype(dtype, x, y)).to(y.dtype)  # a low-precision backbone: the tuner's own dtype
        if self.site.layout == "map":
            return on_channels(self.tuner, x, y)
        return self.tuner(x, y)

    def _stands_aside(self) -> bool:
        """In a mixed batch, while another adapter's tuner runs frozen modules for itself."""
        return self.rows is not None and self.rows.stands_aside()

    def _rows(self) -> Rows | None:
        """The rows to tune: None for all (no mixed batch, or inside this adapter's own tuner)."""
        return None if self.rows is None or self.rows.routing.inside is not None else self.rows

    def _tuned(self, x: torch.Tensor, output: Any) -> Any:
        y, rows = output_tensor(output), self._rows()
        if rows is None:
            with self._inside():
                return add_to_output(output, self._delta(x, y))
        index = rows.index(y, self.site.exit)
        with self._inside():
            delta = self._delta(x[index], y[index]).to(y.dtype)
        return add_to_output(output, torch.zeros_like(y).index_copy(0, index, delta))

    def _inside(self) -> contextlib.AbstractContextManager:
        """While this tuner runs: in a mixed batch, the other adapters' hooks stand aside."""
        return self.rows.routing.within(self.rows.adapter) if self.rows is not None else contextlib.nullcontext()

    def _op_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._stands_aside():
            return None
        return self._tuned(first_input(args, kwargs), output)

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._stands_aside():
            self._slot["x"] = first_input(args, kwargs)

    def _exit_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._stands_aside():
            return None
        return self._tuned(self._slot.pop("x"), output)

    # --- attention tuners: rewrite the per-head context before the output projection -----------
    # The attention's own call is read by a pre-hook on its entry module (mask, causal flag, RoPE's cos/sin, the
    # KV cache), its queries (and keys) by hooks on the projections, and the context is rewritten by a pre-hook on
    # the output projection. Everything is kept in the slot of this call only, and cleared at the output projection.
    def _attach_attention(self) -> None:
        att = self.site.attention
        get = self.model.get_submodule
        entry = get(self.site.entry)
        self._mask_params = _mask_parameters(entry)
        self._layer_index = getattr(entry, "layer_idx", None)
        self.handles.append(entry.register_forward_pre_hook(self._capture_call, with_kwargs=True))
        if att.fused:
            self.handles.append(get(att.query).register_forward_hook(self._keep_fused))
        else:
            self.handles.append(get(att.query).register_forward_hook(self._keep("query")))
            if self.tuner.needs_keys:
                self.handles.append(get(att.key).register_forward_hook(self._keep("key")))
        self.handles.append(get(att.out).register_forward_pre_hook(self._mix_context))

    def _keep(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self._stands_aside():
                self._slot[name] = output

        return hook

    def _keep_fused(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self._stands_aside():
            frozen = self.tuner._attention
            self._slot["query"], self._slot["key"], _ = frozen.split_fused(output)

    def _capture_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._stands_aside():
            return
        mask_index, default_causal = self._mask_params
        mask = kwargs.get("attention_mask")
        if mask is None and mask_index is not None and len(args) > mask_index:
            mask = args[mask_index]
        self._slot["mask"] = mask
        self._slot["is_causal"] = bool(kwargs.get("is_causal", default_causal))
        rope = kwargs.get("position_embeddings")
        self._slot["rope"] = rope if isinstance(rope, tuple) and len(rope) == 2 else None
        self._slot["cache"] = kwargs.get("past_key_values")

    def _mix_context(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._stands_aside():
            return None
        context, slot, att = args[0], self._slot, self.site.attention
        try:
            query = split_heads(slot["query"], att.num_heads)
            rope = slot.get("rope")
            if rope is not None:
                query = rotate(query, *rope)
            key = mask = None
            if self.tuner.needs_keys:
                key = split_heads(slot["key"], att.num_kv_heads)
                if rope is not None:
                    key = rotate(key, *rope)
                if slot.get("cache") is not None:
                    key = self._cached_keys(slot["cache"], key)
                mask = additive_mask(slot.get("mask"), slot.get("is_causal", False), query.shape[2], key.shape[2],
                                     query.device)
                if mask is not None and mask.shape[-1] != key.shape[2]:
                    raise RuntimeError(
                        f"{self.site.key}: the attention mask covers {mask.shape[-1]} keys, the keys are "
                        f"{key.shape[2]} (a sliding-window cache?); exact prefix/prompt mixing needs every key the "
                        "scores see"
                    )
        finally:
            slot.clear()
        try:
            rows, dtype = self._rows(), compute_dtype(self.tuner)
            if dtype is not None and context.dtype != dtype and not torch.is_autocast_enabled(context.device.type):
                mixed = self._mix(*in_dtype(dtype, context, query, key, mask), rows)
                return (mixed.to(context.dtype), *args[1:])
            return (self._mix(context, query, key, mask, rows), *args[1:])
        finally:
            slot.clear()  # what the tuner's own calls of the projections (Res-Prompt's keys) left there

    def _mix(self, context: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, mask: torch.Tensor | None,
             rows: Rows | None) -> torch.Tensor:
        if rows is None:
            with self._inside():
                return self.tuner.mix(context, query, key, mask)
        index = rows.index(context, self.site.exit)
        if mask is not None and mask.shape[0] > 1:
            mask = mask[index]
        with self._inside():
            mixed = self.tuner.mix(context[index], query[index], None if key is None else key[index], mask)
        return context.index_copy(0, index, mixed.to(context.dtype))

    def _cached_keys(self, cache: Any, new: torch.Tensor) -> torch.Tensor:
        """Every key of this layer after the attention updated its KV cache with this call's keys `new`,
        (B, H_kv, S, d): what its scores see."""
        cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache
        layers = getattr(cache, "layers", None)
        if self._layer_index is None or layers is None or len(layers) <= self._layer_index:
            raise RuntimeError(f"{self.site.key}: a KV cache was passed, but its keys for this layer cannot be read "
                               f"(layer_idx={self._layer_index}, cache {type(cache).__name__})")
        keys = layers[self._layer_index].keys
        if keys is None or keys.dim() != 4 or keys.shape[2] < new.shape[2]:
            raise RuntimeError(f"{self.site.key}: the KV cache holds no keys for layer {self._layer_index}")
        return keys


class Routing:
    """The state one mixed-batch call shares among its adapters: whose tuner is running, if any."""

    def __init__(self) -> None:
        self.inside: str | None = None

    @contextlib.contextmanager
    def within(self, adapter: str) -> Iterator[None]:
        outer, self.inside = self.inside, adapter
        try:
            yield
        finally:
            self.inside = outer


class Rows:
    """The samples of a mixed batch that one adapter serves: `positions` of a batch of `batch` samples."""

    def __init__(self, adapter: str, positions: list[int], batch: int, device: torch.device, routing: Routing):
        self.adapter, self.positions, self.batch, self.routing = adapter, positions, batch, routing
        self._index = torch.tensor(positions, dtype=torch.long, device=device)

    def stands_aside(self) -> bool:
        return self.routing.inside not in (None, self.adapter)

    def index(self, t: torch.Tensor, where: str) -> torch.Tensor:
        """The row index for tensor `t` (batch first), checked against the batch the names were given for."""
        if t.shape[0] != self.batch:
            raise ConfigError(f"adapter_names: {self.batch} names, but {where or 'the model'} sees a batch of "
                              f"{t.shape[0]}; expected one name per sample, with the batch dimension first")
        return self._index if self._index.device == t.device else self._index.to(t.device)


class SavedModule:
    """A trained copy of one backbone module (`modules_to_save`, such as a task head) standing in for it: a
    forward hook replaces the module's output with the copy's on the same inputs. The module itself stays as
    it was (it still runs; a head is small), so removing the hook gives back its own output."""

    def __init__(self, model: nn.Module, name: str, copy: nn.Module):
        self.model, self.name, self.copy = model, name, copy
        self.handle: RemovableHandle | None = None
        self.rows: Rows | None = None

    @property
    def attached(self) -> bool:
        return self.handle is not None

    def attach(self, rows: Rows | None = None) -> None:
        if self.handle is not None:
            raise RuntimeError(f"{self.name} is already attached")
        self.rows = rows
        self.handle = self.model.get_submodule(self.name).register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle, self.rows = None, None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.rows is not None and self.rows.stands_aside():
            return None
        dtype, held = compute_dtype(self.copy), output_tensor(output).dtype
        low = dtype is not None and held != dtype and not torch.is_autocast_enabled(output_tensor(output).device.type)
        if low:  # a float32 copy in a low-precision backbone: its inputs cast up, its output back to the backbone's
            args = tuple(in_dtype(dtype, a)[0] if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: in_dtype(dtype, v)[0] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if self.rows is None or self.rows.routing.inside is not None:
            out = self.copy(*args, **kwargs)
            return _cast_output(out, held) if low else out
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"adapter_names: {self.name} returns {type(output).__name__}; a mixed batch needs a "
                            "module to save that returns one tensor")
        index = self.rows.index(output, self.name)
        batch = self.rows.batch

        def rows_of(v: Any) -> Any:
            return v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v

        mine = self.copy(*(rows_of(a) for a in args), **{k: rows_of(v) for k, v in kwargs.items()})
        return output.index_copy(0, index, mine.to(output.dtype))


def _cast_output(output: Any, dtype: torch.dtype) -> Any:
    """An op's output (a tensor, or a tuple whose first item is one) with that tensor in `dtype`."""
    if isinstance(output, torch.Tensor):
        return output.to(dtype)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].to(dtype), *output[1:])
    return output


def _mask_parameters(entry: nn.Module) -> tuple[int | None, bool]:
    """Where `entry.forward` takes `attention_mask` positionally, and whether it is causal by default."""
    params = [p for p in inspect.signature(entry.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    index = names.index("attention_mask") if "attention_mask" in names else None
    return index, bool(getattr(entry, "is_causal", False))
