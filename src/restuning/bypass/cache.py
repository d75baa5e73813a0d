"""A store of tapped backbone features for a fixed dataset: compute once, train the bypass many epochs.

Valid only when the backbone is frozen and the inputs have no random augmentation. The store is keyed
by a fingerprint of the backbone's weights, config, module tree and dtype, the taps and the inputs: a
stale or mismatched store (other backbone, other taps, other data) is rebuilt, never used. On disk it is
a folder of safetensors shards, each written atomically and carrying a sha256 of its tensors, read
memory-mapped (`restuning.bypass.shards`): a caching pass that was killed resumes from the shards it
finished, a shard whose bytes changed is computed again, and training never holds more than
`max_resident_bytes` of the store at once, so the features of a data set may exceed memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..precision import backbone_dtype, is_quantized
from . import shards
from .model import FrozenBackbone
from .shards import Manifest, ShardedFeatures, example_rows

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
MiB = 2**20


@dataclass
class CachedFeatures:
    """Tapped features of N examples in memory: `features[l]` is x_l for all of them, (N, ...)."""

    features: list[torch.Tensor]
    attention_mask: torch.Tensor | None
    fingerprint: str

    def __len__(self) -> int:
        return self.features[0].shape[0]

    def batch(self, index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The features (and attention mask) of the examples `index` (a 1-d integer tensor, or a boolean mask over
        the examples), (len(index), ...)."""
        index = example_rows(index, len(self))
        mask = None if self.attention_mask is None else self.attention_mask.index_select(0, index)
        # index_select copies whole rows; `f[index]` (advanced indexing) took 5x as long per batch.
        return [f.index_select(0, index) for f in self.features], mask


