"""The classifier most methods train, and the one checkpoint format of a trained method.

`LastLayerClassifier` reads the backbone's last layer the way its own read-out does (final norm, CLS / mean /
spatial pooling), then a linear head: full fine-tuning, linear probing, BitFit, Res-Tuning and its presets,
VPT-shallow and PEFT's LoRA are all `head(read_out(backbone(x)))` with different things trainable.

A trained method is saved with `save_model` as a `restuning.checkpoint` folder (safetensors weights and a
JSON config) and opened with `load_model` (or, for Res-Tuning and the bypass, their own `from_pretrained`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..bypass import BypassConfig, FeatureTaps, plan_taps
from ..bypass.network import read_out
from ..errors import CheckpointError
from ..params import ParameterReport
from .registry import Method, get_method, method_for_checkpoint


class LastLayerClassifier(ParameterReport, nn.Module):
    """`head(read_out(last layer of backbone))`. `frozen`: the backbone runs without autograd (linear
    probing); otherwise gradients flow into whatever in `runner` trains (full fine-tuning, tuners).
    Backbone modules after the last layer that the read-out does not use (a pooler) are frozen, so
    that they count as neither trained nor trainable."""

    def __init__(self, runner: nn.Module, backbone: nn.Module, num_classes: int, frozen: bool):
        super().__init__()
        self.runner, self.frozen = runner, frozen
        self.plan = plan_taps(backbone, BypassConfig())
        self._backbone = [backbone]  # a plain reference: the backbone is already a submodule of runner
        self.taps = FeatureTaps(backbone, self.plan.points[-1:], grad=not frozen).attach()
        for p in _unused_after(backbone, self.plan.points[-1], self.plan.final_norm):
            p.requires_grad_(False)
        ref = next(backbone.parameters())
        self.head = nn.Linear(self.plan.widths[-1], num_classes).to(ref.device)

    def train(self, mode: bool = True) -> LastLayerClassifier:
        super().train(mode)
        if self.frozen:
            self.runner.eval()
        return self

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Backbone inputs as the backbone takes them -> logits (B, num_classes)."""
        # The head's dtype: float32 beside a low-precision backbone.
        last = self.taps(lambda: self.runner(**inputs))[-1].to(self.head.weight.dtype)
        if self.plan.layout == "map":
            last = last.movedim(1, -1)
        norm = self._backbone[0].get_submodule(self.plan.final_norm) if self.plan.final_norm else None
        return self.head(read_out(last, self.plan, inputs.get("attention_mask"), norm))


def _unused_after(backbone: nn.Module, last: str, final_norm: str | None) -> list[nn.Parameter]:
    """Parameters of modules registered after the last tapped layer, other than the final norm."""
    names = [n for n, _ in backbone.named_modules()]
    after = names[names.index(last) + 1:]
    keep = (last, final_norm) if final_norm else (last,)
    unused = []
    for name in after:
        if any(name == k or name.startswith(k + ".") for k in keep):
            continue
        unused.extend(backbone.get_submodule(name).parameters(recurse=False))
    return unused


# --- the checkpoint of a trained method ------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, and the buffers of every module that has one (BatchNorm statistics that
    full fine-tuning updates), by name."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{name}." if name else ""
            state.update({f"{prefix}{b}": t for b, t in module.named_buffers(recurse=False)
                          if b not in module._non_persistent_buffers_set})
    return state


def run_meta(method: str, options: dict[str, Any], num_classes: int | None, task: str) -> dict[str, Any]:
    """What every method's checkpoint records of the run beside its own config."""
    return {"run_method": method, "options": options, "num_classes": num_classes, "task": task}


def save_model(model: nn.Module, method: str, options: dict[str, Any], num_classes: int | None, backbone: nn.Module,
               directory: str | Path, task: str = "classification") -> None:
    """Save `model`, trained by `method` (a registry name) with the run's `options` (its `method.config`),
    as a checkpoint that `load_model` opens on a fresh copy of `backbone`."""
    entry = get_method(method)
    meta = {**run_meta(method, options, num_classes, task), "backbone": checkpoint.backbone_signature(backbone)}
    (entry.save or save_trainable)(model, Path(directory), meta)


def save_trainable(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """The default save: the trainable state, with `meta` (the method is `meta["run_method"]`)."""
    checkpoint.save(directory, trainable_state(model), {**meta, "method": meta["run_method"]})


def load_model(backbone: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """The model saved in `directory` (by `save_model`, or any library `save_pretrained`), rebuilt on
    `backbone`; frozen and in eval mode unless `trainable`. A checkpoint that does not fit `backbone` raises
    CheckpointError before anything is loaded into it."""
    directory = Path(directory)
    meta, tensors = checkpoint.load(directory)
    method = method_for_checkpoint(str(meta.get("run_method") or meta.get("method")))
    checkpoint.check_backbone(meta, backbone, directory)
    model = (method.load or load_trainable)(method, backbone, directory, meta, tensors)
    if not trainable:
        model.requires_grad_(False).eval()
    return model


def load_trainable(method: Method, backbone: nn.Module, directory: Path, meta: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The default load: build the method as the run did, then copy the saved trainable state in."""
    num_classes, task = meta.get("num_classes"), meta.get("task", "classification")
    options = method.read_options(meta.get("options") or {}, num_classes, task, where=f"{directory}: method.config")
    model = method.build(backbone, options, num_classes)
    load_state(model, tensors, directory)
    return model


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Any) -> None:
    """Copy `tensors` into `model`'s trainable state; CheckpointError unless they fit it exactly."""
    own = trainable_state(model)
    checkpoint.check_tensors(tensors, own, where)
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


__all__ = ["CheckpointError", "LastLayerClassifier", "load_model", "load_state", "load_trainable", "run_meta",
           "save_model", "save_trainable", "trainable_state"]
