"""When a run logs, evaluates and checkpoints (`restuning.train.cadence`): the same rule for every run."""

from __future__ import annotations

import pytest

from restuning import ConfigError
from restuning.train.cadence import Cadence, Due


def _schedule(cadence: Cadence, steps_per_epoch: int, total: int) -> dict[int, Due]:
    """What is due at each optimizer step of a run, for the steps where anything is."""
    out = {}
    for step in range(1, total + 1):
        epoch, end = (step - 1) // steps_per_epoch + 1, step % steps_per_epoch == 0
        due = cadence.due(step, epoch, end, step == total)
        if due != Due():
            out[step] = due
    return out


def test_epoch_units_count_epochs_and_act_only_at_epoch_ends():
    cadence = Cadence("epoch", log_every=1, eval_every=2, checkpoint_every=2)
    assert _schedule(cadence, steps_per_epoch=3, total=15) == {
        3: Due(log=True), 6: Due(log=True, evaluate=True, checkpoint=True), 9: Due(log=True),
        12: Due(log=True, evaluate=True, checkpoint=True), 15: Due(log=True, evaluate=True, checkpoint=True)}


def test_step_units_count_optimizer_steps_across_epochs():
    cadence = Cadence("step", log_every=2, eval_every=3, checkpoint_every=4)
    assert _schedule(cadence, steps_per_epoch=5, total=8) == {
        2: Due(log=True), 3: Due(evaluate=True), 4: Due(log=True, checkpoint=True), 6: Due(log=True, evaluate=True),
        8: Due(log=True, evaluate=True, checkpoint=True)}


def test_zero_means_at_the_end_only_for_evaluation_and_never_for_checkpoints():
    assert _schedule(Cadence("step", log_every=5, eval_every=0, checkpoint_every=0), 4, 10) == {
        5: Due(log=True), 10: Due(log=True, evaluate=True)}  # final/ is the run's, not a checkpoint
    assert _schedule(Cadence("epoch", 1, 0, 0), 2, 4) == {2: Due(log=True), 4: Due(log=True, evaluate=True)}


def test_the_last_step_logs_evaluates_and_checkpoints_even_mid_epoch_or_off_period():
    cadence = Cadence("epoch", log_every=3, eval_every=5, checkpoint_every=7)
    assert cadence.due(step=4, epoch=2, end_of_epoch=False, last=True) == Due(True, True, True)
    assert cadence.due(step=4, epoch=2, end_of_epoch=False, last=False) == Due()
    assert Cadence("step", 1, 1, 0).due(9, 1, False, True) == Due(True, True, False)
    assert Due(evaluate=True).record and Due(log=True).record and not Due(checkpoint=True).record


def test_count_is_steps_or_epochs():
    assert Cadence("step").count(step=12, epoch=2) == 12 and Cadence("epoch").count(step=12, epoch=2) == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"unit": "batch"}, "unit: expected one of"), ({"log_every": 0}, "log_every: expected a positive integer"),
    ({"eval_every": -1}, "eval_every: expected 0"), ({"checkpoint_every": -2}, "checkpoint_every: expected 0"),
])
def test_bad_cadences_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Cadence(**kwargs)
