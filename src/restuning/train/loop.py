"""The one training loop of every run, classification and text-to-image alike: Hugging Face Accelerate
(devices, processes, mixed precision, accumulation), AdamW on the trainable parameters, a learning-rate
schedule, progress bars, metrics as JSON lines, and checkpoints that resume a killed run exactly.

A kind of run subclasses `TrainingLoop`: it builds `model` and `num_examples` in its `__init__` (after
`super().__init__`, which made the accelerator) and supplies the loss of a batch, its evaluation and what
`final/` holds. `restuning.train.trainer.Trainer` (classification) and
`restuning.diffusion.train.DiffusionTrainer` (text-to-image) are the two.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_dir
from ..config import ConfigError

CHECKPOINT = "checkpoint"
FINAL = "final"
METRICS = "metrics.jsonl"
UNITS = ("epoch", "step")
SCHEDULES = ("cosine", "constant")


@dataclass
class LoopSettings:
    """How the loop trains; each run config maps onto these.

    Args:
        unit: records (metrics.jsonl lines) are counted in epochs (one at each epoch's end) or in optimizer
            steps; `log_every` and `eval_every` count in this unit, `eval_every` 0 evaluating at the end only.
            The last unit of a run always logs, evaluates and adds the run's summary.
        schedule: `cosine` (linear warmup over `warmup_epochs`, then cosine decay to 0) or `constant`.
        max_steps: optimizer steps; ends the run before `epochs` do.
        checkpoint_every: optimizer steps between resumable checkpoints (0: none); runs counted in epochs
            also checkpoint at each epoch's end, and any run that checkpoints does so at its end.
        find_unused_parameters: for DDP, when the loss may not reach every trainable parameter.
    """

    output_dir: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    grad_accum: int = 1
    mixed_precision: str = "no"
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    max_steps: int | None = None
    max_grad_norm: float | None = None
    unit: str = "epoch"
    log_every: int = 1
    eval_every: int = 1
    checkpoint_every: int = 0
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"unit: expected one of {UNITS}, got {self.unit!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class Position:
    """Where a run is: `batch` batches into `epoch` (0-based), after `steps` optimizer steps; `losses` of the
    batches since the last record with a training loss; `record`, the last record written."""

    epoch: int = 0
    batch: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch_number(self) -> int:
        """1-based: the epoch under way, or the one just finished."""
        return self.epoch if self.batch == 0 else self.epoch + 1


class TrainingLoop:
    """`run()` trains (resuming from `output_dir/checkpoint` if there is one), writes `metrics.jsonl`,
    checkpoints, and `final/`. A record holds `epoch` (1-based) and `step` (optimizer steps so far), then
    as due `train_loss` (mean over the batches since the last), `lr`, `train_seconds` and `step_seconds`
    (per training batch: forward, backward and, at accumulation boundaries, the optimizer step), the
    evaluation's metrics, and on the last the summary."""

    model: nn.Module
    num_examples: int

    def __init__(self, settings: LoopSettings, progress: bool = True):
        self.settings, self.progress = settings, progress
        self.out = Path(settings.output_dir)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, Accelerate runs torchrun's CPU processes apart
            mixed_precision=settings.mixed_precision, gradient_accumulation_steps=settings.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), kwargs_handlers=[ddp],
        )
        set_seed(settings.seed)

    # --- what each kind of run supplies ------------------------------------------------------------
    def batch_loss(self, model: nn.Module, index: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """The scalar loss of the training examples `index` (B,), with `model` the prepared (possibly
        DDP-wrapped) model; runs under `accumulate` and `autocast`."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Added to the last record: what the run was (method, trainable parameters, peak memory)."""
        return {"trainable_params": sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)}

    def write_final(self, directory: Path) -> None:
        """Fill `final/` (written to a temporary folder, then renamed)."""
        save_file(self.trainable(), str(directory / "trainable.safetensors"))

    def on_train_start(self) -> None:
        """Called after `prepare`, before the first batch of this process (fresh or resumed)."""

    def start_record(self) -> dict[str, Any] | None:
        """Logged as unit 0 before a fresh run's first step (not on resume)."""
        return None

    def run_state(self) -> dict[str, Any]:
        """JSON-able state of the run kept in checkpoints beside the loop's own."""
        return {}

    def load_run_state(self, state: dict[str, Any]) -> None:
        pass

    # --- the loop -----------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def run(self, stop_after_batches: int | None = None) -> dict[str, Any]:
        """Train; the last record. `stop_after_batches` stops early as a kill would (for tests)."""
        s, acc = self.settings, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the method left nothing trainable")
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        loader = torch.utils.data.DataLoader(torch.arange(self.num_examples), batch_size=s.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(s.seed))
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        per_epoch = math.ceil(len(loader) / s.grad_accum)  # Accelerate steps at each epoch's last batch
        total = min(s.max_steps or per_epoch * s.epochs, per_epoch * s.epochs)
        scheduler = acc.prepare(self._schedule(optimizer, total, per_epoch))
        at = self._resume(optimizer, scheduler)
        if at is not None and at.steps >= total and (self.out / FINAL).is_dir():
            return at.record  # finished: nothing to train or write again
        if at is None:  # a fresh start: records of an earlier attempt that never checkpointed go
            at = Position()
            self._keep_records_until(-1, {})
            if start := self.start_record():
                self._log({s.unit: 0, **start})
        self.on_train_start()
        bar = tqdm(total=total, initial=at.steps, desc="training", disable=not (self.progress and acc.is_main_process))
        done, timed, began = 0, 0, time.perf_counter()
        for epoch in range(at.epoch, s.epochs):
            if at.steps >= total:
                break
            model.train()
            loader.set_epoch(epoch)
            first = at.batch if epoch == at.epoch else 0
            for batch, index in enumerate(acc.skip_first_batches(loader, first) if first else loader, start=first):
                with acc.accumulate(model), acc.autocast():
                    loss = self.batch_loss(model, index.cpu(), epoch, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and s.max_grad_norm is not None:
                        acc.clip_grad_norm_(params, s.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                at.losses.append(loss.item())
                done, timed = done + 1, timed + 1
                if acc.sync_gradients:  # only between optimizer steps, so accumulation restarts alike
                    at.steps += 1
                    at.epoch, at.batch = epoch, batch + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", epoch=epoch + 1)
                    end_of_epoch = at.batch == len(loader)
                    if end_of_epoch:
                        at.epoch, at.batch = epoch + 1, 0
                    last = at.steps >= total
                    unit = at.steps if s.unit == "step" else at.epoch_number
                    record = {}
                    if s.unit == "step" or end_of_epoch or last:
                        record = self._record(unit, at, scheduler, time.perf_counter() - began, timed, last)
                        model.train()  # evaluation switched it to eval mode
                    if "train_loss" in record:
                        at.losses = []
                    every = s.checkpoint_every and at.steps % s.checkpoint_every == 0
                    if every or (s.unit == "epoch" and end_of_epoch) or (last and s.checkpoint_every):
                        self._save_checkpoint(optimizer, scheduler, at, record)  # then log: never twice
                    if record:
                        self._log(record)
                        at.record = record
                    if "train_loss" in record:  # timing restarts after evaluation and checkpoint writes
                        timed, began = 0, time.perf_counter()
                    if last:
                        break
                if stop_after_batches is not None and done >= stop_after_batches:
                    bar.close()
                    return {"stopped": True}
        bar.close()
        self._save_final()
        return at.record

    def _schedule(self, optimizer: torch.optim.Optimizer, total: int, per_epoch: int):
        from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

        if self.settings.schedule == "constant":
            return get_constant_schedule(optimizer)
        n = self.accelerator.num_processes  # a prepared scheduler steps once per process per optimizer step
        warmup = round(per_epoch * n * self.settings.warmup_epochs)
        return get_cosine_schedule_with_warmup(optimizer, min(warmup, total * n - 1), total * n)

    def _record(self, unit: int, at: Position, scheduler, seconds: float, timed: int, last: bool) -> dict[str, Any]:
        """The metrics due at `unit`: training loss every `log_every`, evaluation every `eval_every`, and
        everything (with the summary) at the last."""
        s = self.settings
        record: dict[str, Any] = {}
        if (last or unit % s.log_every == 0) and at.losses:
            record.update(train_loss=sum(at.losses) / len(at.losses), lr=scheduler.get_last_lr()[0],
                          train_seconds=seconds, step_seconds=seconds / max(timed, 1))
        if last or (s.eval_every and unit % s.eval_every == 0):
            record.update(self.evaluate())
        if last:
            record.update(self.summary())
        if not record:
            return record
        return {"epoch": at.epoch_number, "step": at.steps, **record}

    # --- files --------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name, on the CPU."""
        return {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, optimizer, scheduler, at: Position, record: dict[str, Any]) -> None:
        """Trainable weights (safetensors), optimizer, scheduler, position and RNG (tensors only), atomically."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {"epoch": at.epoch, "batch": at.batch, "optimizer_steps": at.steps,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "losses": torch.tensor(at.losses, dtype=torch.float64),
                 "record": json.dumps(record or at.record), "run_state": json.dumps(self.run_state())}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        trainable = self.trainable()

        def write(d: Path) -> None:
            save_file(trainable, str(d / "trainable.safetensors"))
            torch.save(state, d / "state.pt")

        atomic_write_dir(self.out / CHECKPOINT, write)

    def _resume(self, optimizer, scheduler) -> Position | None:
        """The checkpoint's position, with weights, optimizer, scheduler and RNG restored; None if none.
        metrics.jsonl keeps the records up to the checkpoint (those after it are written again)."""
        directory = self.out / CHECKPOINT
        if not (directory / "state.pt").is_file():
            return None
        try:
            state = torch.load(directory / "state.pt", weights_only=True)  # tensors and numbers only, no code
            tensors = load_file(str(directory / "trainable.safetensors"))
        except Exception as err:  # unpickling, safetensors and OS errors alike
            # The cause stays chained; torch's own text advises weights_only=False, which this must not do.
            raise ConfigError(f"{directory}: the checkpoint cannot be read ({type(err).__name__}; damaged or not "
                              f"restuning's); remove it to start the run over") from err
        missing = sorted({"epoch", "batch", "optimizer_steps", "run_state"} - set(state))
        if missing:
            raise ConfigError(f"{directory}: a checkpoint from an older restuning (no {missing}); start this run in "
                              f"a new output_dir")
        params = dict(self.unwrapped.named_parameters())
        mismatch = sorted(set(tensors) ^ {n for n, p in params.items() if p.requires_grad})
        if mismatch:
            raise ConfigError(f"{directory}: the checkpoint does not fit this run's method ({mismatch[:4]} ...)")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.load_run_state(json.loads(state["run_state"]))
        at = Position(state["epoch"], state["batch"], state["optimizer_steps"], state["losses"].tolist(),
                      json.loads(state["record"]) or {})
        self._keep_records_until(at.steps if self.settings.unit == "step" else at.epoch, at.record)
        return at

    def _keep_records_until(self, unit: int, record: dict[str, Any]) -> None:
        """Drop the records after `unit` (a killed run's, to be written again); add `record` if the kill
        came between saving it and logging it."""
        if not self.accelerator.is_main_process:
            return
        key, path = self.settings.unit, self.out / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if _unit_of(line, key) <= unit]  # a line cut short by a kill goes too
        if record and record[key] not in {_unit_of(line, key) for line in kept}:
            kept.append(json.dumps(record))
        if kept != lines:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    def _save_final(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_dir(self.out / FINAL, self.write_final)


def _unit_of(line: str, key: str) -> float:
    """A metrics.jsonl line's epoch or step; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)[key]
    except (ValueError, KeyError, TypeError):
        return math.inf
