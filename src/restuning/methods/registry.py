"""The method registry: every training method the trainers know is one `Method` entry.

An entry says what the method's options are (checked when a run config loads, before any backbone or data
is loaded), how it builds its trainable model on a backbone, how that model is saved and loaded (one
checkpoint format, `restuning.checkpoint`), and what it can do. A new method is one module that calls
`register_method` (PEFT's `mapping.py`, as a registry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigBase
from ..errors import ConfigError

TASKS = ("classification", "diffusion")


@dataclass(frozen=True)
class Method:
    """One training method.

    Args:
        name: the `method.name` of a run config.
        build: `(backbone, options, num_classes) -> model`. With `num_classes` the model returns logits
            (B, num_classes) from `model(**backbone_inputs)`; with None it is the tuned backbone itself,
            called as the backbone is (a diffusion denoiser).
        options: the options dataclass `method.config` is read into; None: the method takes no options.
        tasks: the run kinds it serves (`classification`, `diffusion`).
        reads_frozen_backbone: it never back-propagates into the backbone's weights (a `FrozenBackbone` model),
            so it can train from the feature cache, unless its model says otherwise (`cacheable`).
        multi_task: its runs on one backbone join one multi-task model that answers them all from a single
            backbone forward (`MultiTaskBypass`), at prediction and generation, unless their options say
            otherwise (`shares_forward`; see `serves_many`).
        trains_backbone: it trains the backbone's own parameters (full fine-tuning, BitFit), some of which the
            loss may not reach (DDP's find_unused_parameters).
        low_precision: its backbone may be held in bfloat16 or int8 (`backbone_dtype`): it trains none of the
            backbone's own weights, and what it trains reads the backbone through float32 boundaries.
        defaults: per task, option values merged under the user's (e.g. PEFT LoRA's targets in a UNet).
        parse: reads `method.config` (a mapping) into the options `build` takes; default: `options.from_dict`.
        save: `(model, directory, meta)` writes the checkpoint; default: the trainable tensors.
        load: `(backbone, directory, meta, tensors, trainable) -> model`; default: build, then load the tensors.
        checkpoint_names: further `method` values of checkpoints this entry loads (the bypass's own tags).
        summary: one line for `restuning config` and the docs.
    """

    name: str
    build: Callable[[nn.Module, Any, int | None], nn.Module]
    options: type[ConfigBase] | None = None
    tasks: tuple[str, ...] = ("classification",)
    reads_frozen_backbone: bool = False
    multi_task: bool = False
    trains_backbone: bool = False
    low_precision: bool = False
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    parse: Callable[[dict[str, Any], int | None], Any] | None = None
    save: Callable[[nn.Module, Path, dict[str, Any]], None] | None = None
    load: Callable[..., nn.Module] | None = None
    checkpoint_names: tuple[str, ...] = ()
    summary: str = ""

    def serves_many(self, config: dict[str, Any]) -> bool:
        """Whether a run of this method with `config` (its `method.config`) joins the one multi-task forward."""
        return self.multi_task and getattr(self.read_options(config, None), "shares_forward", True)

    def read_options(self, config: dict[str, Any], num_classes: int | None = None, task: str = "classification",
                     where: str = "method.config") -> Any:
        """`config` (the run config's `method.config`) as the options `build` takes, checked. Options with a
        `num_classes` field get it from the data; `num_classes=None` checks them with a stand-in."""
        if task not in self.tasks:
            raise ConfigError(f"method.name: {self.name} does not serve {task} runs; methods that do: "
                              f"{names(task)}")
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a mapping of options, got {type(config).__name__}")
        config = {**self.defaults.get(task, {}), **config}
        if self.parse is not None:
            return self.parse(config, num_classes)
        if self.options is None:
            if config:
                raise ConfigError(f"{where}: {self.name} takes no options, got {sorted(config)}")
            return None
        fields = {f.name for f in dataclasses.fields(self.options)}
        if "num_classes" in fields:
            if "num_classes" in config:
                raise ConfigError(f"{where}.num_classes: set from the data's classes; remove it")
            if num_classes is not None or task == "classification":
                config = {**config, "num_classes": num_classes if num_classes is not None else 2}
        return self.options.from_dict(config, where)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available to run configs under `method.name`."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    unknown = set(method.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"method {method.name!r}: unknown tasks {sorted(unknown)}; expected some of {TASKS}")
    METHODS[method.name] = method
    return method


def names(task: str | None = None) -> list[str]:
    """Registered method names, all or those serving `task`, sorted."""
    return sorted(n for n, m in METHODS.items() if task is None or task in m.tasks)


def get_method(name: str, task: str | None = None) -> Method:
    method = METHODS.get(name)
    if method is None or (task is not None and task not in method.tasks):
        raise ConfigError(f"method.name: expected one of {names(task)}, got {name!r}")
    return method


def method_for_checkpoint(tag: str) -> Method:
    """The entry that loads checkpoints whose `method` is `tag`."""
    for method in METHODS.values():
        if tag == method.name or tag in method.checkpoint_names:
            return method
    from ..errors import CheckpointError

    raise CheckpointError(f"a checkpoint of method {tag!r}, which no registered method loads; known: {names()}")
