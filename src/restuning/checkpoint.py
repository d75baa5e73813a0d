"""Checkpoints: tensors in safetensors, everything else in JSON; written atomically, never unpickled."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

WEIGHTS_NAME = "restuning_model.safetensors"
CONFIG_NAME = "restuning_config.json"
FORMAT_VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers see the old file or the whole new one, and
    after the call the new one is on disk (fsynced). The file gets the mode the umask gives a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(lambda token: path.with_name(f".{path.name}.{token}.tmp"),
                 lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # `write` may have replaced the file (safetensors writes it private)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_dir(target: Path, write) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then swap it in for `target`: readers see the
    old folder or the whole new one, never a half-written one. One writer at a time per `target`.

    POSIX cannot swap two folders in one step, so the old one is first renamed to `.{name}.old`: a kill
    between the two renames leaves no `target` but a complete `.{name}.old`, which `recover_dir` (run at the
    start of each call, and by readers that must not miss it, such as a restarting run) renames back.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    clean_temporaries(target, min_age=3600.0)  # a killed writer's; a younger one may be another writer's
    tmp = make_temporary_dir(target, "new")
    old = _old(target)
    try:
        write(tmp)
        apply_umask(tmp)
        fsync_tree(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(target)  # the old folder back, if it was moved aside
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Finish an `atomic_write_dir` that a kill interrupted: restore `.{name}.old` when `target` is
    missing (killed between the two renames), else remove it (killed after the swap)."""
    old = _old(target)
    if not old.exists():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, target)


def clean_temporaries(target: Path, min_age: float = 0.0) -> None:
    """Remove the temporary folders (`.{name}.new-*`) and files (`.{name}.*.tmp`) that writers of `target`
    killed before their rename left behind, if at least `min_age` seconds old."""
    now = time.time()
    for path in [*target.parent.glob(f".{target.name}.new-*"), *target.parent.glob(f".{target.name}.*.tmp")]:
        try:
            if now - path.lstat().st_mtime < min_age:
                continue
        except FileNotFoundError:
            continue
        remove(path)


def remove(path: Path) -> None:
    """Delete a file, a link or a whole folder, whichever `path` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def make_temporary_dir(target: Path, kind: str) -> Path:
    """A new empty folder `.{name}.{kind}-{random}` beside `target`, with the mode the umask gives new
    folders (`tempfile.mkdtemp` would make it private, and the renamed folder would stay so)."""
    return _fresh(lambda token: target.with_name(f".{target.name}.{kind}-{token}"), os.mkdir)


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give the files under `folder` the mode the umask gives new files (0644 under umask 022): writers such
    as safetensors make theirs private (0600), which a run folder shared with others must not be."""
    mode = 0o666 & ~umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root, name), mode)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (after a rename in it), to the disk."""
    folder = path.is_dir()
    if folder and not hasattr(os, "O_DIRECTORY"):
        return  # folders cannot be opened for fsync here (Windows)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root, name))
        for name in dirs:
            fsync(Path(root, name))
    fsync(folder)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fresh(name, create) -> Path:
    """`create(path)` at `path = name(random token)`, retrying while the name is taken."""
    while True:
        path = name(secrets.token_hex(4))
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def save(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, "format_version": FORMAT_VERSION}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def load(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory}: missing {path.name}; expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: expected format_version {FORMAT_VERSION}, got {meta!r:.200}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: damaged or truncated safetensors file ({err})") from err
    return meta, tensors


def backbone_signature(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_sizes", "depths", "embedding_size",  # these three describe CNNs (ConvNeXt, ResNet)
            "block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels", "out_channels")  # UNets
    values = {k: getattr(cfg, k, None) for k in keys}
    sig = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
           if isinstance(v, (int, str, list, tuple))}
    return {"class": type(model).__name__, **sig}


def check_backbone(meta: dict[str, Any], model: nn.Module, where: Any) -> None:
    saved, here = meta.get("backbone", {}), backbone_signature(model)
    diff = {k: (saved[k], here[k]) for k in saved if k != "class" and k in here and saved[k] != here[k]}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r}, this backbone {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where}: checkpoint was made for another backbone ({detail})")


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Any) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: checkpoint does not fit this backbone: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        detail = "; ".join(f"{k}: saved {a}, expected {b}" for k, a, b in wrong[:8])
        raise CheckpointError(f"{where}: tensor shapes do not fit this backbone: {detail}")
