"""`TrainConfig`: one training run as plain data, read from YAML with every key and type checked
before any work starts. Defaults follow paper Table 10 (AdamW, weight decay 0.05, cosine schedule
with warm-up, batch 32)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..baselines.presets import PRESETS
from ..config import ConfigError

METHODS = ("linear", "full", "restuning", "bypass", "bitfit", "vpt_shallow", "side_tuning", "lst", "peft_lora",
           *PRESETS)
DATA_NAMES = ("mnist", "digits", "tweets", "image_folder", "text_table", "hf")


@dataclass
class DataConfig:
    """Args:
        name: a shipped set (`mnist`, `digits`, `tweets`) or a source (`image_folder`, `text_table`
            for CSV/JSONL, `hf` for a local Hugging Face dataset), which needs `path`.
        shots: k examples per class for training (few-shot protocol), else `train_size` examples.
        train_size: training examples (e.g. 1000 for VTAB-1k style); `None`: all not held out.
        validation: tune on a VTAB-1k-style split: train on 80% of the training examples (800 of
            1000) and evaluate on the other 20% (200) instead of the test split; then set it false
            to train on all of them.
        test_size: held-out examples (count) for evaluation.
        eval_sets: extra shipped sets to evaluate on, e.g. `[digits]` (domain generalisation).
        image_size, augment: images are resized to `image_size`; `augment` adds RandomResizedCrop and
            a horizontal flip to training batches.
        max_length: tokens per text.
    """

    name: str = "mnist"
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    shots: int | None = None
    train_size: int | None = None
    validation: bool = False
    test_size: int = 1000
    eval_sets: list[str] = field(default_factory=list)
    image_size: int = 56
    augment: bool = False
    max_length: int = 32


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 100
    warmup_epochs: float = 10
    batch_size: int = 32
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16


@dataclass
class MethodConfig:
    """`name`: one of `METHODS`; `config`: the method's options.

    - restuning: the fields of `ResTuningConfig`; bypass: of `BypassConfig`; side_tuning: of
      `SideTuningConfig`; lst: of `LSTConfig`; peft_lora: `peft.LoraConfig` fields.
    - adapter, prefix, vpt_deep, lora, ssf, adaptformer, mam: Res-Tuner presets
      (`restuning.baselines.PRESETS`), with `ResTuningConfig` fields merged over them.
    - vpt_shallow: `tokens` (default 10). linear, full, bitfit: no options.
    """

    name: str = "restuning"
    config: dict[str, Any] = field(default_factory=dict)


def require_positive(values: dict[str, int | None], optional: bool = False) -> None:
    """Each value (named by its config key) is a positive integer; with `optional`, or None."""
    for key, value in values.items():
        if optional and value is None:
            continue
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer{' or null' if optional else ''}, got {value!r}")


@dataclass
class TrainConfig:
    """Args:
        backbone: a shipped asset (`all-MiniLM-L6-v2`, `dinov2-small`, `efficientnet-lite0`), a Hugging
            Face id, or a local model folder.
        output_dir: metrics.jsonl, checkpoints and the final tuned weights go here (see
            `restuning.train.rundir`); a run started again resumes there if its config is the same.
        unit: `epoch` or `step` (optimizer steps): what `log_every`, `eval_every` and `checkpoint_every`
            count; records and checkpoints of `epoch` runs come at epoch ends.
        log_every: units between metrics.jsonl records with the training loss.
        eval_every: units between evaluations; 0: at the end only (the last unit always evaluates).
        checkpoint_every: units between resumable checkpoints (`checkpoints/`; a run that checkpoints also
            does so at its end); 0: none.
        feature_cache: train methods that never back-propagate into the backbone (bypass, side_tuning,
            lst) from backbone features computed once, when the inputs are not augmented. `False` runs the
            backbone at every step (the same results; less memory, more time).
    """

    backbone: str = "dinov2-small"
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    output_dir: str = "runs/run"
    unit: str = "epoch"
    log_every: int = 1
    eval_every: int = 1
    checkpoint_every: int = 1
    feature_cache: bool = True

    def __post_init__(self) -> None:
        if self.method.name not in METHODS:
            raise ConfigError(f"method.name: expected one of {METHODS}, got {self.method.name!r}")
        if self.data.name not in DATA_NAMES:
            raise ConfigError(f"data.name: expected one of {DATA_NAMES}, got {self.data.name!r}")
        if self.data.name in ("image_folder", "text_table", "hf"):
            if not self.data.path:
                raise ConfigError(f"data.path: data.name {self.data.name!r} needs a path")
            if not Path(self.data.path).exists():
                raise ConfigError(f"data.path: {self.data.path!r} does not exist")
        require_positive({"optim.epochs": self.optim.epochs, "optim.batch_size": self.optim.batch_size,
                          "optim.grad_accum": self.optim.grad_accum, "data.image_size": self.data.image_size,
                          "data.test_size": self.data.test_size, "data.max_length": self.data.max_length,
                          "log_every": self.log_every})
        if self.unit not in ("epoch", "step"):
            raise ConfigError(f"unit: expected epoch or step, got {self.unit!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: expected 0 (at the end only) or more, got {self.eval_every!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected 0 (none) or more, got {self.checkpoint_every!r}")
        if self.optim.lr <= 0 or self.optim.warmup_epochs < 0:
            raise ConfigError(f"optim.lr must be positive and optim.warmup_epochs not negative, got "
                              f"{self.optim.lr!r} and {self.optim.warmup_epochs!r}")
        if self.optim.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"optim.mixed_precision: expected no, bf16 or fp16, got {self.optim.mixed_precision!r}")
        if self.data.shots is not None and self.data.shots < 1:
            raise ConfigError(f"data.shots: expected a positive integer or null, got {self.data.shots!r}")
        bad = [s for s in self.data.eval_sets if s not in ("mnist", "digits", "tweets")]
        if bad:
            raise ConfigError(f"data.eval_sets: {bad} are not shipped sets (mnist, digits, tweets)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and every value's type."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _check(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**values)


def _check(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def read_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML run config as a mapping; `overrides` (dotted keys, e.g. {"optim.epochs": 2}) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p} is not a mapping")
        node[last] = value
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML run config; `overrides` (dotted keys, e.g. {"optim.epochs": 2}) win."""
    return from_dict(TrainConfig, read_yaml(path, overrides))
