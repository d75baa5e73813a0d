"""Checkpoints: tensors in safetensors, everything else in JSON; written atomically, never unpickled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
    """Call `write(tmp_path)`, then rename onto `path`: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_dir(target: Path, write) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then swap it in for `target`: readers see
    the old folder or the whole new one, never a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = target.with_name(f".{target.name}.old")
    try:
        write(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
