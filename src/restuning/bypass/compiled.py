"""Optional `torch.compile` of a bypass task, with a fallback to eager execution.

Compiling needs a working backend (inductor needs a C++ compiler on CPU) and can fail on a graph it does not
support; either failure shows only at the first call (or at a recompilation for a new shape). `CompiledTask`
then warns once, says why, and runs the task eagerly from there on: a run never stops because compiling did.
The task module itself is not replaced, so its parameters, names and checkpoints are the same.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


class CompiledTask:
    """`task(*args, **kwargs)` through `torch.compile(task, **options)`, or eagerly once compiling has failed.

    `failure` holds the reason compiling was given up (None while it works)."""

    def __init__(self, task: nn.Module, **options: Any):
        self.task = task
        self.options = options
        self.failure: str | None = None
        try:
            self._compiled: Any = torch.compile(task, **options)
        except Exception as err:  # an unknown backend or mode fails here already
            self._give_up(err)

    def _give_up(self, err: BaseException) -> None:
        cause = getattr(err, "inner_exception", None) or err  # dynamo wraps a backend's own error
        self.failure = " ".join(f"{type(cause).__name__}: {cause}".split())[:500]
        self._compiled = None
        warnings.warn(f"torch.compile of the bypass task failed ({self.failure}); running it eagerly", RuntimeWarning,
                      stacklevel=3)

    @property
    def compiled(self) -> bool:
        """True while calls go through the compiled task."""
        return self._compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as err:  # a backend failure; an error of the task itself recurs eagerly below
                self._give_up(err)
        return self.task(*args, **kwargs)
