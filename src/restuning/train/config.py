"""`TrainConfig`: one training run as plain data, read from YAML with every key and type checked
before any work starts, the method's options included. Defaults follow paper Table 10 (AdamW, weight
decay 0.05, cosine schedule with warm-up, batch 32)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigBase, from_dict, option, read_yaml
from ..data.sources import TABLE_SUFFIXES, table_columns
from ..errors import ConfigError
from ..precision import BACKBONE_DTYPES

DATA_NAMES = ("mnist", "digits", "tweets", "image_folder", "text_table", "hf")
SHIPPED_SETS = ("mnist", "digits", "tweets")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class DataConfig(ConfigBase):
    """What a classification run trains and evaluates on (`data:` of a run config)."""

    name: str = option("mnist", choices=DATA_NAMES, help="a shipped set (`mnist`, `digits`, `tweets`) or a source of "
                       "your own: `image_folder` (one subfolder of images per class), `text_table` (CSV or JSONL of "
                       "texts and labels), `hf` (a local Hugging Face dataset); a source needs `path`")
    path: str | None = option(None, help="the folder or file of `image_folder`, `text_table` and `hf`")
    text_column: str = option("text", help="the texts' column of a `text_table` or `hf` table")
    label_column: str = option("label", help="the labels' column (names or integers) of a `text_table` or `hf` table")
    shots: int | None = option(None, ge=1, help="k examples per class for training (few-shot protocol); null: "
                               "`train_size` examples")
    train_size: int | None = option(None, ge=1, help="training examples (e.g. 1000 for VTAB-1k style); null: all "
                                    "those not held out for testing")
    validation: bool = option(False, help="tune on a VTAB-1k-style split: train on 80% of the training examples and "
                              "evaluate on the other 20% instead of the test split; then set it false to train on "
                              "all of them")
    test_size: int = option(1000, ge=1, help="held-out examples for evaluation")
    eval_sets: list[str] = option(default_factory=list, choices=SHIPPED_SETS, help="extra shipped sets to evaluate "
                                  "on, e.g. `[digits]` (domain generalisation)")
    image_size: int = option(56, ge=1, help="images are resized to this square")
    augment: bool = option(False, help="RandomResizedCrop and a horizontal flip on training images")
    max_length: int = option(32, ge=1, help="tokens per text (longer texts are truncated)")


@dataclass
class OptimConfig(ConfigBase):
    """How a classification run optimizes (`optim:`): paper Table 10's AdamW with warm-up then cosine decay."""

    lr: float = option(1e-3, gt=0, help="AdamW's peak learning rate")
    weight_decay: float = option(0.05, ge=0, help="AdamW's weight decay")
    epochs: int = option(100, ge=1, help="passes over the training examples")
    warmup_epochs: float = option(10, ge=0, help="epochs of linear warm-up before the cosine decay (may be a "
                                  "fraction)")
    batch_size: int = option(32, ge=1, help="examples per batch")
    grad_accum: int = option(1, ge=1, help="batches per optimizer step (gradient accumulation)")
    mixed_precision: str = option("no", choices=PRECISIONS, help="autocast: `no`, `bf16` or `fp16`")
    max_grad_norm: float | None = option(None, gt=0, help="clip the gradients' total norm to this; null: no "
                                         "clipping")


@dataclass
class MethodConfig(ConfigBase):
    """The training method (`method:`), one of the registered methods; its options are checked against the
    method's options when the run config loads (`restuning config` lists every method's)."""

    name: str = option("restuning", help="a registered method (listed under Methods)")
    config: dict[str, Any] = option(default_factory=dict, help="the method's options (listed under Methods)")


@dataclass
class TrainConfig(ConfigBase):
    """One classification run (`restuning train --config`). Each field's meaning is its `help` (`restuning
    config` prints them all, as does docs/configuration.md)."""

    backbone: str = option("dinov2-small", help="a shipped asset (`all-MiniLM-L6-v2`, `dinov2-small`, "
                           "`efficientnet-lite0`), a Hugging Face id, or a local model folder")
    method: MethodConfig = option(default_factory=MethodConfig, help="the training method and its options")
    backbone_dtype: str = option("float32", choices=BACKBONE_DTYPES, help="how the frozen backbone is held: "
                                 "`float32`, `bfloat16`, or `int8` (its linear and convolution weights int8 "
                                 "weight-only, through torchao; it computes in bfloat16); what trains and its "
                                 "optimizer stay float32 (QLoRA-style), and checkpoints are the same; for methods that "
                                 "train none of the backbone's own weights (`restuning config` marks them)")
    data: DataConfig = option(default_factory=DataConfig, help="what the run trains and evaluates on")
    optim: OptimConfig = option(default_factory=OptimConfig, help="the optimizer and its schedule")
    seed: int = option(0, help="seeds the data split, the initialisation and the batch order")
    output_dir: str = option("runs/run", help="metrics.jsonl, checkpoints and the final tuned weights (`final/`) go "
                             "here; a run started again resumes there if its config is the same")
    unit: str = option("epoch", choices=("epoch", "step"), help="what `log_every`, `eval_every` and "
                       "`checkpoint_every` count: `epoch`, or `step` (optimizer steps); records and checkpoints of "
                       "`epoch` runs come at epoch ends")
    log_every: int = option(1, ge=1, help="units between metrics.jsonl records of the training loss")
    eval_every: int = option(1, ge=0, help="units between evaluations; 0: at the end only (the last unit always "
                             "evaluates)")
    checkpoint_every: int = option(1, ge=0, help="units between resumable checkpoints (`checkpoints/`; a run that "
                                   "checkpoints also does so at its end); 0: none")
    feature_cache: bool = option(True, help="train methods that never back-propagate into the backbone (bypass, "
                                 "side_tuning, lst) from backbone features computed once, when the inputs are not "
                                 "augmented; false runs the backbone at every step (the same results; less memory, "
                                 "more time)")
    feature_cache_dir: str | None = option(None, help="keep that feature cache on disk in this folder (sharded, "
                                           "memory-mapped safetensors, written atomically and resumed if a caching "
                                           "pass is killed; reused by later runs on the same backbone, taps and "
                                           "inputs), so features larger than memory train from disk; null: in "
                                           "memory")

    def validate(self) -> None:
        from ..methods import get_method  # the registry sits above the run config's module

        method = get_method(self.method.name, "classification")
        method.read_options(self.method.config)
        check_backbone_dtype(self.backbone_dtype, method, "classification")
        if self.data.name in ("image_folder", "text_table", "hf") and not self.data.path:
            raise ConfigError(f"data.path: data.name {self.data.name!r} needs a path")


def check_backbone_dtype(dtype: str, method: Any, task: str) -> None:
    """A low-precision backbone is for methods that train none of its own weights (`Method.low_precision`)."""
    if dtype != "float32" and not method.low_precision:
        from ..methods.registry import METHODS

        able = sorted(n for n, m in METHODS.items() if m.low_precision and task in m.tasks)
        why = "it trains the backbone's own weights" if method.trains_backbone else "it trains inside the backbone"
        raise ConfigError(f"backbone_dtype: {dtype} holds the frozen backbone in low precision, but method "
                          f"{method.name!r} does not support it ({why}); use float32, or one of {able}")


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
    "check_backbone_dtype", "check_data_files", "DataConfig", "from_dict", "load_config", "MethodConfig",
    "OptimConfig", "read_yaml", "TrainConfig",
]
