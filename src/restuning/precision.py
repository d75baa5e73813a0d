"""Frozen backbones held in low precision (`backbone_dtype`): `bfloat16`, or `int8` weight-only.

QLoRA-style: the frozen backbone's weights are stored in bfloat16 (or its linear and convolution weights in
int8 with bfloat16 scales, through torchao) and it computes in bfloat16; whatever trains (tuners,
the bypass, side networks, heads) and its optimizer state stay float32. Tensors cross between the two at the
trainable modules' inputs (cast up) and outputs (cast back to the backbone's dtype), so gradients reach the
tuners through the frozen, dequantized weights. Checkpoints hold only the float32 trainable tensors, whatever
the backbone's dtype.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .int8 import MIN_CONV_CHANNELS, int8_candidate, is_quantized, quantize_layer

BACKBONE_DTYPES = ("float32", "bfloat16", "int8")
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MARK = "_restuning_backbone_dtype"
# While `build_held` builds a model or `quantize_int8` converts one: hand freed memory back after a module where
# the resident set grew this much since the last time (every 16 modules, SD v1.5's int8 UNet build peaked 240 MiB
# above the model it made; this way, 120-140 MiB: one module's wider weights).
CONVERSION_GROWTH = 32 * 2**20


def set_backbone_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Hold the frozen `model` in `dtype` (one of `BACKBONE_DTYPES`), in place; returns `model`. `float32`
    leaves it as it is.

    `bfloat16`: every floating parameter and buffer in bfloat16. `int8`: the same, then the weight of every
    `nn.Linear` and `nn.Conv2d` quantized to int8 weight-only (`quantize_int8`).
    Float32 inputs of the model's own forward (of two or more dimensions) are cast to bfloat16 by a pre-hook.
    Call it before a method attaches its tuners, which are then built in float32 (`trainable_dtype`)."""
    if dtype not in BACKBONE_DTYPES:
        raise ConfigError(f"backbone_dtype: expected one of {list(BACKBONE_DTYPES)}, got {dtype!r}")
    if dtype == "float32":  # as loaded (a backbone stored in bfloat16 by mixed precision stays so)
        return model
    current = backbone_dtype(model)
    if BACKBONE_DTYPES.index(dtype) < BACKBONE_DTYPES.index(current):
        raise ConfigError(f"backbone_dtype: this backbone is already held in {current}; load it again to hold it "
                          f"in {dtype}")
    if getattr(model, _MARK, None) == dtype:
        return model
    model.requires_grad_(False)
    model.to(torch.bfloat16)
    if dtype == "int8":
        quantize_int8(model)
    release_freed_memory()
    if getattr(model, _MARK, None) is None:  # one input cast, also when bfloat16 goes on to int8
        model.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
    setattr(model, _MARK, dtype)
    return model


