"""Int8 weight-only layers for frozen backbones (`backbone_dtype: int8`), through torchao.

`quantize_layer` replaces an `nn.Linear`'s weight by torchao's `Int8WeightOnlyConfig` (one int8 per weight, a
float32 scale per `LINEAR_GROUP` weights of an output channel, `PerGroup(128)`) and an `nn.Conv2d`'s by
`IntxWeightOnlyConfig(int8, PerAxis(0))` (a bfloat16 scale and int8 zero point per output channel and kernel
position), and gives the layer a backward that keeps
only what it already holds: autograd through torchao's own layer saves each weight's dequantized bfloat16 copy
(measured with `saved_tensors_hooks`), so back-propagating through an int8 backbone (Res-Tuning, LoRA) would
hold the bfloat16 model again. Here the product runs without autograd and its input gradient dequantizes the
weight again in backward (`FrozenProduct`), as QLoRA's 4-bit matmul does; the weight is frozen, so nothing else
is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

# Weights a layer dequantizes at a time: torchao's dequantize makes two or three temporaries of the weight's size
# (6-8 bytes a weight), so a larger layer computes in slices of its output channels. Measured on SD v1.5's int8
# UNet (batch 1, 64x64 latents, 2 threads): at 4 M weights a slice, a frozen forward took 1.5% less CPU time than
# at 1 M, within the noise, and 256 K cost 24% more; at 4 M the process peaked about 80 MiB higher, from
# temporaries that glibc serves from a new part of its heap each time.
DEQUANTIZE_CHUNK = 2**20

# A linear layer's int8 weight has one scale per this many weights of an output channel (where the input width is
# a multiple of it; else one per output channel), for 4 more bytes per 128 weights: the last hidden state moves
# from float32's by 1.7% on DINOv2-small and 2.4% on MiniLM, against 2.5% and 3.2% with one scale per channel
# (bfloat16 alone: 0.9% and 1.1%; benchmarks/feature_error.py, docs/feature_error.json).
LINEAR_GROUP = 128

# A convolution's int8 weight has one bfloat16 scale and one int8 zero point per output channel and kernel
# position, shared by its input channels (per group): below this many, they cost more than int8 saves.
MIN_CONV_CHANNELS = 16


def is_quantized(t: torch.Tensor) -> bool:
    """A tensor subclass of packed low-bit data (torchao), not a plain tensor."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def int8_candidate(module: nn.Module) -> bool:
    """Whether `quantize_layer` takes `module` (and has not already): a linear layer, or a 2-d convolution with
    at least `MIN_CONV_CHANNELS` input channels per group and zero padding."""
    if isinstance(module, nn.Linear):
        return not is_quantized(module.weight)
    return (isinstance(module, nn.Conv2d) and module.weight.shape[1] >= MIN_CONV_CHANNELS
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and not is_quantized(module.weight))


def quantize_layer(module: nn.Module) -> None:
    """`module`'s weight to int8 weight-only, in place (see the module's docstring), its state dict keys kept.
    A plain `nn.Linear` or `nn.Conv2d` becomes an `Int8Linear` or `Int8Conv2d` (still one); a subclass keeps its
    own class and forward, and so torchao's backward."""
    quantize_, linear_config, conv_config = _torchao()
    linear = isinstance(module, nn.Linear)
    config = linear_config(module.in_features) if linear else conv_config()
    quantize_(module, config, filter_fn=lambda m, fqn: m is module)
    if type(module) in (nn.Linear, nn.Conv2d):
        module.__class__ = Int8Linear if linear else Int8Conv2d


def dequantize_layer(module: nn.Module) -> None:
    """Undo `quantize_layer` on `module`, in place: a plain bfloat16 weight (its dequantized values) and the plain
    class again, for a library that wraps the layer by its weight's type (PEFT's LoRA takes any torchao weight
    for a linear one, which a convolution is not)."""
    if not is_quantized(module.weight):
        return
    module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    if type(module) in (Int8Linear, Int8Conv2d):
        module.__class__ = nn.Linear if type(module) is Int8Linear else nn.Conv2d


