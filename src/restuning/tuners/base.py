"""The Res-Tuner interface and registry: `x' = OP(x) + tuner(x, OP(x))`.

A tuner is a plain module that maps the op's input `x` (and, for tuners such as SSF that read it, the
op's output `y`) to a delta added to `y`. It knows nothing of the backbone's code. Tuners that work
inside an attention (Res-Prefix, Res-Prompt) also implement `mix`, which rewrites the attention's
per-head context before the frozen output projection.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TunerSpec
from ..errors import ConfigError
from ..precision import run_frozen


@dataclass(frozen=True, eq=False)
class FrozenAttention:
    """References to an MHA's frozen modules. Held as a plain object so they never become tuner
    parameters (saved, counted or trained).

    `query`, `key` and `value` are one module when the projection is fused (its output is `[q; k; v]`, GPT-2).
    Queries have `num_heads` heads of `head_dim`; keys and values `num_kv_heads` (grouped-query attention: fewer).
    `scale` multiplies the scores (None: `head_dim ** -0.5`); `exact`: the scores are plain (see `AttentionSite`).
    """

    query: nn.Module
    key: nn.Module
    value: nn.Module
    norm: nn.Module | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    in_width: int  # width of the tokens the key and value projections read
    scale: float | None = None
    exact: bool = True

    @property
    def fused(self) -> bool:
        return self.query is self.key

    @property
    def score_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    def split_fused(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fused projection's output (..., (H + 2 H_kv) d) -> q (..., H d), k and v (..., H_kv d)."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return projected.split((q_width, kv_width, kv_width), dim=-1)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `tokens` (..., in_width) through the frozen projections: (..., H_kv d) each."""
        if self.fused:
            _, k, v = self.split_fused(run_frozen(self.query, tokens))
            return k, v
        return run_frozen(self.key, tokens), run_frozen(self.value, tokens)
@dataclass(frozen=True, eq=False)
class OpContext:
    """What a tuner may know of the op it is attached to."""

    in_features: int
    out_features: int
    attention: FrozenAttention | None = None
    grid: bool = False  # the tokens are an image's patch grid (or a feature map), not a sequence
    causal: bool = False  # a decoder's tokens: a token may not read the tokens after it


class ResTuner(nn.Module):
    """Base class. Subclasses take `(ctx: OpContext, dim: int, **options)`."""

    name: ClassVar[str]
    # True when the delta at each position depends on that position's x and y alone (no mixing across
    # tokens). All built-in tuners are; the bypass uses it to run on the CLS token only when exact.
    position_wise: ClassVar[bool] = True
    # Option -> its allowed values, checked with the config (option types come from `__init__`'s hints).
    option_choices: ClassVar[dict[str, tuple]] = {}
    # True when a sample's delta depends on that sample alone (nothing mixes across the batch), so that a mixed
    # batch (`adapter_names=`) can run each sample through its own adapter. All built-in tuners are.
    mixed_batch: ClassVar[bool] = True
    # How the tuner folds into a linear op's weights (`merge_and_unload`): "input" when its delta is a linear
    # map of the op's input (LoRA; the op must be that one linear layer), "output" when it reads the op's
    # output alone (SSF, BitFit; the op must end in a linear layer), None when it cannot fold.
    folds: ClassVar[str | None] = None
    # `dim` and each option -> its meaning, as `restuning config` prints it (types and defaults from `__init__`).
    option_help: ClassVar[dict[str, str]] = {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: op input (..., in_features); y: op output (..., out_features). Returns a delta like y."""
        raise NotImplementedError

    def fold_into(self, linear: nn.Linear) -> None:
        """Fold this tuner into `linear`'s weight and bias in place, so that `linear` alone computes the tuned
        op (for tuners whose `folds` is set)."""
        raise NotImplementedError(f"{self.name} does not fold into a linear layer")


class AttentionTuner(ResTuner):
    """A tuner that, on an MHA with known projections, works on the per-head context."""

    @property
    def uses_attention(self) -> bool:
        """True when attached to an MHA whose projections it can use."""
        raise NotImplementedError

    @property
    def needs_keys(self) -> bool:
        """True when `mix` needs the frozen keys and mask (exact unbinding)."""
        return False

    def mix(
        self, context: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """context: the frozen attention's output before its out-projection, (B, T, H*d) merged heads;
        query: (B, H, T, d) and key: (B, H_kv, S, d) per head, as the scores see them (RoPE applied; keys of a
        KV cache included), key None unless `needs_keys`; mask: additive (B|1, 1|H, T, S) or None.
        Returns the new context, (B, T, H*d)."""
        raise NotImplementedError


TUNERS: dict[str, type[ResTuner]] = {}


def register_tuner(name: str):
    """Class decorator: make a tuner available to configs under `name`."""

    def wrap(cls: type[ResTuner]) -> type[ResTuner]:
        if name in TUNERS:
            raise ValueError(f"tuner {name!r} is already registered")
        cls.name = name
        TUNERS[name] = cls
        return cls

    return wrap


def check_spec(spec: TunerSpec, where: str = "") -> None:
    """`spec` names a registered tuner and only options its constructor takes."""
    where = f"{where}: " if where else ""
    cls = TUNERS.get(spec.name)
    if cls is None:
        raise ConfigError(f"{where}unknown tuner {spec.name!r}; registered tuners: {sorted(TUNERS)}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "ctx", "dim")]
    unknown = set(spec.options) - set(accepted)
    if unknown:
        raise ConfigError(f"{where}tuner {spec.name!r} has no option(s) {sorted(unknown)}; accepted: {accepted}")
    from ..config import check_value  # the typed reader: types, and no NaN or infinity

    hints = typing.get_type_hints(cls.__init__)
    for key, value in spec.options.items():
        value = check_value(hints.get(key, Any), value, f"{where}options.{key}")
        allowed = cls.option_choices.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{where}options.{key}: tuner {spec.name!r} takes one of {list(allowed)}, got {value!r}")


def build_tuner(spec: TunerSpec, ctx: OpContext, default_dim: int, where: str = "") -> ResTuner:
    """Instantiate `spec` for one op, with a clear error for an unknown name or option."""
    check_spec(spec, where)
    return TUNERS[spec.name](ctx, spec.dim if spec.dim is not None else default_dim, **spec.options)
