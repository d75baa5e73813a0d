"""A store of tapped backbone features for a fixed dataset: compute once, train the bypass many epochs.

Valid only when the backbone is frozen and the inputs have no random augmentation. The store is keyed
by a fingerprint of the backbone's weights, config, module tree and dtype, the taps and the inputs: a
stale or mismatched store (other backbone, other taps, other data) is rebuilt, never used. The stored
file carries a sha256 of its tensors, checked on load: a file whose bytes changed is rebuilt too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import atomic_write
from .model import FrozenBackbone

FILE_NAME = "features.safetensors"
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class CachedFeatures:
    """Tapped features of N examples: `features[l]` is x_l for all of them, (N, ...)."""

    features: list[torch.Tensor]
    attention_mask: torch.Tensor | None
    fingerprint: str

    def __len__(self) -> int:
        return self.features[0].shape[0]

    def batch(self, index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The features (and attention mask) of the examples `index`, (len(index), ...)."""
        mask = None if self.attention_mask is None else self.attention_mask[index]
        return [f[index] for f in self.features], mask


class FeatureCache:
    """Features in memory, or on disk under `directory` (one safetensors file, written atomically).

    After `get`, `status` says what happened: `memory` or `loaded` (reused), `built` (nothing stored
    yet), `rebuilt` (a stored set was stale, damaged or for other inputs).
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: CachedFeatures | None = None
        self.status: str | None = None

    def get(self, model: FrozenBackbone, inputs: Inputs, batch_size: int = 64) -> CachedFeatures:
        """Features of `inputs` (a tensor passed positionally, or a mapping of keyword tensors, each
        (N, ...)) as `model` taps them; computed in batches of `batch_size` only when not stored."""
        key = fingerprint(model, inputs)
        if self._memory is not None and self._memory.fingerprint == key:
            self.status = "memory"
            return self._memory
        stale = self._memory is not None
        if self.directory is not None:
            stored, found = self._read(key)
            if stored is not None:
                self._memory, self.status = stored, "loaded"
                return stored
            stale = stale or found
        cached = compute(model, inputs, batch_size, key)
        if self.directory is not None:
            self._write(cached)
        self._memory, self.status = cached, "rebuilt" if stale else "built"
        return cached

    def _path(self) -> Path:
        return self.directory / FILE_NAME

    def _read(self, key: str) -> tuple[CachedFeatures | None, bool]:
        """(features, whether a file was there). A file for another key, or a damaged one (unreadable,
        or its tensors no longer match the checksum written with them), is not used."""
        path = self._path()
        if not path.is_file():
            return None, False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != key:
                return None, True
            tensors = load_file(str(path))
            if meta.get("checksum") != checksum(tensors):
                return None, True
            depth = int(meta["depth"])
            features = [tensors[f"x{i}"] for i in range(depth)]
        except (SafetensorError, OSError, ValueError, KeyError):
            return None, True
        return CachedFeatures(features, tensors.get("attention_mask"), key), True

    def _write(self, cached: CachedFeatures) -> None:
        tensors = {f"x{i}": f.contiguous() for i, f in enumerate(cached.features)}
        if cached.attention_mask is not None:
            tensors["attention_mask"] = cached.attention_mask.contiguous()
        meta = {"fingerprint": cached.fingerprint, "depth": str(len(cached.features)), "checksum": checksum(tensors)}
        atomic_write(self._path(), lambda p: save_file(tensors, str(p), metadata=meta))


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`: what a stored file must still hold."""
    h = hashlib.sha256()
    _hash_tensors(h, tensors)
    return h.hexdigest()


def compute(model: FrozenBackbone, inputs: Inputs, batch_size: int, key: str = "") -> CachedFeatures:
    """Run the backbone over `inputs` in batches and stack the tapped features (on CPU)."""
    n = _length(inputs)
    parts: list[list[torch.Tensor]] = []
    device = next(model.base_model.parameters()).device
    for start in range(0, n, batch_size):
        chunk = _slice(inputs, start, start + batch_size, device)
        feats = model.features(chunk) if isinstance(chunk, torch.Tensor) else model.features(**chunk)
        parts.append([f.cpu() for f in feats])
    features = [torch.cat(layer) for layer in zip(*parts, strict=True)]
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return CachedFeatures(features, mask, key)


def fingerprint(model: FrozenBackbone, inputs: Inputs) -> str:
    """sha256 over the backbone (its config, module tree, parameter dtype, parameters and buffers,
    persistent or not), the taps, and the inputs."""
    h = hashlib.sha256()
    base = model.base_model
    taps = {"taps": list(model.taps.points), "first_token_only": model.taps.first_token_only}
    h.update(json.dumps({**taps, "class": type(base).__name__}).encode())
    h.update(_describe(base).encode())
    _hash_tensors(h, {**dict(base.named_parameters()), **{f"buffer:{n}": b for n, b in base.named_buffers()}})
    _hash_tensors(h, {"": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs))
    return h.hexdigest()


# Where the weights were read from, not how features are computed: the same weights from another
# folder are the same backbone (the weights themselves are hashed). Everything else stays in the key,
# `dtype` and `transformers_version` included (a new version may compute the same op differently).
_LOCATION_KEYS = frozenset({"_name_or_path"})


def _describe(model: nn.Module) -> str:
    """The backbone's computation beyond its tensors, as JSON: its config (transformers' `to_dict()`, or a
    diffusers config mapping) with the attention implementation (or processors), its module tree (repr: the
    activations and layer options of a module without a config) and its parameter dtype."""
    cfg = getattr(model, "config", None)
    config: dict[str, Any] | None = None
    if hasattr(cfg, "to_dict"):
        config = cfg.to_dict()
    elif isinstance(cfg, Mapping):
        config = dict(cfg)
    if config is not None:
        config = {k: v for k, v in config.items() if k not in _LOCATION_KEYS}
        config["_attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    dtype = next((str(p.dtype) for p in model.parameters()), None)
    # A diffusers model's attention processors (sdpa or not) are not in its config or repr.
    processors = {k: type(v).__name__ for k, v in getattr(model, "attn_processors", {}).items()}
    return json.dumps({"config": config, "modules": repr(model), "dtype": dtype, "attn_processors": processors},
                      sort_keys=True, default=str)


def _hash_tensors(h, tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _length(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs: every tensor needs the same number of examples, got {sizes}")
    return next(iter(sizes.values()))


def _slice(inputs: Inputs, start: int, stop: int, device: torch.device) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop].to(device)
    return {k: v[start:stop].to(device) for k, v in inputs.items()}


__all__ = ["CachedFeatures", "FeatureCache", "checksum", "compute", "fingerprint"]
