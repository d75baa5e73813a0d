"""A run folder (`output_dir`) and everything a run keeps in it, so that no kill, second process or
changed config corrupts it:

```
output_dir/
  run_config.json            the run's config, saved when it starts; a restart must match it
  metrics.jsonl              one strict-JSON record per line
  checkpoints/step-00000012/ the newest complete resumable checkpoint (trainable.safetensors, state.pt)
  final/                     what the finished run leaves (written by the run kind)
  run.lock                   while a run is active: flock'ed, holding its pid
```

A checkpoint is written into `checkpoints/.step-N.tmp-*`, fsynced, and renamed to `step-N`: that rename
is the commit, so at every moment the newest `step-*` folder is a complete checkpoint; older ones are
removed after it (renamed to `.trash-*` first, so a half-deleted folder never keeps a `step-*` name).
`final/` is replaced with `checkpoint.atomic_write_dir`. Whatever a kill leaves (temporary folders, a
`.final.old`) is recovered or removed when the next run opens the folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import (
    apply_umask,
    atomic_write,
    atomic_write_dir,
    clean_temporaries,
    fsync,
    fsync_tree,
    make_temporary_dir,
    recover_dir,
    remove,
)
from ..errors import CheckpointError, ConfigError, RunError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
LOCK = "run.lock"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
LEGACY_CHECKPOINT = "checkpoint"  # restuning before the run folder: one checkpoint/ swapped in place
_STEP = re.compile(r"step-(\d+)")
_OWNED = {CHECKPOINTS: "the resumable checkpoints folder", FINAL: "the finished run's folder",
          METRICS: "the metrics file", RUN_CONFIG: "the saved run config", LOCK: "the lock file"}
_FOLDERS = (CHECKPOINTS, FINAL)
MISSING = "<absent>"


class RunDirectory:
    """The run folder at `path`. On the main process (`main`) opening it checks that it can be used (a
    writable folder, every owned name of the right kind), takes its lock and tidies what a killed run
    left; other processes of a DDP run only read it. A `RunError` says what is wrong and what to do."""

    def __init__(self, path: str | Path, main: bool = True):
        self.path, self.main = Path(path), main
        self._lock: int | None = None
        if main:
            self._check()
            self.acquire()
            self._tidy()

    # --- using the folder -------------------------------------------------------------------------
    def _check(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunError(f"{path}: output_dir is a file, not a folder; move it away or choose another output_dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(f"{path}: cannot create the run folder ({err.strerror}); choose an output_dir you can "
                           f"write to") from err
        if not _writable(path):
            raise RunError(f"{path}: the run folder is not writable; make it writable (chmod u+w) or choose "
                           f"another output_dir")
        for name, what in _OWNED.items():
            owned = path / name
            if not owned.exists() and not owned.is_symlink():
                continue
            folder = name in _FOLDERS
            if (owned.is_dir() if folder else owned.is_file()) is False:
                kind = "a folder" if owned.is_dir() else "a file" if owned.is_file() else "neither file nor folder"
                raise RunError(f"{owned}: restuning keeps {what} here as {'a folder' if folder else 'a file'}, but "
                               f"this is {kind}; move it away or choose another output_dir")
            if not _writable(owned):
                raise RunError(f"{owned}: {what} is not writable; make it writable (chmod -R u+w) or choose "
                               f"another output_dir")

    def acquire(self) -> None:
        """Lock the folder for this process (main process only; a no-op if held): another run on it fails
        at once with a `RunError` naming its pid. Released by `release`, or by the OS when the process ends."""
        if not self.main or self._lock is not None or fcntl is None:
            return
        path = self.path / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise RunError(f"{path}: cannot create the lock file ({err.strerror}); make {self.path} writable "
                               f"or choose another output_dir") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(f"{self.path}: another run is using this folder (pid {pid}); wait for it to end or "
                               f"stop it, or choose another output_dir") from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks
                    print(f"restuning: {self.path}: this filesystem cannot lock files ({err.strerror}); the run "
                          f"folder is not protected from a second run", file=sys.stderr)
                    return
                raise RunError(f"{path}: cannot lock the run folder ({err.strerror})") from err
            # The last holder removes the file as it releases: if it did so after we opened ours, lock anew.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def release(self) -> None:
        """Give the lock back (and remove the lock file)."""
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        try:
            (self.path / LOCK).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock

    def _tidy(self) -> None:
        """What killed writers left: `final/`'s swap finished or undone, temporary files and folders gone."""
        recover_dir(self.path / FINAL)
        for name in (FINAL, METRICS, RUN_CONFIG):
            clean_temporaries(self.path / name)
        checkpoints = self.path / CHECKPOINTS
        if checkpoints.is_dir():
            for entry in checkpoints.iterdir():
                if entry.name.startswith("."):  # a checkpoint being written, or one being deleted
                    remove(entry)

    # --- the run's config --------------------------------------------------------------------------
    def saved_config(self) -> dict[str, Any] | None:
        path = self.path / RUN_CONFIG
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RunError(f"{path}: not valid JSON ({err}); restore it, or remove the run folder's files to start "
                           f"over") from err

    def check_config(self, config: dict[str, Any], allowed: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
        """Refuse (`RunError`) to go on with `config` in a folder whose saved config differs in a key that
        `allowed` (dotted keys, or their parents) does not name; the allowed differences, by key."""
        allowed = tuple(allowed)
        saved = self.saved_config()
        known = set(_flatten(config)) | set(_flatten(saved or {}))
        for key in allowed:
            if not any(k == key or k.startswith(key + ".") for k in known):
                raise ConfigError(f"allow change {key!r}: the run config has no such key (keys look like "
                                  f"{sorted(known)[:3]})")
        if saved is None:
            if self.has_run_files():
                raise RunError(f"{self.path}: holds a run's files but no {RUN_CONFIG} (an older restuning's run, "
                               f"or not restuning's); train in a new output_dir, or remove {METRICS}, {CHECKPOINTS}/ "
                               f"and {FINAL}/ to start over here")
            return {}
        diff = config_differences(saved, config)
        refused = {k: v for k, v in diff.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}
        if refused:
            lines = "".join(f"\n  {k}: saved {a!r}, new {b!r}" for k, (a, b) in refused.items())
            flags = " ".join(f"--allow-change {k}" for k in refused)
            raise RunError(f"{self.path}: holds a run of another config ({RUN_CONFIG}); it differs in:{lines}\n"
                           f"Train in a new output_dir, or, if going on with the change is sound (more epochs, say), "
                           f"allow it: {flags} (allow_changes in Python)")
        return diff

    def save_config(self, config: dict[str, Any]) -> None:
        """Save the run's config (main process), unless it is saved already."""
        if self.saved_config() != json.loads(json.dumps(config)):
            atomic_write(self.path / RUN_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))

    def has_run_files(self) -> bool:
        return any((self.path / name).exists() for name in (METRICS, FINAL, LEGACY_CHECKPOINT)) \
            or self.latest_checkpoint() is not None

    # --- checkpoints --------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """The committed checkpoints, oldest first, with their optimizer steps."""
        folder = self.path / CHECKPOINTS
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """Write a checkpoint of optimizer step `step` (main process) and commit it; then drop the others."""
        folder = self.path / CHECKPOINTS
        folder.mkdir(exist_ok=True)
        target = folder / f"step-{step:08d}"
        tmp = make_temporary_dir(target, "tmp")
        try:
            save_file(tensors, str(tmp / WEIGHTS))
            torch.save(state, tmp / STATE)
            apply_umask(tmp)
            fsync_tree(tmp)
            self.sync_metrics()  # the records up to this checkpoint reach the disk before it does
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():  # written again (not reached by a run that resumes from its newest checkpoint)
            self._discard(target)
        os.replace(tmp, target)  # the commit
        fsync(folder)
        self.drop_checkpoints_but(target)
        return target

    def drop_checkpoints_but(self, keep: Path) -> None:
        """Remove every committed checkpoint but `keep` (older ones a kill left before their removal)."""
        for _, old in self.checkpoints():
            if old != keep:
                self._discard(old)

    def load_checkpoint(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A checkpoint's state (tensors and numbers only: never unpickles code) and trainable tensors."""
        try:
            state = torch.load(folder / STATE, weights_only=True)
            tensors = load_file(str(folder / WEIGHTS))
        except Exception as err:  # unpickling, safetensors and OS errors alike
            # The cause stays chained; torch's own text advises weights_only=False, which this must not do.
            raise CheckpointError(f"{folder}: the checkpoint cannot be read ({type(err).__name__}; damaged or not "
                                  f"restuning's); remove it to start the run over") from err
        return state, tensors

    def _discard(self, folder: Path) -> None:
        trash = make_temporary_dir(folder, "trash")  # empty: the rename replaces it in one step
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # --- metrics and final/ -------------------------------------------------------------------------
    def append_record(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(_json_line(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The whole records of metrics.jsonl (a line cut short by a kill is skipped)."""
        path = self.path / METRICS
        out = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def last_record(self) -> dict[str, Any] | None:
        records = self.records()
        return records[-1] if records else None

    def keep_records_until(self, key: str, unit: int, record: dict[str, Any]) -> bool:
        """Drop the records after `unit` (by `key`, epoch or step: a killed run's, to be written again) and
        lines cut short by a kill; add `record` if the kill came between its checkpoint and its line.
        Whether anything was dropped."""
        path = self.path / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if _unit_of(line, key) <= unit]
        if record and record.get(key) not in {_unit_of(line, key) for line in kept}:
            kept.append(_json_line(record))
        if kept != lines:
            atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        return len(kept) < len(lines)

    def sync_metrics(self) -> None:
        if (self.path / METRICS).is_file():
            fsync(self.path / METRICS)

    @property
    def finished(self) -> bool:
        """Whether the run wrote `final/` (it does so last)."""
        return (self.path / FINAL).is_dir()

    def write_final(self, write: Callable[[Path], None]) -> None:
        """Fill `final/` with `write(folder)`, swapped in whole."""
        atomic_write_dir(self.path / FINAL, write)


def config_differences(saved: dict[str, Any], new: dict[str, Any],
                       ignore: tuple[str, ...] = ("output_dir",)) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two configs, with (saved, new) values; a key only one
    has shows `MISSING` on the other side."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(new)))
    return {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k, MISSING) != b.get(k, MISSING)}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):  # an empty mapping adds no key: {} -> {dim: 4} differs in `dim` alone
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json_line(record: dict[str, Any]) -> str:
    """Strict JSON (no NaN or Infinity tokens): a non-finite number is written as null, with a warning."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"restuning: {', '.join(bad)} not finite at {record.get('step', record.get('epoch'))}; written as null",
              file=sys.stderr)
        record = {k: None if k in bad else v for k, v in record.items()}
    return json.dumps(record, allow_nan=False)


def _unit_of(line: str, key: str) -> float:
    """A metrics.jsonl line's epoch or step; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)[key]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))