class FrozenProduct(torch.autograd.Function):
    """`layer(x)` for a frozen int8 `layer`: forward without autograd, backward to `x` only, from the packed
    weight dequantized again (nothing but `x`'s shape and the layer are kept)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.shape, ctx.dtype = layer, x.shape, x.dtype
        with torch.no_grad():
            return layer.product(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.layer.input_grad(grad.to(ctx.layer.weight.dtype), ctx.shape).to(ctx.dtype), None


def _frozen_product(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer(x)` goes through `FrozenProduct`: autograd needs `x`'s gradient and nothing else of the
    layer's (a trainable bias, e.g. PEFT's `bias: all`, takes torchao's own backward), and the weight is int8."""
    bias = getattr(layer, "bias", None)
    return (torch.is_grad_enabled() and x.requires_grad and is_quantized(layer.weight)
            and not (bias is not None and bias.requires_grad))


def _output_slices(weight: torch.Tensor, groups: int = 1) -> list[slice]:
    """Slices of `weight`'s output channels (dim 0), each of at most `DEQUANTIZE_CHUNK` weights (one slice with
    groups: a slice would take some groups' input channels only)."""
    out_channels = weight.shape[0]
    step = max(1, DEQUANTIZE_CHUNK // (weight.numel() // out_channels)) if groups == 1 else out_channels
    return [slice(a, a + step) for a in range(0, out_channels, step)]


def _summed(parts: Iterator[torch.Tensor], count: int, dtype: torch.dtype) -> torch.Tensor:
    """The sum of the `count` per-slice input gradients `parts` (made one at a time), in `dtype`: summed in
    float32 when there are several, as rounding each partial sum to bfloat16 would grow with the slices."""
    if count == 1:
        return next(parts)
    total = next(parts).float()
    for part in parts:
        total.add_(part)
    return total.to(dtype)


class Int8Linear(nn.Linear):
    """An `nn.Linear` whose weight is int8 (torchao); see `FrozenProduct`. Its weight is dequantized at most
    `DEQUANTIZE_CHUNK` weights at a time (torchao's own product, on slices of the output channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenProduct.apply(x, self) if _frozen_product(self, x) else self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        slices = _output_slices(self.weight)
        if len(slices) == 1 or not is_quantized(self.weight):
            return F.linear(x, self.weight, self.bias)
        return torch.cat([F.linear(x, self.weight[s], None if self.bias is None else self.bias[s])
                          for s in slices], -1)

    def input_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        slices = _output_slices(self.weight)
        return _summed((grad[..., s] @ self.weight[s].dequantize() for s in slices), len(slices), grad.dtype)


class Int8Conv2d(nn.Conv2d):
    """An `nn.Conv2d` whose weight is int8 (torchao); see `FrozenProduct`. Its weight is dequantized at most
    `DEQUANTIZE_CHUNK` weights at a time (slices of the output channels; all at once with groups)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return FrozenProduct.apply(x, self) if _frozen_product(self, x) else self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        slices = _output_slices(self.weight, self.groups)
        if len(slices) == 1 or not is_quantized(self.weight):
            return self._conv_forward(x, self.weight, self.bias)
        return torch.cat([F.conv2d(x, self.weight[s].dequantize(), None if self.bias is None else self.bias[s],
                                   self.stride, self.padding, self.dilation) for s in slices], 1)

    def input_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        slices = _output_slices(self.weight, self.groups)
        parts = (torch.nn.grad.conv2d_input(shape, self.weight[s].dequantize(), grad[:, s], self.stride,
                                            self.padding, self.dilation, self.groups) for s in slices)
        return _summed(parts, len(slices), grad.dtype)


def _torchao() -> tuple[Any, Any, Any]:
    """torchao's `quantize_`, the linear layers' config (a callable taking the input width) and the
    convolutions' (a callable taking no arguments)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as err:
        raise ConfigError("backbone_dtype int8 needs torchao: pip install 'restuning[quant]'") from err

    def linear(in_features: int) -> Any:
        if in_features > LINEAR_GROUP and in_features % LINEAR_GROUP == 0:
            return Int8WeightOnlyConfig(granularity=PerGroup(LINEAR_GROUP))
        return Int8WeightOnlyConfig()  # one scale per output channel
    return quantize_, linear, lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def import_torchao() -> None:
    """Import torchao now (a benchmark counts it among the libraries loaded before its baseline)."""
    _torchao()