def build_held(build: Callable[[], nn.Module], dtype: str,
               weights: Callable[[str, torch.Tensor], torch.Tensor]) -> nn.Module:
    """`build()` held in `dtype` (as `set_backbone_dtype`) without the process ever holding it wider: the model
    is built with its parameters on the meta device (buffers real), then each module's own parameters are made
    real one module at a time from `weights(name, meta_parameter)` (e.g. `SafetensorsWeights`), cast, and
    quantized (int8) before the next. The conversion's peak is the held model's size plus one module, where
    loading in float32 or bfloat16 and converting after would peak at the wider model (3.3 GB for SD v1.5's UNet
    in float32, against 0.8 GB held in int8). Parameters tied by assignment in the model's constructor come back
    as separate tensors (accelerate's empty init registers each as its own), each read by its own name; tie them
    again after (e.g. transformers' `tie_weights()`). Non-persistent buffers are the constructor's."""
    if dtype not in BACKBONE_DTYPES:
        raise ConfigError(f"backbone_dtype: expected one of {list(BACKBONE_DTYPES)}, got {dtype!r}")
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    held = torch.float32 if dtype == "float32" else torch.bfloat16
    # By the meta parameter, where it was made: one registered twice is read once, and takes what its first
    # module holds now (quantized). Holding the parameters themselves here would keep every wider weight alive
    # until the end, which is the peak this function exists to avoid.
    made: dict[int, tuple[nn.Module, str]] = {}
    hand_back = HandBack()
    for prefix, module in model.named_modules():
        for name, meta in list(module.named_parameters(recurse=False)):
            if id(meta) not in made:
                value = weights(f"{prefix}.{name}" if prefix else name, meta)
                value = value.to(held) if value.is_floating_point() else value
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
                made[id(meta)] = (module, name)
            else:
                owner, owned = made[id(meta)]
                module._parameters[name] = owner._parameters[owned]
        if dtype == "int8" and int8_candidate(module):
            quantize_layer(module)
        hand_back.if_grown(CONVERSION_GROWTH)
    persistent, buffers = set(model.state_dict()), list(model.named_buffers())
    if hasattr(weights, "__contains__"):  # persistent buffers the weights hold
        for name, buffer in buffers:
            if name in persistent and name in weights:
                buffer.copy_(weights(name, buffer))
    if hasattr(weights, "finish"):  # non-persistent buffers a file may hold (old position ids) are not its own
        weights.finish(ignore={n for n, _ in buffers if n not in persistent})
    return set_backbone_dtype(model, dtype)


