"""`get_restuning_model` and `ResTuningModel`: a frozen backbone with Res-Tuners attached by hooks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .bypass import BypassConfig, ResTuningBypassModel
from .bypass.taps import is_unet
from .config import ConfigError, ResTuningConfig
from .hooks import Attachment
from .ops import OpSite, find_ops, name_matches
from .params import ParameterReport
from .tuners import FrozenAttention, OpContext, ResTuner, build_tuner


@dataclass
class TuningPlan:
    """What would be attached, built without touching the backbone."""

    sites: list[OpSite]
    tuners: dict[str, ResTuner]
    modules_to_save: list[str]


def plan_tuning(model: nn.Module, config: ResTuningConfig) -> TuningPlan:
    """Find the ops and build their tuners (on the backbone's device and dtype); no side effects."""
    sites = find_ops(model, config)
    specs = config.specs()
    ref = next(model.parameters())
    tuners: dict[str, ResTuner] = {}
    for site in sites:
        ctx = OpContext(site.in_features, site.out_features, _frozen_attention(model, site))
        tuner = build_tuner(specs[site.kind], ctx, config.dim, where=f"{site.kind} at {site.exit}")
        tuners[site.key] = tuner.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    saved = _match_modules_to_save(model, config.modules_to_save)
    return TuningPlan(sites, tuners, saved)


def _frozen_attention(model: nn.Module, site: OpSite) -> FrozenAttention | None:
    att = site.attention
    if att is None:
        return None
    get = model.get_submodule
    return FrozenAttention(get(att.query), get(att.key), get(att.value), get(att.norm) if att.norm else None,
                           att.num_heads)


def _match_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    matched = []
    for target in names:
        hits = [n for n, _ in model.named_modules() if n and name_matches(n, [target])]
        if not hits:
            children = [n for n, _ in model.named_children()]
            raise ConfigError(f"modules_to_save: no module named {target!r}; top-level modules are {children}")
        matched.extend(hits)
    return matched


class ResTuningModel(ParameterReport, nn.Module):
    """A backbone whose parameters are frozen, with tuners running in parallel to its ops.

    Calls go straight to the backbone (same signature, same outputs at initialisation). Attributes
    the wrapper does not have are looked up on the backbone, as PEFT's models do.
    """

    def __init__(self, model: nn.Module, config: ResTuningConfig, plan: TuningPlan | None = None):
        super().__init__()
        plan = plan or plan_tuning(model, config)
        self.base_model = model
        self.restuning_config = config
        self.tuners = nn.ModuleDict(plan.tuners)
        self.sites = {s.key: s for s in plan.sites}
        self.modules_to_save = plan.modules_to_save
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._saved_originals = {
            name: {k: v.detach().clone() for k, v in model.get_submodule(name).state_dict().items()}
            for name in self.modules_to_save
        }
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._attachments = [Attachment(model, self.sites[k], t) for k, t in self.tuners.items()]
        for attachment in self._attachments:
            attachment.attach()
        # Present the backbone's call signature (transformers.Trainer reads it to pick dataset columns).
        forward = functools.partial(type(self).forward, self)
        forward.__wrapped__ = model.forward
        self.forward = forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- parameters ----------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def tuner_state_dict(self) -> dict[str, torch.Tensor]:
        """Tuner weights and modules_to_save weights only: what a checkpoint holds."""
        state = {f"tuners.{k}": v for k, v in self.tuners.state_dict().items()}
        for name in self.modules_to_save:
            for k, v in self.base_model.get_submodule(name).state_dict().items():
                state[f"modules_to_save.{name}.{k}"] = v
        return state

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write tuner weights (safetensors) and the config (JSON), each atomically."""
        checkpoint.save(Path(save_directory), self.tuner_state_dict(), self._checkpoint_config())

    def _checkpoint_config(self) -> dict[str, Any]:
        return {"method": "restuning", "config": self.restuning_config.to_dict(),
                "backbone": checkpoint.backbone_signature(self.base_model)}

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False) -> ResTuningModel:
        """Attach the tuners saved in `directory` to `model`.

        Everything is read and checked before the backbone is touched: a damaged file, another
        method's checkpoint or a backbone of another shape raises `CheckpointError` and leaves
        `model` as it was. Nothing is unpickled.
        """
        meta, tensors = checkpoint.load(Path(directory))
        if meta.get("method") != "restuning":
            raise checkpoint.CheckpointError(f"{directory}: holds a {meta.get('method')!r} checkpoint, not restuning")
        checkpoint.check_backbone(meta, model, directory)
        config = ResTuningConfig.from_dict(meta["config"])
        plan = plan_tuning(model, config)
        expected = {f"tuners.{k}": v for k, v in nn.ModuleDict(plan.tuners).state_dict().items()}
        for name in plan.modules_to_save:
            for k, v in model.get_submodule(name).state_dict().items():
                expected[f"modules_to_save.{name}.{k}"] = v
        checkpoint.check_tensors(tensors, expected, directory)
        tuned = cls(model, config, plan)
        tuned.load_tuner_state_dict(tensors)
        if not is_trainable:
            tuned.eval()
            for p in tuned.parameters():
                p.requires_grad_(False)
        return tuned

    def load_tuner_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            own = self.tuner_state_dict()
            for key, value in tensors.items():
                own[key].copy_(value)

    # --- removal -------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove every hook, restore requires_grad and the saved modules; return the pristine backbone."""
        for attachment in self._attachments:
            attachment.detach()
        self._attachments.clear()
        model = self.base_model
        with torch.no_grad():
            for name, state in self._saved_originals.items():
                model.get_submodule(name).load_state_dict(state)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        return model


def get_restuning_model(model: nn.Module, config: ResTuningConfig | BypassConfig | None = None):
    """Freeze `model` and attach what `config` describes: Res-Tuners in parallel to its ops
    (`ResTuningConfig`, default: Dual Res-Adapters) -> `ResTuningModel`, or a detached bypass network
    (`BypassConfig`) -> `ResTuningBypassModel` (`UNetBypassModel` for a diffusers UNet)."""
    config = config if config is not None else ResTuningConfig()
    if isinstance(config, BypassConfig):
        if is_unet(model):
            from .diffusion.bypass import UNetBypassModel  # on demand: the diffusion package is optional

            return UNetBypassModel(model, config)
        return ResTuningBypassModel(model, config)
    if not isinstance(config, ResTuningConfig):
        raise ConfigError(f"expected a ResTuningConfig or BypassConfig, got {type(config).__name__}")
    return ResTuningModel(model, config)
