"""`get_restuning_model` and `ResTuningModel`: a frozen backbone with Res-Tuners attached by hooks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import ConfigBase, ResTuningConfig
from .errors import CheckpointError, ConfigError
from .hooks import Attachment
from .ops import OpSite, find_ops, name_matches, widths
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
    in_width = widths(get(att.key), att.key)[0]
    return FrozenAttention(get(att.query), get(att.key), get(att.value), get(att.norm) if att.norm else None,
                           att.num_heads, att.num_kv_heads, att.head_dim, in_width, att.scale, att.exact)


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
        model._restuning_attached = True  # from_pretrained refuses to attach a second set
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
            raise CheckpointError(f"{directory}: holds a {meta.get('method')!r} checkpoint, not restuning")
        if isinstance(model, ResTuningModel) or getattr(model, "_restuning_attached", False):
            raise CheckpointError(f"{directory}: the model already carries Res-Tuning tuners; call unload() on it "
                                  "first (attaching a second set would change its outputs)")
        checkpoint.check_backbone(meta, model, directory)
        try:
            config = ResTuningConfig.from_dict(meta["config"])
        except (ConfigError, KeyError) as err:
            raise CheckpointError(f"{directory}: the saved config cannot be read ({err})") from err
        # A run's classifier keeps its head beside the tuners (restuning.methods); it is not part of this model.
        tensors = {k: v for k, v in tensors.items() if not (meta.get("num_classes") and k.startswith("head."))}
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
        model._restuning_attached = False
        with torch.no_grad():
            for name, state in self._saved_originals.items():
                model.get_submodule(name).load_state_dict(state)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        return model


# Config type -> the model it builds on a backbone (PEFT's mapping). Res-Tuning is built in; the bypass
# registers `BypassConfig` when `restuning.bypass` is imported.
TUNED_MODELS: dict[type[ConfigBase], Any] = {}


def register_tuned_model(config_type: type[ConfigBase], build) -> None:
    """`get_restuning_model(model, config)` with a `config_type` config returns `build(model, config)`."""
    TUNED_MODELS[config_type] = build


register_tuned_model(ResTuningConfig, ResTuningModel)


def get_restuning_model(model: nn.Module, config: ConfigBase | None = None):
    """Freeze `model` and attach what `config` describes: Res-Tuners in parallel to its ops
    (`ResTuningConfig`, default: Dual Res-Adapters) -> `ResTuningModel`, or a detached bypass network
    (`BypassConfig`) -> `ResTuningBypassModel` (`UNetBypassModel` for a diffusers UNet)."""
    config = config if config is not None else ResTuningConfig()
    build = TUNED_MODELS.get(type(config))
    if build is None:
        raise ConfigError(f"expected one of {[t.__name__ for t in TUNED_MODELS]}, got {type(config).__name__}")
    return build(model, config)
