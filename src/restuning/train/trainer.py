"""Image and text classification on a frozen backbone: the data, the model for each method, the
cross-entropy loss, top-1 accuracy and the feature cache for the bypass, run by the shared
`TrainingLoop`."""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bypass import FeatureCache
from ..data import LabelledData, few_shot, random_resized_crop
from ..data.shipped import SHIPPED
from ..data.sources import hf_dataset, image_folder, text_table
from ..data.splits import split_indices, vtab_split
from ..data.transforms import resize
from ..errors import ConfigError
from ..methods import get_method, save_model
from .backbones import Backbone, load_backbone
from .config import TrainConfig, check_data_files
from .loop import CHECKPOINTS, FINAL, METRICS, LoopSettings, TrainingLoop

RUN_CONFIG = "train_config.json"  # in final/, beside the checkpoint
CLASSES = "classes.json"

__all__ = [
    "accuracy", "CHECKPOINTS", "CLASSES", "FINAL", "load_data", "METRICS", "RUN_CONFIG", "RunData", "train", "Trainer",
]


@dataclass
class RunData:
    train: LabelledData
    test: LabelledData
    extra: dict[str, LabelledData]


def load_data(config: TrainConfig, backbone: Backbone) -> RunData:
    """Deterministic for the seed: a held-out test split, then k shots per class or `train_size`."""
    d = config.data
    if d.name in SHIPPED:
        full = SHIPPED[d.name]()
    elif d.name == "image_folder":
        full = image_folder(d.path, d.image_size)
    elif d.name == "text_table":
        full = text_table(d.path, d.text_column, d.label_column)
    else:
        full = hf_dataset(d.path, d.text_column, d.label_column)
    if d.augment and full.kind == "text":
        raise ConfigError("data.augment: RandomResizedCrop and flips are for images; this data holds texts")
    if full.kind != backbone.kind:
        raise ConfigError(
            f"data.name: {d.name!r} holds {full.kind}s, backbone {config.backbone!r} takes {backbone.kind}s")
    pool, test = split_indices(len(full), min(d.test_size, len(full) // 2), config.seed)
    train = full.subset(pool)
    if d.shots is not None:
        train = train.subset(few_shot(train.labels, d.shots, config.seed))
    elif d.train_size is not None and d.train_size < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
                             [: d.train_size].sort().values)
    extra = {name: SHIPPED[name]() for name in d.eval_sets}
    if d.validation:  # VTAB-1k: 800 / 200 of 1000
        tune, val = vtab_split(len(train), config.seed, train=round(0.8 * len(train)),
                               val=len(train) - round(0.8 * len(train)))
        return RunData(train.subset(tune), train.subset(val), extra)
    return RunData(train, full.subset(test), extra)


class Trainer(TrainingLoop):
    """One classification run of `config`: `run()` trains (resuming from the newest checkpoint in
    `output_dir/checkpoints` if there is one), logs, evaluates and checkpoints every `log_every`,
    `eval_every` and `checkpoint_every` `unit`s, and writes `metrics.jsonl` and `final/`."""

    def __init__(self, config: TrainConfig, progress: bool = True, allow_changes: tuple[str, ...] = ()):
        o = config.optim
        method = get_method(config.method.name, "classification")
        self.config, self.method = config, method  # before the loop opens the folder: it checks the config
        super().__init__(LoopSettings(
            output_dir=config.output_dir, seed=config.seed, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
            weight_decay=o.weight_decay, grad_accum=o.grad_accum, mixed_precision=o.mixed_precision,
            schedule="cosine", warmup_epochs=o.warmup_epochs, max_grad_norm=o.max_grad_norm, unit=config.unit,
            log_every=config.log_every, eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
            # Methods that train the backbone's own weights may not reach all of them (DINOv2's mask token).
            find_unused_parameters=method.trains_backbone, allow_changes=tuple(allow_changes)), progress)

    def setup(self) -> None:
        config, method = self.config, self.method
        check_data_files(config)
        self.backbone = load_backbone(config.backbone, config.backbone_dtype)
        # Counted before the method attaches anything (PEFT injects its LoRA weights into the backbone itself).
        self.backbone_params = sum(p.numel() for p in self.backbone.model.parameters())
        self.data = load_data(config, self.backbone)
        torch.manual_seed(config.seed)
        num_classes = len(self.data.train.classes)
        self.model = method.build(self.backbone.model, method.read_options(config.method.config, num_classes),
                                  num_classes)
        self.num_examples = len(self.data.train)
        self.inputs = self._encode(self.data.train, raw=config.data.augment)
        self._eval_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self._cached = None

    # --- data --------------------------------------------------------------------------------
    def _encode(self, data: LabelledData, raw: bool = False) -> dict[str, torch.Tensor]:
        if raw:  # augmented per batch from [0, 1] images
            return {"images": resize(data.inputs, round(self.config.data.image_size * 1.15))}
        return self.backbone.encode(data, self.config.data.image_size, self.config.data.max_length)

    def _batch(self, index: torch.Tensor, epoch: int, batch: int) -> dict[str, torch.Tensor]:
        if "images" in self.inputs:
            g = torch.Generator().manual_seed(hash((self.config.seed, epoch, batch)) % 2**31)
            crops = random_resized_crop(self.inputs["images"][index], self.config.data.image_size, g)
            return {self.backbone.input_name: self.backbone.prepare(crops)}
        return {k: v.index_select(0, index) for k, v in self.inputs.items()}

    def _feature_cache(self):
        if not self.method.reads_frozen_backbone or self.config.data.augment or not self.config.feature_cache:
            return None
        if not getattr(self.unwrapped, "cacheable", True):  # e.g. a bypass that runs its last blocks again
            return None
        self.feature_store = FeatureCache(self.config.feature_cache_dir)  # its `status` says what `get` did
        # A folder has one writer: the main process builds (or resumes) the store, the others then load it.
        with self.accelerator.main_process_first():
            return self.feature_store.get(self.unwrapped, self.inputs, batch_size=self.config.optim.batch_size)

    # --- the loop's hooks -------------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def on_train_start(self) -> None:
        self._cached = self._feature_cache()

    def batch_loss(self, model: nn.Module, index: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        device = self.accelerator.device
        if self._cached is not None:
            features, mask = self._cached.batch(index)  # through the (DDP-)wrapped model, so grads sync
            logits = model(features=[f.to(device) for f in features],
                           attention_mask=None if mask is None else mask.to(device))
        else:
            logits = model(**{k: v.to(device) for k, v in self._batch(index, epoch, batch).items()})
        return nn.functional.cross_entropy(logits.float(), self.data.train.labels[index].to(device))

    def summary(self) -> dict[str, Any]:
        """What `restuning plot` draws: method, trainable parameters, and the process's peak resident
        memory so far (host RSS: it includes data and caches, and earlier runs in the same process)."""
        return {"method": self.config.method.name, "backbone": self.config.backbone, **super().summary(),
                "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 accuracy on the test split and on each extra evaluation set."""
        sets = {"test": self.data.test, **self.data.extra}
        for name, data in sets.items():  # encoded once per run, not at every evaluation
            if name not in self._eval_inputs:
                self._eval_inputs[name] = self._encode(data)
        return {f"{name}_accuracy": accuracy(self.unwrapped, self._eval_inputs[name], data.labels,
                                             self.config.optim.batch_size, self.accelerator.device)
                for name, data in sets.items()}

    def write_final(self, directory: Path) -> None:
        """The method's checkpoint (`restuning.methods.load_model` opens it; so do `ResTuningModel` and the
        bypass models' `from_pretrained` for their runs), the run config and the class names."""
        classes = self.data.train.classes
        save_model(self.unwrapped, self.config.method.name, self.config.method.config, len(classes),
                   self.backbone.model, directory)
        (directory / RUN_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2))
        (directory / CLASSES).write_text(json.dumps(classes))


def accuracy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model(**inputs)` in batches."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
        correct += (model(**batch).argmax(-1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def train(config: TrainConfig, progress: bool = True, allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train `config` and return the last record; `allow_changes`: see `TrainingLoop.run`."""
    return Trainer(config, progress, allow_changes).run()