class FeatureCache:
    """Features in memory, or on disk under `directory` (sharded safetensors, see `restuning.bypass.shards`).

    Args:
        directory: None keeps the store in memory; a folder keeps it there (and reuses it across processes).
        dtype: the stored dtype of the features (e.g. `torch.bfloat16`: half the bytes; the bypass computes in
            its own dtype either way); None keeps the backbone's.
        shard_bytes: the target size of one shard on disk.
        max_resident_bytes: the most of an on-disk store mapped at once while training from it, and the bound on
            what the caching pass holds (one shard and one backbone batch); at least two shards.
        on_shard: called as `on_shard(k, shards)` after shard k is on disk (progress, or a test's fault).

    After `get`, `status` says what happened: `memory` or `loaded` (reused), `built` (nothing stored
    yet), `rebuilt` (a stored set was stale, damaged, for other inputs or of an older format), `resumed`
    (a killed caching pass for these inputs was completed from the shards it had written).
    """

    def __init__(self, directory: str | Path | None = None, *, dtype: torch.dtype | None = None,
                 shard_bytes: int = 256 * MiB, max_resident_bytes: int = 1024 * MiB,
                 on_shard: Callable[[int, int], Any] | None = None):
        if shard_bytes < 1 or max_resident_bytes < 2 * shard_bytes:
            raise ValueError(f"FeatureCache: max_resident_bytes ({max_resident_bytes}) must hold at least two "
                             f"shards of shard_bytes ({shard_bytes}), and shard_bytes be positive")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"FeatureCache dtype: expected a floating-point dtype or None, got {dtype}")
        self.directory = Path(directory) if directory is not None else None
        self.dtype, self.shard_bytes, self.max_resident_bytes = dtype, shard_bytes, max_resident_bytes
        self.on_shard = on_shard
        self._memory: CachedFeatures | ShardedFeatures | None = None
        self.status: str | None = None
        self.peak_write_bytes = 0  # the most the caching pass held at once (the current shard and batch)

    def get(self, model: FrozenBackbone, inputs: Inputs, batch_size: int = 64) -> CachedFeatures | ShardedFeatures:
        """Features of `inputs` (a tensor passed positionally, or a mapping of keyword tensors, each
        (N, ...)) as `model` taps them; computed in batches of `batch_size` only when not stored."""
        if not getattr(model, "cacheable", True):
            raise ConfigError("this bypass re-injects its state into the backbone's last blocks (reinject), so it "
                              "trains on a live backbone forward; features tapped once cannot feed it")
        key = fingerprint(model, inputs)
        if self._memory is not None and self._memory.fingerprint == key:
            self.status = "memory"
            return self._memory
        stale = self._memory is not None
        self._memory = None
        if self.directory is None:
            cached = compute(model, inputs, batch_size, key)
            if self.dtype is not None:
                cached.features = [f.to(self.dtype) for f in cached.features]
            self._memory, self.status = cached, "rebuilt" if stale else "built"
            return cached
        stored, self.status = self._disk(model, inputs, batch_size, key, stale)
        self._memory = stored
        return stored

    # --- on disk ----------------------------------------------------------------------------------------
    def _stored_dtype(self, model: FrozenBackbone) -> str:
        dtype = self.dtype or next((p.dtype for p in model.base_model.parameters() if p.is_floating_point()),
                                   torch.float32)
        return str(dtype)

    def _disk(self, model: FrozenBackbone, inputs: Inputs, batch_size: int, key: str, stale: bool
              ) -> tuple[ShardedFeatures, str]:
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        dtype = self._stored_dtype(model)
        manifest = shards.read_manifest(directory)
        ours = manifest is not None and manifest.fingerprint == key and manifest.dtype == dtype \
            and not (directory / shards.OLD_FILE).exists() \
            and 2 * manifest.shard_examples * manifest.example_bytes() <= self.max_resident_bytes
        if ours:
            present = shards.valid_shards(directory, manifest)
            if manifest.complete and len(present) == manifest.shards:
                return ShardedFeatures(directory, manifest, self.max_resident_bytes, present), "loaded"
            status = "resumed" if not manifest.complete else "rebuilt"  # complete but damaged: mend the shards
        else:
            stale = stale or shards.found_any(directory)
            shards.clear(directory)
            manifest, present = self._plan(model, inputs, batch_size, key, dtype), set()
            shards.write_manifest(directory, manifest)
            status = "rebuilt" if stale else "built"
        shards.write_missing(directory, manifest, present, self._range(model, inputs, manifest), self.on_shard)
        return ShardedFeatures(directory, manifest, self.max_resident_bytes,
                               set(range(manifest.shards))), status

    def _plan(self, model: FrozenBackbone, inputs: Inputs, batch_size: int, key: str, dtype: str) -> Manifest:
        """The layout of a new store: the features' shapes from one example's backbone forward."""
        features, mask = _features(model, inputs, 0, 1)
        layers = [(list(f.shape[1:]), dtype) for f in features]
        manifest = Manifest(key, _length(inputs), 1, batch_size, dtype, layers,
                            None if mask is None else list(mask.shape[1:]), None if mask is None else str(mask.dtype))
        per_example = max(manifest.example_bytes(), 1)
        manifest.shard_examples = max(1, min(self.shard_bytes // per_example, manifest.examples))
        manifest.batch_size = max(1, min(batch_size, manifest.shard_examples))  # a batch never spans two shards
        return manifest

    def _range(self, model: FrozenBackbone, inputs: Inputs, manifest: Manifest):
        """compute(start, stop) for `write_missing`: the shard's features in its stored dtype, filled batch by
        batch into tensors allocated once (so the pass holds one shard and one backbone batch)."""
        dtype = shards.torch_dtype(manifest.dtype)

        def run(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            out = [torch.empty((stop - start, *shape), dtype=dtype) for shape, _ in manifest.layers]
            held = sum(t.numel() * t.element_size() for t in out)
            for lo in range(start, stop, manifest.batch_size):
                hi = min(lo + manifest.batch_size, stop)
                feats, _ = _features(model, inputs, lo, hi)
                batch = sum(f.numel() * f.element_size() for f in feats)
                self.peak_write_bytes = max(self.peak_write_bytes, held + batch)
                for target, f in zip(out, feats, strict=True):
                    target[lo - start:hi - start] = f
                del feats
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            return out, None if mask is None else mask[start:stop].clone()

        return run


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`: what a stored shard must still hold."""
    return shards.tensor_checksum(tensors)


def _features(model: FrozenBackbone, inputs: Inputs, start: int, stop: int
              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One backbone forward of examples [start, stop): their tapped features on the CPU, and their mask."""
    device = next(model.base_model.parameters()).device
    chunk = _slice(inputs, start, stop, device)
    feats = model.features(chunk) if isinstance(chunk, torch.Tensor) else model.features(**chunk)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return [f.cpu() for f in feats], None if mask is None else mask[start:stop]


def compute(model: FrozenBackbone, inputs: Inputs, batch_size: int, key: str = "") -> CachedFeatures:
    """Run the backbone over `inputs` in batches and stack the tapped features (on CPU)."""
    n = _length(inputs)
    parts = [_features(model, inputs, start, start + batch_size)[0] for start in range(0, n, batch_size)]
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
    activations and layer options of a module without a config) and how it is held (`backbone_dtype`)."""
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
    held = backbone_dtype(model)  # recorded beside float32 only, so that float32 stores made before stay valid
    return json.dumps({"config": config, "modules": repr(model), "dtype": dtype, "attn_processors": processors,
                       **({} if held == "float32" else {"held_in": held})},
                      sort_keys=True, default=str)


def _hash_tensors(h, tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        if is_quantized(t):  # packed data and scales (torchao): hash the plain tensors inside
            inner, _ = t.__tensor_flatten__()
            h.update(f"{name}|{type(t).__name__}".encode())
            _hash_tensors(h, {f"{name}.{n}": getattr(t, n) for n in inner})
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the bytes, not a copy


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


__all__ = ["CachedFeatures", "FeatureCache", "ShardedFeatures", "checksum", "compute", "fingerprint"]
