"""`get_restuning_model` and `ResTuningModel`: a frozen backbone with Res-Tuners attached by hooks."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, merging
from .adapters import BASE, Adapter, TuningPlan, plan_tuning  # noqa: F401  (plan_tuning: re-exported)
from .card import model_card, write_card
from .config import ConfigBase, ResTuningConfig
from .errors import CheckpointError, ConfigError
from .hooks import Routing, Rows
from .hub import locate
from .ops import OpSite
from .params import ParameterReport

DEFAULT = "default"
# backbone id -> the ResTuningModel that tunes it (so `from_pretrained(backbone, ..., unload_first=True)` finds it)
_OWNERS: weakref.WeakValueDictionary[int, ResTuningModel] = weakref.WeakValueDictionary()


class ResTuningModel(ParameterReport, nn.Module):
    """A backbone whose parameters are frozen, with tuners running in parallel to its ops.

    Calls go straight to the backbone (same signature, same outputs at initialisation). Attributes
    the wrapper does not have are looked up on the backbone, as PEFT's models do.

    Several named adapters (PEFT's habits) live on one backbone: `add_adapter`, `set_adapter`,
    `delete_adapter`, `load_adapter`, `disable_adapter()` (a context manager), and `adapter_names=` in a
    call for a mixed batch. One adapter is active (attached by hooks); `tuners`, `sites`,
    `modules_to_save` and `restuning_config` are the active adapter's.
    """

    def __init__(self, model: nn.Module, config: ResTuningConfig | None = None, plan: TuningPlan | None = None,
                 adapter_name: str = DEFAULT, adapter: Adapter | None = None):
        super().__init__()
        self.base_model = model
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        if adapter is None:
            adapter = Adapter(model, config if config is not None else ResTuningConfig(), plan)
        self.adapters = nn.ModuleDict({adapter_name: adapter})
        self.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        self._set_trainable()
        adapter.attach()
        model._restuning_attached = True  # from_pretrained refuses to attach a second set
        _OWNERS[id(model)] = self
        # Present the backbone's call signature (transformers.Trainer reads it to pick dataset columns).
        forward = functools.partial(type(self).forward, self)
        forward.__wrapped__ = model.forward
        self.forward = forward

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The backbone's call; with `adapter_names` (one name per sample, `"__base__"` for none), each
        sample runs through its own adapter, all in one forward."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed_batch(list(adapter_names)):
            return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            found = getattr(self.base_model, name)
            if name == "generate" and callable(found):  # a generative backbone's: takes `adapter_names=` as well
                return functools.partial(self._generate, found)
            return found

    def _generate(self, generate: Any, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The backbone's `generate`; with `adapter_names` (one name per sample of the prompt batch), each sample's
        every step runs through its own adapter, as in `forward` (the KV cache included). A batch that generation
        widens (`num_beams`, `num_return_sequences`) no longer has one name per sample and is refused."""
        if adapter_names is None:
            return generate(*args, **kwargs)
        with self._mixed_batch(list(adapter_names)):
            return generate(*args, **kwargs)

    # --- the active adapter --------------------------------------------------------------------
    @property
    def active(self) -> Adapter:
        return self.adapters[self.active_adapter]

    @property
    def tuners(self) -> nn.ModuleDict:
        """The active adapter's tuners, by op key."""
        return self.active.tuners

    @property
    def sites(self) -> dict[str, OpSite]:
        return self.active.sites

    @property
    def modules_to_save(self) -> list[str]:
        return self.active.modules_to_save

    @property
    def restuning_config(self) -> ResTuningConfig:
        return self.active.config

    @property
    def _attachments(self) -> list:
        return self.active.attachments

    def saved_module(self, name: str, adapter_name: str | None = None) -> nn.Module:
        """The trained copy of backbone module `name` (a module to save, such as the task head) in the
        active adapter, or in `adapter_name`; it stands in for the backbone's own while attached."""
        return self._adapter(adapter_name or self.active_adapter).saved_module(name)

    # --- named adapters ------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: ResTuningConfig) -> None:
        """Add a new adapter built from `config` (trainable; not active until `set_adapter`)."""
        self._new_name(adapter_name)
        with self._none_attached():
            adapter = Adapter(self.base_model, config)
        self._add(adapter_name, adapter)

    def load_adapter(self, source: str | Path, adapter_name: str, is_trainable: bool = False,
                     revision: str | None = None) -> None:
        """Add the adapter saved in `source` (a folder or a Hub id) as `adapter_name`; not active until
        `set_adapter`. Checked before anything changes, as `from_pretrained` is."""
        self._new_name(adapter_name)
        with self._none_attached():
            adapter = _read_adapter(self.base_model, locate(source, revision))
        adapter.trainable = is_trainable
        self._add(adapter_name, adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the one attached, trained and saved by default."""
        adapter = self._adapter(adapter_name)
        if adapter_name == self.active_adapter:
            return
        attached = self.active.attached
        self.active.detach()
        self.active_adapter = adapter_name
        if attached:
            adapter.attach()
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name`; deleting the active one makes the first remaining one active."""
        self._adapter(adapter_name)
        if len(self.adapters) == 1:
            raise ConfigError(f"delete_adapter: {adapter_name!r} is this model's only adapter; call unload() to "
                              "remove the tuners")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(n for n in self.adapters if n != adapter_name))
        self.adapters[adapter_name].detach()
        del self.adapters[adapter_name]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, the model is the backbone alone (its own modules to save included)."""
        attached = [a for a in self.adapters.values() if a.attached]
        for adapter in attached:
            adapter.detach()
        try:
            yield
        finally:
            for adapter in attached:
                adapter.attach()

    def _adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise ConfigError(f"no adapter named {name!r}; this model has {list(self.adapters)}")
        return self.adapters[name]

    def _new_name(self, name: str) -> None:
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} already exists; expected a new name (not one of "
                              f"{list(self.adapters)})")
        if not name or name == BASE or "." in name or "/" in name:
            raise ConfigError(f"adapter name {name!r}: expected a non-empty name without '.' or '/', not {BASE!r}")

    def _add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Only the active adapter trains (if it was loaded trainable)."""
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name == self.active_adapter and adapter.trainable)

    @contextmanager
    def _none_attached(self) -> Iterator[None]:
        """No adapter attached within the block (to copy the backbone's modules to save as they are)."""
        with self.disable_adapter():
            yield

    @contextmanager
    def _mixed_batch(self, names: list[str]) -> Iterator[None]:
        unknown = sorted({n for n in names if n != BASE and n not in self.adapters})
        if unknown:
            raise ConfigError(f"adapter_names: no adapter named {unknown}; this model has {list(self.adapters)} "
                              f"(and {BASE!r} for the backbone alone)")
        used = [n for n in dict.fromkeys(names) if n != BASE]
        for name in used:
            problems = self.adapters[name].mixed_batch_problems()
            if problems:
                raise ConfigError(f"adapter_names: adapter {name!r} has tuners that cannot serve a mixed batch: "
                                  f"{', '.join(problems)}; expected tuners whose delta for a sample depends on that "
                                  "sample alone (ResTuner.mixed_batch)")
        device, routing = next(self.base_model.parameters()).device, Routing()
        with self.disable_adapter():
            try:
                for name in used:
                    rows = Rows(name, [i for i, n in enumerate(names) if n == name], len(names), device, routing)
                    self.adapters[name].attach(rows)
                yield
            finally:
                for name in used:
                    self.adapters[name].detach()

    # --- parameters ----------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def tuner_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Tuner weights and modules_to_save weights only (of the active adapter, or `adapter_name`): what a
        checkpoint holds."""
        return self._adapter(adapter_name or self.active_adapter).checkpoint_state()

    def load_tuner_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.active.load_checkpoint_state(tensors)

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None,
                        metrics: dict[str, Any] | None = None) -> None:
        """Write each adapter (all, or `selected_adapters`) as a checkpoint: tuner weights (safetensors),
        the config (JSON) and a model card (README.md, with `metrics` when given), each atomically. The
        adapter "default" goes into `save_directory`, any other into `save_directory/<name>`, as in PEFT."""
        for name in selected_adapters if selected_adapters is not None else list(self.adapters):
            adapter = self._adapter(name)
            folder = Path(save_directory) if name == DEFAULT else Path(save_directory) / name
            meta = self._checkpoint_config(name)
            tensors = adapter.checkpoint_state()
            checkpoint.save(folder, tensors, meta)
            trainable = sum(t.numel() for t in tensors.values())
            total = sum(p.numel() for p in self.base_model.parameters()) + trainable
            write_card(folder, model_card(adapter=name, config=meta["config"], base_model=meta.get("base_model"),
                                          backbone=type(self.base_model).__name__, trainable=trainable, total=total,
                                          saved=adapter.modules_to_save, metrics=metrics))

    def _checkpoint_config(self, adapter_name: str | None = None) -> dict[str, Any]:
        config = self._adapter(adapter_name or self.active_adapter).config
        meta = {"method": "restuning", "config": config.to_dict(),
                "backbone": checkpoint.backbone_signature(self.base_model)}
        base = base_model_id(self.base_model)
        return {**meta, "base_model": base} if base else meta

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False,
                        adapter_name: str = DEFAULT, unload_first: bool = False,
                        revision: str | None = None) -> ResTuningModel:
        """Attach the tuners saved in `directory` (a folder, or a Hugging Face Hub id resolved through
        `huggingface_hub`, at `revision`) to `model`, as adapter `adapter_name`.

        Everything is read and checked before the backbone is touched: a damaged file, another
        method's checkpoint or a backbone of another shape raises `CheckpointError` and leaves
        `model` as it was. Nothing is unpickled. A model that already carries tuners is refused, unless
        `unload_first` (its tuners are then unloaded first, keeping its trained modules to save, as
        `unload()` does); `load_adapter` adds a checkpoint to a tuned model as a second adapter instead.
        """
        directory = locate(directory, revision)
        owner = model if isinstance(model, ResTuningModel) else _OWNERS.get(id(model))
        backbone = model.base_model if isinstance(model, ResTuningModel) else model
        if owner is not None and owner.base_model is not backbone:
            owner = None
        if isinstance(model, ResTuningModel) or getattr(backbone, "_restuning_attached", False):
            if not unload_first:
                raise CheckpointError(f"{directory}: the model already carries Res-Tuning tuners; call unload() on it "
                                      "first, or pass unload_first=True (attaching a second set would change its "
                                      "outputs); load_adapter() adds the checkpoint as a second, named adapter")
            if owner is None:
                raise CheckpointError(f"{directory}: the model carries tuners whose ResTuningModel is gone; "
                                      "expected the ResTuningModel itself with unload_first=True")
            _read_meta(backbone, directory)  # the cheap checks first: nothing is unloaded for a wrong checkpoint
            backbone = owner.unload()
        adapter = _read_adapter(backbone, directory)
        adapter.trainable = is_trainable
        tuned = cls(backbone, adapter.config, adapter_name=adapter_name, adapter=adapter)
        if not is_trainable:
            tuned.eval()
        return tuned

    # --- removal -------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove every hook and restore requires_grad; return the backbone, pristine but for the modules
        to save, which keep the active adapter's trained weights (as PEFT's unload and merge do)."""
        for adapter in self.adapters.values():
            adapter.detach()
        model = self.base_model
        self.active.copy_saved_into(model)
        model._restuning_attached = False
        _OWNERS.pop(id(model), None)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        return model

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the backbone's weights and return the plain backbone, which computes
        what the tuned model did. Only tuners that fold exactly (LoRA on a linear layer; SSF and BitFit on an
        op ending in one) can; any other raises ConfigError naming them, before anything changes."""
        merging.check_foldable(self.active, self.base_model, self.active_adapter)
        adapter = self.active
        model = self.unload()
        merging.fold(adapter, model)
        return model


def base_model_id(model: nn.Module) -> str | None:
    """The backbone's Hub id or folder (`name_or_path`), or None for a model built in code."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _read_meta(model: nn.Module, directory: Path) -> tuple[dict[str, Any], ResTuningConfig, dict[str, torch.Tensor]]:
    """The checkpoint in `directory`, checked to be Res-Tuning's and made for `model`'s shape."""
    meta, tensors = checkpoint.load(directory)
    if meta.get("method") != "restuning":
        raise CheckpointError(f"{directory}: holds a {meta.get('method')!r} checkpoint, not restuning")
    checkpoint.check_backbone(meta, model, directory)
    try:
        config = ResTuningConfig.from_dict(meta["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{directory}: the saved config cannot be read ({err})") from err
    return meta, config, tensors


def _read_adapter(model: nn.Module, directory: Path) -> Adapter:
    """The adapter saved in `directory`, built for `model` (not attached) and loaded; CheckpointError unless
    the tensors fit it exactly."""
    meta, config, tensors = _read_meta(model, directory)
    # A run's classifier keeps its head beside the tuners (restuning.methods); it is not part of this model.
    tensors = {k: v for k, v in tensors.items() if not (meta.get("num_classes") and k.startswith("head."))}
    adapter = Adapter(model, config)
    checkpoint.check_tensors(tensors, adapter.checkpoint_state(), directory)
    adapter.load_checkpoint_state(tensors)
    return adapter


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