class SafetensorsWeights:
    """`weights` for `build_held`: each tensor read from the safetensors file at `path` when asked for (memory-
    mapped: one tensor at a time is resident), checked against the parameter it fills; `finish` refuses a file
    with tensors the model did not take."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, framework="pt")
        self._unread = set(self._file.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._unread

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self._unread:
            raise ConfigError(f"{self.path}: has no tensor {name!r} for the model's parameter of shape "
                              f"{tuple(like.shape)} (a checkpoint of another model?)")
        value = self._file.get_tensor(name)
        if value.shape != like.shape:
            raise ConfigError(f"{self.path}: tensor {name!r} has shape {tuple(value.shape)}; the model's "
                              f"parameter has {tuple(like.shape)}")
        self._unread.discard(name)
        return value

    def finish(self, ignore: set[str] = frozenset()) -> None:
        """Refuse tensors no parameter or buffer took, but those named in `ignore`."""
        self._unread -= ignore
        if self._unread:
            raise ConfigError(f"{self.path}: {len(self._unread)} tensors match no parameter of the model, e.g. "
                              f"{sorted(self._unread)[:3]} (a checkpoint of another model?)")


def release_freed_memory() -> bool:
    """Hand the heap memory freed since the last call back to the system (glibc's `malloc_trim`; elsewhere
    nothing). True where it ran.

    glibc serves allocations below its mmap threshold from its heap, and raises that threshold (up to 32 MiB) each
    time a larger mapped block is freed, so what a conversion or a frozen forward frees mostly stays in the heap,
    in the process's resident memory. Measured: quantizing ViT-B/16 to int8 grew the resident set by 228 MiB that
    later activations never reused (trimming brought it below the bfloat16 model's); after one no-grad forward
    of an int8 SD v1.5 UNet the process sat 520 MiB above the model and this handed back 480 MiB of it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HandBack:
    """Hands freed heap memory back (`release_freed_memory`) now, or only where the process's resident set grew
    by a bound since the last time: every hand-back makes the next allocations fault their pages in again, so
    between a forward's layers it pays only once enough is held."""

    def __init__(self) -> None:
        self.resident: int | None = None  # the resident set just after the last hand-back

    def now(self) -> None:
        if release_freed_memory():
            self.resident = resident_bytes()

    def if_grown(self, growth: int) -> None:
        """Hand back where the resident set is `growth` bytes or more above its size after the last hand-back."""
        resident = resident_bytes()
        if resident is not None and (self.resident is None or resident - self.resident >= growth):
            self.now()


def resident_bytes() -> int | None:
    """The process's resident set now, in bytes (Linux's /proc/self/statm; None elsewhere): a read of a few
    bytes, cheap enough to decide between a forward's blocks whether handing memory back would pay."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no os.sysconf (Windows)
        return None


@functools.cache
def _malloc_trim():
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def quantize_int8(model: nn.Module) -> None:
    """The weights of `model`'s linear and 2-d convolution layers to int8 weight-only (`int8.quantize_layer`), in
    place; depthwise and few-channel convolutions stay bfloat16 (`int8.int8_candidate`). One layer at a time,
    with the freed memory handed back after one where enough was held (`CONVERSION_GROWTH`), so that the
    conversion's own peak stays near the model's size."""
    hand_back = HandBack()
    for layer in [m for m in model.modules() if int8_candidate(m)]:
        quantize_layer(layer)
        hand_back.if_grown(CONVERSION_GROWTH)


class _ImportNoise(logging.Filter):
    """torchao (imported by us or by PEFT) logs a warning for each optional GPU kernel library it cannot load on
    this machine, and torch one per Enum it registers with torch.compile; neither says anything to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") or "is an Enum subclass and is now natively" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_ImportNoise())


def backbone_dtype(model: nn.Module) -> str:
    """How `model` is held: `int8` (quantized linear weights), `bfloat16`, or `float32` (any other dtype)."""
    mark = getattr(model, _MARK, None)
    if mark is not None:
        return mark
    for p in model.parameters():
        if is_quantized(p):
            return "int8"
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "bfloat16" if ref is not None and ref.dtype == torch.bfloat16 else "float32"


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t`'s data: `t` itself, or a quantized tensor's packed data and scales."""
    if not is_quantized(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for n in names for inner in plain_tensors(getattr(t, n))]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes `t` holds (a quantized tensor's packed data and scales, not its dequantized size)."""
    return sum(p.numel() * p.element_size() for p in plain_tensors(t))


def trainable_dtype(ref: torch.Tensor | nn.Module) -> torch.dtype | None:
    """The dtype trainable parameters take beside the frozen `ref` (a parameter, or a model's first one):
    float32 beside a low-precision backbone, else the backbone's own floating dtype (float64 stays float64);
    None when `ref` is not floating."""
    if isinstance(ref, nn.Module):
        ref = next(ref.parameters())
    if not ref.is_floating_point():
        return None
    return torch.float32 if ref.dtype in LOW_PRECISION or is_quantized(ref) else ref.dtype


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `module` computes in: that of its first floating parameter (a quantized weight reports its
    dequantized dtype); None without one."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def run_frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with the output in `x`'s dtype, for a frozen backbone module (a final norm, a projection)
    called on a trainable state: a low-precision module runs in its own dtype, gradients still reach `x`."""
    dtype = compute_dtype(module)
    if dtype is None or dtype == x.dtype:
        return module(x)
    return module(x.to(dtype)).to(x.dtype)


def in_dtype(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` cast to floating `dtype` (None, and non-floating tensors, as they are)."""
    return tuple(t.to(dtype) if dtype is not None and t is not None and t.is_floating_point() and t.dtype != dtype
                 else t for t in tensors)


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast_floats(args), {k: _cast_floats(v) for k, v in kwargs.items()}


def _cast_floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # Timesteps and other scalars per sample (dim < 2) keep float32: bfloat16 would round 999 to 1000.
        return value.to(torch.bfloat16) if value.dtype == torch.float32 and value.dim() >= 2 else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v) for v in value)
    return value


__all__ = ["BACKBONE_DTYPES", "MIN_CONV_CHANNELS", "SafetensorsWeights", "backbone_dtype", "build_held",
           "compute_dtype", "in_dtype", "is_quantized", "plain_tensors", "run_frozen", "set_backbone_dtype",
           "tensor_bytes", "trainable_dtype"]
