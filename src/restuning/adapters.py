"""Named adapters: one set of Res-Tuners, and trained copies of the modules to save, per name.

An `Adapter` is what one `ResTuningConfig` attaches to a backbone: its tuners (one per op) and, for each
module to save (a task head), a copy that trains in place of the backbone's own. It is attached by the one
mechanism of the library (forward hooks, `restuning.hooks`) only while it is active, so several adapters
live on one backbone and switching between them is detaching one and attaching another. Its checkpoint
tensors are the library's one format: `tuners.<op key>.<param>` and `modules_to_save.<module>.<key>`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .config import ResTuningConfig
from .errors import ConfigError
from .hooks import Attachment, Rows, SavedModule
from .ops import OpSite, find_ops, name_matches, token_layout, widths
from .precision import is_quantized, trainable_dtype
from .tasks import outermost, task_heads
from .tuners import FrozenAttention, OpContext, ResTuner, build_tuner

BASE = "__base__"  # the name, in `adapter_names=`, of a sample that runs through the backbone alone (as PEFT)


@dataclass
class TuningPlan:
    """What would be attached, built without touching the backbone."""

    sites: list[OpSite]
    tuners: dict[str, ResTuner]
    modules_to_save: list[str]


def plan_tuning(model: nn.Module, config: ResTuningConfig) -> TuningPlan:
    """Find the ops and build their tuners (on the backbone's device, in its dtype or float32 beside a
    low-precision one); no side effects."""
    sites = find_ops(model, config)
    specs = config.specs()
    ref = next(model.parameters())
    grid, causal = token_layout(model)
    tuners: dict[str, ResTuner] = {}
    for site in sites:
        ctx = OpContext(site.in_features, site.out_features, _frozen_attention(model, site),
                        grid=grid or site.layout == "map", causal=causal)
        tuner = build_tuner(specs[site.kind], ctx, config.dim, where=f"{site.kind} at {site.exit}")
        tuners[site.key] = tuner.to(device=ref.device, dtype=trainable_dtype(ref))
    saved = _match_modules_to_save(model, config.modules_to_save)
    saved = outermost(list(dict.fromkeys([*saved, *task_heads(model, config.task_type)])))
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


def _trainable_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of a backbone module (`modules_to_save`): float32 where the backbone is low precision."""
    copied = copy.deepcopy(module)
    dtype = next((trainable_dtype(p) for p in copied.parameters()), None)
    if any(is_quantized(p) for p in copied.parameters()):
        raise ConfigError("modules_to_save: cannot train a copy of an int8-quantized module; hold the backbone in "
                          "bfloat16 or float32 to train it")
    return copied.to(dtype) if dtype is not None else copied


def _key(name: str) -> str:
    return name.replace(".", "/")


class Adapter(nn.Module):
    """One named set of tuners and saved-module copies for `model`; attached only while active.

    Build it while no other adapter is attached to `model` (the copies of the modules to save are taken
    from the backbone as it is then)."""

    def __init__(self, model: nn.Module, config: ResTuningConfig, plan: TuningPlan | None = None):
        super().__init__()
        plan = plan or plan_tuning(model, config)
        self.config = config
        self.tuners = nn.ModuleDict(plan.tuners)
        self.saved = nn.ModuleDict({_key(n): _trainable_copy(model.get_submodule(n)) for n in plan.modules_to_save})
        self.sites = {s.key: s for s in plan.sites}
        self.modules_to_save = list(plan.modules_to_save)
        self.trainable = True
        self.attachments = [Attachment(model, self.sites[k], t) for k, t in self.tuners.items()]
        self.heads = [SavedModule(model, n, self.saved[_key(n)]) for n in self.modules_to_save]

    @property
    def attached(self) -> bool:
        return any(a.attached for a in [*self.attachments, *self.heads])

    def attach(self, rows: Rows | None = None) -> None:
        """Run this adapter in the backbone's forward (on the samples `rows` only, when given)."""
        for a in [*self.attachments, *self.heads]:
            a.attach(rows)

    def detach(self) -> None:
        for a in [*self.attachments, *self.heads]:
            a.detach()

    def saved_module(self, name: str) -> nn.Module:
        """The trained copy of backbone module `name` (one of `modules_to_save`)."""
        if name not in self.modules_to_save:
            raise ConfigError(f"{name!r} is not a module to save of this adapter; expected one of "
                              f"{self.modules_to_save}")
        return self.saved[_key(name)]

    def mixed_batch_problems(self) -> list[str]:
        """The tuners that cannot serve a mixed batch, as `name (op)`."""
        return [f"{t.name} ({self.sites[k].kind} at {self.sites[k].exit})" for k, t in self.tuners.items()
                if not t.mixed_batch]

    # --- the checkpoint tensors ------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tuner weights and the saved modules' weights, under the checkpoint's names."""
        state = {f"tuners.{k}": v for k, v in self.tuners.state_dict().items()}
        for name in self.modules_to_save:
            for k, v in self.saved[_key(name)].state_dict().items():
                state[f"modules_to_save.{name}.{k}"] = v
        return state

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (already checked against `checkpoint_state`) in."""
        with torch.no_grad():
            own = self.checkpoint_state()
            for key, value in tensors.items():
                own[key].copy_(value)

    def copy_saved_into(self, model: nn.Module) -> None:
        """Write the trained copies over the backbone's own modules (what `unload` keeps)."""
        with torch.no_grad():
            for name in self.modules_to_save:
                model.get_submodule(name).load_state_dict(self.saved[_key(name)].state_dict())
