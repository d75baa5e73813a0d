"""The one training loop of every run, classification and text-to-image alike: Hugging Face Accelerate
(devices, processes, mixed precision, accumulation), AdamW on the trainable parameters (fused where torch
offers it: `restuning.train.optim`), a learning-rate
schedule, progress bars, metrics as JSON lines, and checkpoints that resume a killed run exactly.

A kind of run subclasses `TrainingLoop`: it sets its config before `super().__init__` (which makes the
accelerator, opens the run folder and checks the config) and builds `model` and `num_examples` in `setup`; it
supplies the loss of a batch, its evaluation and what `final/` holds. `restuning.train.trainer.Trainer`
(classification) and `restuning.diffusion.train.DiffusionTrainer` (text-to-image) are the two. The run
folder's files (lock, saved config, metrics, checkpoints, `final/`) are
`restuning.train.rundir.RunDirectory`'s; when to log, evaluate and checkpoint is
`restuning.train.cadence.Cadence`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import check_tensors
from ..errors import CheckpointError, ConfigError, RunError, TrainingError
from .cadence import UNITS, Cadence, Due
from .optim import adamw
from .rundir import CHECKPOINTS, FINAL, METRICS, RunDirectory

SCHEDULES = ("cosine", "constant")
__all__ = ["CHECKPOINTS", "FINAL", "METRICS", "UNITS", "LoopSettings", "Position", "TrainingLoop"]


@dataclass
class LoopSettings:
    """How the loop trains; each run config maps onto these.

    Args:
        unit, log_every, eval_every, checkpoint_every: the run's `Cadence`: `unit` (`epoch` or `step`) says
            what the three count; records (metrics.jsonl lines) are written only at the end of a unit;
            `eval_every` 0 evaluates at the end only; `checkpoint_every` 0 keeps no resumable checkpoints.
            The last step always logs, evaluates (adding the run's summary) and, if the run checkpoints,
            checkpoints.
        schedule: `cosine` (linear warmup over `warmup_epochs`, then cosine decay to 0) or `constant`.
        max_steps: optimizer steps; ends the run before `epochs` do.
        find_unused_parameters: for DDP, when the loss may not reach every trainable parameter.
        allow_changes: dotted keys of the run config (e.g. `optim.epochs`, or a parent such as `optim`) that
            may differ from the config saved in the run folder when the run is started again.
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
    allow_changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _ = self.cadence  # validates unit and the three counts
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.unit, self.log_every, self.eval_every, self.checkpoint_every)


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
    """`run()` trains (resuming from the newest checkpoint in `output_dir/checkpoints` if there is one),
    writes `metrics.jsonl`, checkpoints, and `final/`. A record holds `epoch` (1-based) and `step` (optimizer
    steps so far), then as due `train_loss` (mean over the batches since the last), `lr`, `train_seconds`
    and `step_seconds` (per training batch: forward, backward and, at accumulation boundaries, the optimizer
    step), the evaluation's metrics, and on the last the summary.

    Constructing it opens the run folder (`RunDirectory`): a folder the run cannot use, one another run
    holds, or one of another config, is refused before the subclass loads its model and data (a subclass
    sets what `run_config()` reads before calling `super().__init__`). The folder stays locked until `run()`
    returns or raises (or `close()`)."""

    model: nn.Module
    num_examples: int
    # Called with (optimizer steps done, steps in all) when training starts and after every optimizer step, on
    # the main process: progress shown elsewhere (`restuning demo` draws the bar of a run in another process).
    on_step: Callable[[int, int], None] | None = None

    def __init__(self, settings: LoopSettings, progress: bool = True):
        self.settings, self.progress = settings, progress
        self.out = Path(settings.output_dir)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, Accelerate runs torchrun's CPU processes apart
            mixed_precision=settings.mixed_precision, gradient_accumulation_steps=settings.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), kwargs_handlers=[ddp],
        )
        self.run_dir = RunDirectory(self.out, main=self.accelerator.is_main_process)
        # A folder of another run is refused here, before the subclass loads its model and data (and again
        # at `run()`, with the changes it allows).
        try:
            self.run_dir.check_config(self.run_config(), settings.allow_changes)
            set_seed(settings.seed)
            self.setup()
        except BaseException:  # a run that cannot start leaves the folder unlocked
            self.close()
            raise

    # --- what each kind of run supplies ------------------------------------------------------------
    def setup(self) -> None:
        """Build `model` and `num_examples` (and load what the run reads): called at the end of `__init__`,
        once the run folder is open and checked."""

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
        """Fill `final/` (a temporary folder, swapped in whole) with the run's model in the library's one
        checkpoint format (`restuning.methods.save_model`) and whatever else the run kind keeps."""
        raise NotImplementedError

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

    def run_config(self) -> dict[str, Any]:
        """The run's config as JSON-able data: saved in the run folder when the run starts, and compared
        with the saved one when it is started again (`output_dir` aside). Default: the loop's settings."""
        return {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in ("output_dir", "allow_changes")}

    # --- the loop -----------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def close(self) -> None:
        """Release the run folder's lock (a loop that will not `run()`)."""
        self.run_dir.release()

    def run(self, stop_after_batches: int | None = None, allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
        """Train; the last record. A finished run (`final/` written) started again with the same config trains
        no more and returns its last record; a folder holding a run of another config is refused with a
        `RunError`, but for the dotted keys in `allow_changes` (and `settings.allow_changes`).
        `stop_after_batches` stops early as a kill would (for tests)."""
        self.run_dir.acquire()
        try:
            return self._run(stop_after_batches, (*self.settings.allow_changes, *allow_changes))
        finally:
            self.run_dir.release()

    def _run(self, stop_after_batches: int | None, allowed: tuple[str, ...]) -> dict[str, Any]:
        s, acc = self.settings, self.accelerator
        acc.wait_for_everyone()  # the main process has checked and tidied the folder
        config = self.run_config()
        changes = self.run_dir.check_config(config, allowed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the method left nothing trainable")
        optimizer = adamw(params, lr=s.lr, weight_decay=s.weight_decay)  # fused where torch has it
        loader = torch.utils.data.DataLoader(torch.arange(self.num_examples), batch_size=s.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(s.seed))
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        per_epoch = math.ceil(len(loader) / s.grad_accum)  # Accelerate steps at each epoch's last batch
        total = min(s.max_steps or per_epoch * s.epochs, per_epoch * s.epochs)
        scheduler = acc.prepare(self._schedule(optimizer, total, per_epoch))
        latest = self.run_dir.latest_checkpoint()
        at = self._resume(latest, optimizer, scheduler) if latest is not None else None
        if self.run_dir.finished and (at is None or at.steps >= total):
            return self._finished(at, total)
        acc.wait_for_everyone()  # every process has read the folder before the main one writes to it
        if acc.is_main_process:
            self.run_dir.save_config(config)
        if changes:
            self._say(f"{self.out}: going on with the allowed config changes "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        if at is None:
            at = Position()
            if acc.is_main_process and self.run_dir.keep_records_until(s.unit, -1, {}):
                self._say(f"{self.out}: no checkpoint to resume from; starting the run over (the earlier "
                          f"attempt's metrics.jsonl records are dropped)")
            if start := self.start_record():
                self._log({s.unit: 0, **start})
        else:
            if acc.is_main_process:  # the newest checkpoint reads well: older ones a kill left can go
                self.run_dir.drop_checkpoints_but(latest)
                self.run_dir.keep_records_until(s.unit, s.cadence.count(at.steps, at.epoch), at.record)
            where = f"at the start of epoch {at.epoch + 1}" if at.batch == 0 else \
                f"in epoch {at.epoch + 1} after batch {at.batch}"
            self._say(f"resuming {self.out} from {latest.relative_to(self.out)}: {where}, after optimizer step "
                      f"{at.steps} of {total}")
        self.on_train_start()
        record = self._train(model, optimizer, scheduler, loader, params, at, total, stop_after_batches)
        if record is None:
            return {"stopped": True}
        self._save_final(at)
        return record

    def _train(self, model, optimizer, scheduler, loader, params, at: Position, total: int,
               stop_after_batches: int | None) -> dict[str, Any] | None:
        """Train from `at` to `total` optimizer steps; the last record, or None if stopped early."""
        s, acc, cadence = self.settings, self.accelerator, self.settings.cadence
        bar = tqdm(total=total, initial=at.steps, desc="training", disable=not (self.progress and acc.is_main_process))
        report = self.on_step if acc.is_main_process else None
        if report is not None:
            report(at.steps, total)
        done, timed, began = 0, 0, time.perf_counter()
        bad: str | None = None  # a non-finite loss since the last optimizer step
        try:
            for epoch in range(at.epoch, s.epochs):
                if at.steps >= total:
                    break
                model.train()
                loader.set_epoch(epoch)
                first = at.batch if epoch == at.epoch else 0
                for batch, index in enumerate(acc.skip_first_batches(loader, first) if first else loader, start=first):
                    with acc.accumulate(model), acc.autocast():
                        loss = self.batch_loss(model, index.cpu(), epoch, batch)
                        value = loss.item()
                        if not math.isfinite(value) and bad is None:
                            bad = f"loss ({value}) at epoch {epoch + 1}, batch {batch + 1}"
                        acc.backward(loss)
                        if acc.sync_gradients:  # before the step, so the weights never take a non-finite one
                            self._check_step(params, bad, at, epoch, batch)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    at.losses.append(value)
                    done, timed = done + 1, timed + 1
                    if acc.sync_gradients:  # only between optimizer steps, so accumulation restarts alike
                        at.steps += 1
                        at.epoch, at.batch = epoch, batch + 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", epoch=epoch + 1)
                        if report is not None:
                            report(at.steps, total)
                        end_of_epoch = at.batch == len(loader)
                        if end_of_epoch:
                            at.epoch, at.batch = epoch + 1, 0
                        last = at.steps >= total
                        due = cadence.due(at.steps, at.epoch_number, end_of_epoch, last)
                        record = {}
                        if due.record:
                            record = self._record(due, at, scheduler, time.perf_counter() - began, timed, last)
                            model.train()  # evaluation switched it to eval mode
                        if "train_loss" in record:
                            at.losses = []
                        if due.checkpoint:
                            self._save_checkpoint(optimizer, scheduler, at, record)  # then log: never twice
                        if record:
                            self._log(record)
                            at.record = record
                        if "train_loss" in record:  # timing restarts after evaluation and checkpoint writes
                            timed, began = 0, time.perf_counter()
                        if last:
                            break
                    if stop_after_batches is not None and done >= stop_after_batches:
                        return None
        finally:
            bar.close()
        return at.record

    def _finished(self, at: Position | None, total: int) -> dict[str, Any]:
        """The last record of a finished run started again (nothing is trained or written)."""
        last = self.run_dir.last_record() or (at.record if at is not None else None) or {}
        steps = at.steps if at is not None else last.get("step", 0)
        if steps < total:
            raise RunError(f"{self.out}: holds a finished run of {steps} optimizer steps; this config asks for "
                           f"{total}, and the run kept no checkpoint to go on from (checkpoint_every 0); train in "
                           f"a new output_dir")
        self._say(f"{self.out}: the run is finished (epoch {last.get('epoch', '?')}, step {last.get('step', '?')}); "
                  f"nothing to train, returning its last record (train in a new output_dir to run it again)")
        return last

    def _check_step(self, params: list[nn.Parameter], bad: str | None, at: Position, epoch: int, batch: int) -> None:
        """Before optimizer step `at.steps + 1`: clip the gradients (`max_grad_norm`), and stop the run with a
        `TrainingError` if a loss since the last step, or the gradients, are not finite. All processes agree:
        the gradients are reduced already, and the loss flags are reduced here."""
        s, acc = self.settings, self.accelerator
        norm = acc.clip_grad_norm_(params, s.max_grad_norm) if s.max_grad_norm is not None else None
        bad_grad = False
        if acc.scaler is None:  # fp16's GradScaler skips the steps of non-finite (scaled) gradients itself
            if norm is None:
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else None
            bad_grad = norm is not None and not bool(torch.isfinite(norm))
        flags = torch.tensor([bad is not None, bad_grad], dtype=torch.float32, device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "sum")
        if not flags.any():
            return
        if bad is not None:
            what = bad
        elif flags[0]:
            what = f"loss on another process in epoch {epoch + 1}, before batch {batch + 1}"
        else:
            what = f"gradient (norm {float(norm)}) at epoch {epoch + 1}, batch {batch + 1}"
        raise TrainingError(self._diverged(f"non-finite {what}, before optimizer step {at.steps + 1}"))

    def _check_weights(self, at: Position) -> None:
        """Refuse to write non-finite trainable weights (a step that overflowed them) to a checkpoint or `final/`."""
        bad = [n for n, p in self.unwrapped.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingError(self._diverged(f"non-finite trainable weights ({', '.join(bad[:3])}"
                                               f"{' ...' if len(bad) > 3 else ''}) after optimizer step {at.steps}, "
                                               f"in epoch {at.epoch_number}"))

    def _diverged(self, what: str) -> str:
        latest = self.run_dir.latest_checkpoint()
        kept = f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint was written"
        return (f"{self.out}: training diverged: {what}. The run stopped; {kept}, and nothing non-finite was written. "
                f"Lower optim.lr, set optim.max_grad_norm, or use bf16 rather than fp16; then start it again "
                f"(with --allow-change for the changed keys to go on from the checkpoint) or in a new output_dir")

    def _schedule(self, optimizer: torch.optim.Optimizer, total: int, per_epoch: int):
        from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

        if self.settings.schedule == "constant":
            return get_constant_schedule(optimizer)
        n = self.accelerator.num_processes  # a prepared scheduler steps once per process per optimizer step
        warmup = round(per_epoch * n * self.settings.warmup_epochs)
        return get_cosine_schedule_with_warmup(optimizer, min(warmup, total * n - 1), total * n)

    def _record(self, due: Due, at: Position, scheduler, seconds: float, timed: int, last: bool) -> dict[str, Any]:
        """The metrics `due`: the training loss, the evaluation, and at the last the summary."""
        record: dict[str, Any] = {}
        if due.log and at.losses:
            record.update(train_loss=sum(at.losses) / len(at.losses), lr=scheduler.get_last_lr()[0],
                          train_seconds=seconds, step_seconds=seconds / max(timed, 1))
        if due.evaluate:
            record.update(self.evaluate())
        if last:
            record.update(self.summary())
        if not record:
            return record
        return {"epoch": at.epoch_number, "step": at.steps, **record}

    # --- files --------------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"restuning: {message}", file=sys.stderr, flush=True)

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.append_record(record)

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name, on the CPU."""
        return {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, optimizer, scheduler, at: Position, record: dict[str, Any]) -> None:
        """Trainable weights (safetensors), optimizer, scheduler, position and RNG (tensors only), committed
        whole (`RunDirectory.save_checkpoint`)."""
        self._check_weights(at)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {"epoch": at.epoch, "batch": at.batch, "optimizer_steps": at.steps,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "losses": torch.tensor(at.losses, dtype=torch.float64),
                 "record": json.dumps(record or at.record), "run_state": json.dumps(self.run_state())}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        self.run_dir.save_checkpoint(at.steps, self.trainable(), state)

    def _resume(self, directory: Path, optimizer, scheduler) -> Position:
        """The checkpoint's position, with weights, optimizer, scheduler and RNG restored (no file changes)."""
        state, tensors = self.run_dir.load_checkpoint(directory)
        missing = sorted({"epoch", "batch", "optimizer_steps", "run_state"} - set(state))
        if missing:
            raise CheckpointError(f"{directory}: a checkpoint from an older restuning (no {missing}); start this "
                                  f"run in a new output_dir")
        params = dict(self.unwrapped.named_parameters())
        check_tensors(tensors, {n: p for n, p in params.items() if p.requires_grad}, directory)  # names, shapes
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self._apply_hyperparameters(optimizer, scheduler)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.load_run_state(json.loads(state["run_state"]))
        return Position(state["epoch"], state["batch"], state["optimizer_steps"], state["losses"].tolist(),
                        json.loads(state["record"]) or {})

    def _apply_hyperparameters(self, optimizer, scheduler) -> None:
        """The settings' lr and weight decay over the checkpoint's (the same, unless a change was allowed):
        the optimizer's state restores its param groups' and the schedule's base rates."""
        inner = getattr(scheduler, "scheduler", scheduler)
        inner.base_lrs = [self.settings.lr] * len(optimizer.param_groups)
        for group, rate in zip(optimizer.param_groups, inner.lr_lambdas, strict=True):
            group.update(initial_lr=self.settings.lr, lr=self.settings.lr * rate(inner.last_epoch),
                         weight_decay=self.settings.weight_decay)
        inner._last_lr = [group["lr"] for group in optimizer.param_groups]

    def _save_final(self, at: Position) -> None:
        self._check_weights(at)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.run_dir.write_final(self.write_final)
