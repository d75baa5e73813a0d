"""When a run logs, evaluates and checkpoints: one small pure rule, the same for every kind of run.

`unit` says what `log_every`, `eval_every` and `checkpoint_every` count: epochs (something is due only at
an epoch's end) or optimizer steps. `eval_every` 0 evaluates at the run's end only; `checkpoint_every` 0
keeps no resumable checkpoints. The run's last step always logs, evaluates and, if the run checkpoints at
all, checkpoints, so that a finished run's last checkpoint is its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

UNITS = ("epoch", "step")


@dataclass(frozen=True)
class Due:
    """What is due after an optimizer step: a training-loss record, an evaluation, a checkpoint."""

    log: bool = False
    evaluate: bool = False
    checkpoint: bool = False

    @property
    def record(self) -> bool:
        """Whether a metrics.jsonl record is written."""
        return self.log or self.evaluate


@dataclass(frozen=True)
class Cadence:
    """Args:
        unit: `epoch` or `step`: what the three counts below count.
        log_every: units between records with the training loss (at least 1).
        eval_every: units between evaluations; 0: at the end only.
        checkpoint_every: units between resumable checkpoints; 0: none.
    """

    unit: str = "epoch"
    log_every: int = 1
    eval_every: int = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"unit: expected one of {UNITS}, got {self.unit!r}")
        if self.log_every < 1:
            raise ConfigError(f"log_every: expected a positive integer, got {self.log_every!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: expected 0 (at the end only) or more, got {self.eval_every!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected 0 (none) or more, got {self.checkpoint_every!r}")

    def count(self, step: int, epoch: int) -> int:
        """The run's position in units: `step` optimizer steps done, in (1-based) `epoch`."""
        return step if self.unit == "step" else epoch

    def due(self, step: int, epoch: int, end_of_epoch: bool, last: bool) -> Due:
        """What is due after optimizer step `step` (1-based), in 1-based `epoch`, which that step ended if
        `end_of_epoch`; `last`: the run's last step."""
        if last:
            return Due(log=True, evaluate=True, checkpoint=self.checkpoint_every > 0)
        if self.unit == "epoch" and not end_of_epoch:
            return Due()
        n = self.count(step, epoch)
        return Due(log=_every(self.log_every, n), evaluate=_every(self.eval_every, n),
                   checkpoint=_every(self.checkpoint_every, n))


def _every(period: int, n: int) -> bool:
    return period > 0 and n % period == 0
