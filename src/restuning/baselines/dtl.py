"""DTL, Disentangled Transfer Learning (Fu et al., AAAI 2024), and DTL+ (with its depthwise convolution).

A compact side network of low-rank maps reads the input of every block and sums them progressively; from
the injection block `M` on, that running sum is added back into each block's output:

    R_j = sum_{i <= j} B_i A_i x_i              (A_i: D -> r, B_i: r -> D, B_i zero at init)
    x_{j+1} = block_j(x_j)                      for j < M   (run without autograd)
    x_{j+1} = block_j(x_j) + F(swish(R_j))      for j >= M  (autograd through activations, never weights)

`swish(z) = z * sigmoid(beta z)`; `F` is the identity (DTL) or a depthwise convolution over the tokens'
grid (DTL+: k x k on an image backbone's patch grid, the class token passed through; along the sequence of
a text backbone's tokens, causal on a decoder). The frozen read-out (final norm, pooling) and a linear head follow.

Blocks before `M` run without autograd: what they add to backward is only the input each low-rank map
reads (one (B, T, D) tensor per block). Blocks from `M` on keep their activations for backward, which is
why the backbone's forward serves one task only. Defaults follow the paper's ViT-B/16 VTAB scripts (rank 2,
beta 100, maps before every block, injection into the second half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..bypass import BypassConfig, plan_taps
from ..bypass.network import read_out
from ..config import ConfigBase, check_family, option
from ..errors import ConfigError
from ..hooks import add_to_output, first_input, output_tensor
from ..methods.registry import Method, register_method
from ..params import ParameterReport
from ..precision import trainable_dtype
from ..spatial import TokenMixing
from .side_network import SIDE_POOLINGS


@dataclass
class DTLConfig(ConfigBase):
    """DTL's options (`dtl_plus` is DTL with `fusion_size: 3`)."""

    num_classes: int = option(2, ge=1, help="size of the linear head; a run sets it from its data")
    rank: int = option(2, ge=1, help="rank r of each low-rank map B_i A_i (DTL: 2)")
    beta: float = option(100.0, gt=0, help="swish's beta in z * sigmoid(beta z) (DTL: 100)")
    inject_from: int | None = option(None, ge=0, help="the first block M whose output receives the running sum; "
                                     "null: the middle block (DTL: 6 of 12)")
    fusion_size: int = option(0, ge=0, help="DTL+'s depthwise convolution: kernel size over the token grid "
                              "(3 in DTL+); 0: none (DTL)")
    pooling: str = option("auto", choices=SIDE_POOLINGS, help="as `pooling` of bypass (`auto`, `cls` or `mean`)")
    family: str | None = option(None, help="force an op map (as `family` of restuning)")

    def validate(self) -> None:
        check_family(self.family)
        if self.fusion_size and self.fusion_size % 2 == 0:
            raise ConfigError(f"fusion_size: expected an odd kernel size (it keeps the grid's size), got "
                              f"{self.fusion_size}")


class LowRank(nn.Module):
    """x (..., D) -> B A x (..., D), rank r; `up` (B) zero at init, `down` (A) as PyTorch's Linear default."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class DisentangledTransfer(ParameterReport, nn.Module):
    """`model(**inputs)` -> logits (B, num_classes): the frozen backbone with DTL's side network hooked in."""

    def __init__(self, model: nn.Module, config: DTLConfig):
        super().__init__()
        plan = plan_taps(model, BypassConfig(pooling=config.pooling, family=config.family))
        if plan.layout != "tokens":
            raise ConfigError("dtl: its low-rank side network reads tokens (B, T, D); this backbone gives feature maps")
        if len(set(plan.widths)) != 1:
            raise ConfigError(f"dtl: the running sum needs one width through the blocks, got "
                              f"{sorted(set(plan.widths))}")
        depth, width = plan.depth, plan.widths[0]
        self.inject_from = depth // 2 if config.inject_from is None else config.inject_from
        if self.inject_from >= depth:
            raise ConfigError(f"inject_from: {self.inject_from} is past the last block ({depth - 1})")
        self.base_model, self.plan, self.config = model, plan, config
        model.requires_grad_(False)
        self.maps = nn.ModuleList(LowRank(width, config.rank) for _ in range(depth))
        self.fusion = TokenMixing(width, config.fusion_size, grid=plan.grid, causal=plan.causal, bias=False) \
            if config.fusion_size else None
        self.head = nn.Linear(width, config.num_classes)
        ref = next(model.parameters())
        for name, child in self.named_children():
            if name != "base_model":
                child.to(device=ref.device, dtype=trainable_dtype(ref))
        self._call: dict[str, Any] | None = None
        self.handles = []
        for i, point in enumerate(plan.points):
            block = model.get_submodule(point)
            self.handles.append(block.register_forward_pre_hook(self._before(i), with_kwargs=True))
            if i >= self.inject_from:
                self.handles.append(block.register_forward_hook(self._after))

    def train(self, mode: bool = True) -> DisentangledTransfer:
        super().train(mode)
        self.base_model.eval()  # frozen: no dropout, no batch-norm statistics updates
        return self

    @property
    def final_norm(self) -> nn.Module | None:
        return self.base_model.get_submodule(self.plan.final_norm) if self.plan.final_norm else None

    def _before(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self._call
            if call is None:
                return
            if i == self.inject_from:  # from here on, autograd runs through the blocks' activations
                torch.set_grad_enabled(call["grad"])
            x = first_input(args, kwargs)
            with torch.set_grad_enabled(call["grad"]):
                step = self.maps[i](x.to(self.head.weight.dtype))
                call["sum"] = step if call["sum"] is None else call["sum"] + step

        return hook

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call = self._call
        if call is None:
            return None
        r = call["sum"]
        residual = r * torch.sigmoid(self.config.beta * r)
        if self.fusion is not None:
            residual = self.fusion(residual)
        return add_to_output(output, residual.to(output_tensor(output).dtype))

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Backbone inputs as the backbone takes them -> logits (B, num_classes)."""
        grad = torch.is_grad_enabled()
        self._call = {"sum": None, "grad": grad}
        try:
            with torch.no_grad():  # the blocks before the injection point; autograd comes back on there
                last = _last_output(self.base_model, self.plan.points[-1], inputs)
        finally:
            torch.set_grad_enabled(grad)
            self._call = None
        x = last.to(self.head.weight.dtype)
        return self.head(read_out(x, self.plan, inputs.get("attention_mask"), self.final_norm))

    def unload(self) -> nn.Module:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return self.base_model


class _Stop(Exception):
    pass


def _last_output(model: nn.Module, last: str, inputs: dict[str, Any]) -> torch.Tensor:
    """Run `model(**inputs)` up to module `last` and return its output as the hooks registered before left it."""
    seen: dict[str, torch.Tensor] = {}

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        seen["x"] = output_tensor(output)
        raise _Stop

    handle = model.get_submodule(last).register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise RuntimeError(f"dtl: the backbone call did not run its last block {last!r}")
    return seen["x"]


def build(backbone: nn.Module, options: DTLConfig, num_classes: int | None) -> nn.Module:
    return DisentangledTransfer(backbone, options)


register_method(Method("dtl", build, options=DTLConfig, low_precision=True,
                       summary="DTL: low-rank maps of every block's input, summed and added into the later blocks "
                       "(DTLConfig)"))
register_method(Method("dtl_plus", build, options=DTLConfig, low_precision=True,
                       defaults={"classification": {"fusion_size": 3}},
                       summary="DTL+: DTL with a 3x3 depthwise convolution of the sum over the token grid (DTLConfig, "
                       "fusion_size 3)"))
