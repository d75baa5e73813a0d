"""The training loop: Hugging Face Accelerate (devices, processes, mixed precision, accumulation),
progress bars, metrics as JSON lines, resumable checkpoints, and the feature cache for the bypass."""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..bypass import FeatureCache
from ..bypass.model import FrozenBackbone, ResTuningBypassModel
from ..checkpoint import atomic_write_dir
from ..config import ConfigError
from ..data import LabelledData, few_shot, random_resized_crop
from ..data.shipped import SHIPPED
from ..data.sources import hf_dataset, image_folder, text_table
from ..data.splits import split_indices, vtab_split
from ..data.transforms import resize
from .backbones import Backbone, load_backbone
from .config import TrainConfig
from .methods import build_classifier

CHECKPOINT = "checkpoint"
FINAL = "final"
METRICS = "metrics.jsonl"


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


class Trainer:
    """One run of `config`. `run()` trains (resuming from `output_dir/checkpoint` if there is one),
    evaluates every `eval_every` epochs, and writes `metrics.jsonl` and `final/`."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.out = Path(config.output_dir)
        # Full fine-tuning and BitFit train parameters the loss may not reach (DINOv2's mask token).
        ddp = DistributedDataParallelKwargs(find_unused_parameters=config.method.name in ("full", "bitfit"))
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, Accelerate runs torchrun's CPU processes apart
            mixed_precision=config.optim.mixed_precision, gradient_accumulation_steps=config.optim.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), kwargs_handlers=[ddp],
        )
        set_seed(config.seed)
        self.backbone = load_backbone(config.backbone)
        self.data = load_data(config, self.backbone)
        torch.manual_seed(config.seed)
        self.model = build_classifier(config.method.name, self.backbone.model, len(self.data.train.classes),
                                      config.method.config)
        self.inputs = self._encode(self.data.train, raw=config.data.augment)
        self._eval_inputs: dict[str, dict[str, torch.Tensor]] = {}

    # --- data --------------------------------------------------------------------------------
    def _encode(self, data: LabelledData, raw: bool = False) -> dict[str, torch.Tensor]:
        if raw:  # augmented per batch from [0, 1] images
            return {"images": resize(data.inputs, round(self.config.data.image_size * 1.15))}
        return self.backbone.encode(data, self.config.data.image_size, self.config.data.max_length)

    def _batch(self, index: torch.Tensor, epoch: int, step: int) -> dict[str, torch.Tensor]:
        if "images" in self.inputs:
            g = torch.Generator().manual_seed(hash((self.config.seed, epoch, step)) % 2**31)
            crops = random_resized_crop(self.inputs["images"][index], self.config.data.image_size, g)
            return {self.backbone.input_name: self.backbone.prepare(crops)}
        return {k: v[index] for k, v in self.inputs.items()}

    # --- training ----------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train and evaluate; `stop_after_steps` stops early as a kill would (for tests)."""
        cfg, acc = self.config, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        loader = torch.utils.data.DataLoader(
            torch.arange(len(self.data.train)), batch_size=cfg.optim.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed))
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        # Sized on this rank's batches; Accelerate steps a prepared scheduler once per process.
        steps = math.ceil(len(loader) / cfg.optim.grad_accum) * cfg.optim.epochs * acc.num_processes
        warmup = round(steps * cfg.optim.warmup_epochs / cfg.optim.epochs)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = acc.prepare(get_cosine_schedule_with_warmup(optimizer, min(warmup, steps - 1), steps))
        # A finished run resumed returns its last record.
        start_epoch, start_step, losses, result = self._resume(optimizer, scheduler)
        cached = self._feature_cache()
        labels = self.data.train.labels
        done = 0
        for epoch in range(start_epoch, cfg.optim.epochs):
            model.train()
            loader.set_epoch(epoch)
            batches = acc.skip_first_batches(loader, start_step) if epoch == start_epoch else loader
            first = start_step if epoch == start_epoch else 0
            bar = tqdm(batches, total=len(loader), initial=first, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                       disable=not (self.progress and acc.is_main_process))
            began = time.perf_counter()
            losses = losses if epoch == start_epoch else []  # a resumed epoch keeps the losses before the kill
            for step, index in enumerate(bar, start=first):
                index = index.cpu()
                with acc.accumulate(model), acc.autocast():
                    if cached is not None:
                        features, mask = cached.batch(index)  # through the (DDP-)wrapped model, so grads sync
                        logits = model(features=[f.to(acc.device) for f in features],
                                       attention_mask=None if mask is None else mask.to(acc.device))
                    else:
                        logits = model(**{k: v.to(acc.device) for k, v in self._batch(index, epoch, step).items()})
                    loss = nn.functional.cross_entropy(logits.float(), labels[index].to(acc.device))
                    acc.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                done += 1
                # Only between optimizer steps, so accumulation restarts on the same boundaries.
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and acc.sync_gradients:
                    self._save_checkpoint(optimizer, scheduler, epoch, step + 1, losses)
                if stop_after_steps is not None and done >= stop_after_steps:
                    return {"stopped": True}
            start_step = 0
            seconds = time.perf_counter() - began
            record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1),
                      "lr": scheduler.get_last_lr()[0], "epoch_seconds": seconds,
                      "step_seconds": seconds / max(len(loader) - first, 1)}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
                record.update(self.evaluate())
            if epoch + 1 == cfg.optim.epochs:
                record.update(self.summary())
            self._save_checkpoint(optimizer, scheduler, epoch + 1, 0, [], record)  # then log: never twice
            self._log(record)
            result = record
        self._save_final()
        return result

    def _feature_cache(self):
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not isinstance(unwrapped, FrozenBackbone) or self.config.data.augment or not self.config.feature_cache:
            return None
        return FeatureCache().get(unwrapped, self.inputs, batch_size=self.config.optim.batch_size)

    def summary(self) -> dict[str, Any]:
        """What `restuning plot` draws: method, trainable parameters, and the process's peak resident
        memory so far (host RSS: it includes data and caches, and earlier runs in the same process)."""
        model = self.accelerator.unwrap_model(self.model)
        return {"method": self.config.method.name, "backbone": self.config.backbone,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 accuracy on the test split and on each extra evaluation set."""
        sets = {"test": self.data.test, **self.data.extra}
        for name, data in sets.items():  # encoded once per run, not at every evaluation
            if name not in self._eval_inputs:
                self._eval_inputs[name] = self._encode(data)
        return {f"{name}_accuracy": accuracy(self.accelerator.unwrap_model(self.model), self._eval_inputs[name],
                                             data.labels, self.config.optim.batch_size, self.accelerator.device)
                for name, data in sets.items()}

    # --- files -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trainable(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, optimizer, scheduler, epoch: int, step: int, losses: list[float],
                         record: dict[str, Any] | None = None) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "losses": torch.tensor(losses, dtype=torch.float64), "record": json.dumps(record)}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        trainable = self._trainable()

        def write(d: Path) -> None:
            save_file(trainable, str(d / "trainable.safetensors"))
            torch.save(state, d / "state.pt")

        atomic_write_dir(self.out / CHECKPOINT, write)

    def _resume(self, optimizer, scheduler) -> tuple[int, int, list[float], dict[str, Any]]:
        """(epoch, step, losses so far in that epoch, the last epoch's record) of the checkpoint."""
        directory = self.out / CHECKPOINT
        if not (directory / "state.pt").is_file():
            return 0, 0, [], {}
        state = torch.load(directory / "state.pt", weights_only=True)  # tensors and numbers only, no code
        tensors = load_file(str(directory / "trainable.safetensors"))
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in tensors:
                    p.copy_(tensors[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        record = json.loads(state["record"])
        if record is not None and record["epoch"] not in self._logged_epochs():  # killed before logging it
            self._log(record)
        return state["epoch"], state["step"], state["losses"].tolist(), record or {}

    def _logged_epochs(self) -> set[int]:
        path = self.out / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        return {json.loads(line)["epoch"] for line in lines if line.strip()}

    def _save_final(self) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)

        def write(d: Path) -> None:
            save_file(self._trainable(), str(d / "trainable.safetensors"))
            (d / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            (d / "classes.json").write_text(json.dumps(self.data.train.classes))
            if isinstance(model, ResTuningBypassModel):
                model.save_pretrained(d / "task")  # loadable alone, or as one task of a MultiTaskBypass

        atomic_write_dir(self.out / FINAL, write)


def accuracy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model(**inputs)` in batches."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
        correct += (model(**batch).argmax(-1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def train(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train `config` and return the last epoch's metrics."""
    return Trainer(config, progress).run()
