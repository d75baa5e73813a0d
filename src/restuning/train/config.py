"""`TrainConfig`: one training run as plain data, read from YAML with every key and type checked
before any work starts, the method's options included. Defaults follow paper Table 10 (AdamW, weight
decay 0.05, cosine schedule with warm-up, batch 32)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigBase, from_dict, option, read_yaml
from ..data.sources import TABLE_SUFFIXES, table_columns
from ..errors import ConfigError

DATA_NAMES = ("mnist", "digits", "tweets", "image_folder", "text_table", "hf")
SHIPPED_SETS = ("mnist", "digits", "tweets")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class DataConfig(ConfigBase):
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

    name: str = option("mnist", choices=DATA_NAMES)
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    shots: int | None = option(None, ge=1)
    train_size: int | None = option(None, ge=1)
    validation: bool = False
    test_size: int = option(1000, ge=1)
    eval_sets: list[str] = option(default_factory=list, choices=SHIPPED_SETS)
    image_size: int = option(56, ge=1)
    augment: bool = False
    max_length: int = option(32, ge=1)


@dataclass
class OptimConfig(ConfigBase):
    """AdamW at `lr` with `weight_decay`, a linear warm-up over `warmup_epochs` then cosine decay;
    `grad_accum` batches per optimizer step; `mixed_precision`: no | bf16 | fp16 (autocast); `max_grad_norm`
    clips the gradients' total norm (None: no clipping)."""

    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.05, ge=0)
    epochs: int = option(100, ge=1)
    warmup_epochs: float = option(10, ge=0)
    batch_size: int = option(32, ge=1)
    grad_accum: int = option(1, ge=1)
    mixed_precision: str = option("no", choices=PRECISIONS)
    max_grad_norm: float | None = option(None, gt=0)


@dataclass
class MethodConfig(ConfigBase):
    """`name`: a registered method (`restuning.methods.names()`); `config`: the method's options, checked
    against the method's options dataclass when the run config loads.

    - restuning: the fields of `ResTuningConfig`; bypass: of `BypassConfig`; side_tuning: of
      `SideTuningConfig`; lst: of `LSTConfig`; peft_lora: `peft.LoraConfig` fields.
    - adapter, prefix, vpt_deep, lora, ssf, adaptformer, mam: Res-Tuner presets
      (`restuning.baselines.PRESETS`), with `ResTuningConfig` fields merged over them.
    - vpt_shallow: `tokens` (default 10). linear, full, bitfit: no options.
    """

    name: str = "restuning"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig(ConfigBase):
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
    unit: str = option("epoch", choices=("epoch", "step"))
    log_every: int = option(1, ge=1)
    eval_every: int = option(1, ge=0)
    checkpoint_every: int = option(1, ge=0)
    feature_cache: bool = True

    def validate(self) -> None:
        from ..methods import get_method  # the registry sits above the run config's module

        get_method(self.method.name, "classification").read_options(self.method.config)
        if self.data.name in ("image_folder", "text_table", "hf") and not self.data.path:
            raise ConfigError(f"data.path: data.name {self.data.name!r} needs a path")


def check_data_files(config: TrainConfig) -> None:
    """What a new run reads exists (checked when a config file loads and when a run starts, before the
    backbone loads; not when a finished run's saved config is read, whose data may since have moved)."""
    d = config.data
    if d.path is None:
        return
    path = Path(d.path)
    if not path.exists():
        raise ConfigError(f"data.path: {d.path!r} does not exist")
    if d.name == "text_table" or (d.name == "hf" and path.is_file() and path.suffix.lower() in TABLE_SUFFIXES):
        columns = table_columns(path)  # the header only; a DataError if it cannot be read
        for key in ("text_column", "label_column"):
            if getattr(d, key) not in columns:
                raise ConfigError(f"data.{key}: {d.path} has no column {getattr(d, key)!r}; its columns are {columns}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML run config; `overrides` (dotted keys, e.g. {"optim.epochs": 2}) win."""
    config = from_dict(TrainConfig, read_yaml(path, overrides))
    check_data_files(config)
    return config


__all__ = [
    "check_data_files", "DataConfig", "from_dict", "load_config", "MethodConfig", "OptimConfig", "read_yaml",
    "TrainConfig",
]
