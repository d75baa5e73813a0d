"""The library's error types: one per kind of failure, all `RestuningError`s, so a caller (the CLI) can
report any of them as a clear message.

- `ConfigError`: a configuration names something that does not exist, or has the wrong type or value.
- `CheckpointError`: a checkpoint is missing, damaged, or does not fit the model it is loaded into.
- `DataError`: a data file, folder or row cannot be read as the data it should be.
- `OpMatchError`: no op, or more than one candidate, where exactly one was expected in a backbone.
- `RunError`: a run folder cannot be used as asked (locked by another process, not writable, holds another
  run, or a finished run that would be overwritten).
- `TrainingError`: training itself failed (a non-finite loss or gradient).
"""

from __future__ import annotations


class RestuningError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(RestuningError, ValueError):
    """A configuration names something that does not exist or has the wrong type or value."""


class CheckpointError(RestuningError, ValueError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


class DataError(RestuningError, ValueError):
    """A data file, folder or row cannot be read as the data it should be."""


class OpMatchError(RestuningError, LookupError):
    """No op, or more than one candidate, where exactly one was expected."""


class RunError(RestuningError, RuntimeError):
    """A run folder cannot be used as asked: locked, not writable, another run's, or finished."""


class TrainingError(RestuningError, RuntimeError):
    """Training failed (for example a non-finite loss or gradient)."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "OpMatchError", "RestuningError", "RunError",
           "TrainingError"]
