"""The on-disk feature store: safetensors shards, each written atomically, read memory-mapped.

A folder holds `cache.json` (the manifest) and `shard-00000.safetensors`, `shard-00001.safetensors`, ...
Shard k holds examples [k S, min((k + 1) S, N)) of every tapped layer (`x0`, `x1`, ..., `x{L}`, each
(n_k, ...)) and, for token backbones, their `attention_mask` (n_k, T); S is the manifest's `shard_examples`.

- Written shard by shard, each through a temporary file renamed into place (`checkpoint.atomic_write`), so a
  shard file at its own name is whole; the manifest says `complete` only after the last shard is in.
- Each shard's header repeats the cache's fingerprint, its range and dtype, and a sha256 of its tensors;
  a shard is used only if all of them match and its bytes still hash to that sha256. A caching pass that was
  killed is resumed from the shards that pass this check; a shard that does not is computed again.
- Read memory-mapped (`mmap`, copy-on-write, never written): `ShardedFeatures.batch` maps the shards a batch
  needs and copies its rows out; at most `max_resident_bytes` of shards are mapped at once (least recently
  used first out), so a data set whose features exceed memory trains from disk. `held_bytes` and
  `peak_held_bytes` count what the store maps and holds.
- Files of another layout (the single `features.safetensors` of format 1, an unknown `format_version`) are
  never read: the cache is rebuilt and they are removed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write, clean_temporaries

FORMAT = "restuning-feature-cache"
FORMAT_VERSION = 2
MANIFEST = "cache.json"
OLD_FILE = "features.safetensors"  # format 1: one file of every feature, read whole into memory
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass
class Manifest:
    """What a cache folder holds. `layers`: per tapped feature, its shape after the example axis and its
    stored dtype; `mask_shape`: the attention mask's (T,) or None. `batch_size` is the backbone batch the
    features were computed in (a resumed pass uses the same, so its shards equal an uninterrupted pass's)."""

    fingerprint: str
    examples: int
    shard_examples: int
    batch_size: int
    dtype: str
    layers: list[tuple[list[int], str]] = field(default_factory=list)
    mask_shape: list[int] | None = None
    mask_dtype: str | None = None
    complete: bool = False

    @property
    def shards(self) -> int:
        return -(-self.examples // self.shard_examples)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_examples, min((k + 1) * self.shard_examples, self.examples)

    def example_bytes(self) -> int:
        """Bytes of one example's features and mask, as stored."""
        total = sum(_numel(shape) * _itemsize(dtype) for shape, dtype in self.layers)
        if self.mask_shape is not None:
            total += _numel(self.mask_shape) * _itemsize(self.mask_dtype)
        return total

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **self.__dict__}, indent=2)


def read_manifest(directory: Path) -> Manifest | None:
    """The folder's manifest, or None if there is none, or it is unreadable or of another format."""
    try:
        raw = json.loads((directory / MANIFEST).read_text())
        if raw.pop("format") != FORMAT or raw.pop("format_version") != FORMAT_VERSION:
            return None
        manifest = Manifest(**raw)
        manifest.layers = [(list(shape), str(dtype)) for shape, dtype in manifest.layers]
        manifest.example_bytes()  # every dtype and shape is one this reader knows
        if manifest.examples < 1 or manifest.shard_examples < 1 or manifest.batch_size < 1:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write(directory / MANIFEST, lambda p: p.write_text(manifest.to_json()))


def found_any(directory: Path) -> bool:
    """True when the folder holds a cache of any format (the caller is about to replace it)."""
    return any((directory / n).exists() for n in (MANIFEST, OLD_FILE)) or any(directory.glob("shard-*.safetensors"))


def clear(directory: Path) -> None:
    """Remove every file of a cache of any format from `directory` (and nothing else), manifest first, so a kill
    half-way never leaves a manifest over shards of another cache."""
    (directory / MANIFEST).unlink(missing_ok=True)
    (directory / OLD_FILE).unlink(missing_ok=True)
    for path in directory.glob("shard-*.safetensors"):
        path.unlink(missing_ok=True)
    for name in (MANIFEST, OLD_FILE):
        clean_temporaries(directory / name)
    clean_shard_temporaries(directory)


def clean_shard_temporaries(directory: Path) -> None:
    """Remove the temporary files a killed pass left (`.shard-*.tmp`: never read; one writer per folder)."""
    for path in directory.glob(".shard-*.tmp"):
        path.unlink(missing_ok=True)


# --- one shard ----------------------------------------------------------------------------------------
def shard_tensors(features: list[torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = {f"x{i}": f.contiguous() for i, f in enumerate(features)}
    if mask is not None:
        tensors["attention_mask"] = mask.contiguous()
    return tensors


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (no copy of the bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        _update(h, name, t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _update(h, name: str, dtype: torch.dtype, shape: tuple[int, ...], data) -> None:
    h.update(f"{name}|{dtype}|{shape}".encode())
    h.update(data)


def write_shard(directory: Path, k: int, manifest: Manifest, features: list[torch.Tensor],
                mask: torch.Tensor | None) -> None:
    """Write shard `k` (features (n_k, ...) per layer, as stored) atomically."""
    tensors = shard_tensors(features, mask)
    start, stop = manifest.shard_range(k)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": manifest.fingerprint,
            "start": str(start), "stop": str(stop), "dtype": manifest.dtype, "depth": str(len(features)),
            "checksum": tensor_checksum(tensors)}
    atomic_write(directory / shard_name(k), lambda p: save_safetensors(tensors, p, meta))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write `tensors` as a safetensors file, streaming each tensor's bytes from its own memory (the library's
    `save_file` first copies every tensor into a bytes object, doubling what a shard's write holds). Widest
    dtypes first, so every tensor's data is aligned to its element size; the header is padded to 8 bytes."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


class ShardError(ValueError):
    """A shard file that is not the shard it should be (damaged, truncated, of another cache or range)."""


@dataclass
class MappedShard:
    """One shard's tensors as views of a read-only mapping of its file; `nbytes`: the file's size."""

    features: list[torch.Tensor]
    mask: torch.Tensor | None
    nbytes: int


def map_shard(path: Path, k: int, manifest: Manifest, verify: bool = True) -> MappedShard:
    """Memory-map shard `k` and check its header against `manifest` (and, with `verify`, its bytes against
    its checksum). Raises `ShardError` for any mismatch; nothing is read from a shard that fails."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ShardError(f"{path}: {size} bytes, not a safetensors file")
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                raise ShardError(f"{path}: header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: nothing is ever written back
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: unreadable ({err})") from err
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: no shard header")
    start, stop = manifest.shard_range(k)
    expected = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fingerprint": manifest.fingerprint,
                "start": str(start), "stop": str(stop), "dtype": manifest.dtype, "depth": str(len(manifest.layers))}
    wrong = {key: meta.get(key) for key, value in expected.items() if meta.get(key) != value}
    if wrong:
        raise ShardError(f"{path}: not shard {k} of this cache (header {wrong})")
    data = 8 + length
    tensors: dict[str, torch.Tensor] = {}
    h = hashlib.sha256()
    try:
        for name in sorted(header):
            info = header[name]
            begin, end = (data + o for o in info["data_offsets"])
            dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
            if not data <= begin <= end <= size or end - begin != _numel(shape) * _itemsize_of(dtype):
                raise ShardError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
            if verify:
                _update(h, name, dtype, shape, memoryview(mapped)[begin:end])
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin \
                else torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"{path}: malformed header ({err})") from err
    if verify and h.hexdigest() != meta.get("checksum"):
        raise ShardError(f"{path}: its bytes do not match the checksum written with them")
    names = [f"x{i}" for i in range(len(manifest.layers))]
    if sorted(tensors) != sorted([*names, *(["attention_mask"] if manifest.mask_shape is not None else [])]):
        raise ShardError(f"{path}: holds {sorted(tensors)}")
    features = [tensors[n] for n in names]
    for (shape, dtype), t in zip(manifest.layers, features, strict=True):
        if list(t.shape) != [stop - start, *shape] or str(t.dtype) != dtype:
            raise ShardError(f"{path}: a feature of shape {tuple(t.shape)} {t.dtype}, expected "
                             f"{(stop - start, *shape)} {dtype}")
    return MappedShard(features, tensors.get("attention_mask"), size)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize_of(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def torch_dtype(name: str | None) -> torch.dtype:
    """`"torch.float32"` (as the manifest writes a dtype) -> torch.float32."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"feature cache: unknown dtype {name!r}")
    return dtype


def _itemsize(name: str | None) -> int:
    return _itemsize_of(torch_dtype(name))


# --- the reader ---------------------------------------------------------------------------------------
def example_rows(index: torch.Tensor | Any, examples: int) -> torch.Tensor:
    """`index` (integers in [0, examples), or a boolean mask of `examples` values) as a 1-d long tensor of rows;
    anything else is an IndexError naming what was expected."""
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        if index.shape != (examples,):
            raise IndexError(f"feature cache: a boolean mask must have one value per example ({examples}), got "
                             f"shape {tuple(index.shape)}")
        return index.nonzero().reshape(-1)
    if index.is_floating_point() or index.is_complex():
        raise IndexError(f"feature cache: indices must be integers or a boolean mask, got {index.dtype}")
    index = index.long().reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= examples):
        raise IndexError(f"feature cache: indices must lie in [0, {examples}), got {int(index.min())}.."
                         f"{int(index.max())}")
    return index


class ShardedFeatures:
    """Tapped features of N examples, on disk in shards (see the module's docstring); the interface of
    `CachedFeatures`. `batch(index)` copies the rows `index` out of the shards they lie in, mapping at most
    `max_resident_bytes` of shards at a time."""

    def __init__(self, directory: Path, manifest: Manifest, max_resident_bytes: int, verified: set[int] | None = None):
        self.directory, self.manifest, self.max_resident_bytes = directory, manifest, max_resident_bytes
        self.fingerprint = manifest.fingerprint
        self._open: OrderedDict[int, MappedShard] = OrderedDict()
        self._verified = set(verified or ())  # shards whose bytes were checked already (by this process)
        self.peak_held_bytes = 0

    def __len__(self) -> int:
        return self.manifest.examples

    @property
    def held_bytes(self) -> int:
        """Bytes of the shards mapped now."""
        return sum(s.nbytes for s in self._open.values())

    def _shard(self, k: int) -> MappedShard:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = self.directory / shard_name(k)
        size = path.stat().st_size
        while self._open and self.held_bytes + size > self.max_resident_bytes:
            self._open.popitem(last=False)  # the least recently used: unmapped once its views are gone
        shard = map_shard(path, k, self.manifest, verify=k not in self._verified)
        self._verified.add(k)
        self._open[k] = shard
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        return shard

    def release(self) -> None:
        """Unmap every shard (they are mapped again as batches need them)."""
        self._open.clear()

    def batch(self, index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The features (and attention mask) of the examples `index` (a 1-d integer tensor, or a boolean mask over
        the examples), each (len(index), ...) in the stored dtype, in memory (copies, not views of the files)."""
        m = self.manifest
        index = example_rows(index, m.examples)
        out = [torch.empty((len(index), *shape), dtype=torch_dtype(dtype)) for shape, dtype in m.layers]
        mask = None if m.mask_shape is None else torch.empty((len(index), *m.mask_shape),
                                                              dtype=torch_dtype(m.mask_dtype))
        which = torch.div(index, m.shard_examples, rounding_mode="floor")
        for k in torch.unique(which).tolist():
            rows = (which == k).nonzero().reshape(-1)
            local = index[rows] - k * m.shard_examples
            shard = self._shard(k)
            for target, source in zip(out, shard.features, strict=True):
                target.index_copy_(0, rows, source.index_select(0, local))
            if mask is not None:
                mask.index_copy_(0, rows, shard.mask.index_select(0, local))
        return out, mask

    @property
    def features(self) -> list[torch.Tensor]:
        """Every feature of every example in memory at once, (N, ...) each: for caches that fit in memory."""
        return self.batch(torch.arange(len(self)))[0]

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.batch(torch.arange(len(self)))[1]


# --- the writer ---------------------------------------------------------------------------------------
def valid_shards(directory: Path, manifest: Manifest) -> set[int]:
    """The shards of `manifest` on disk whose header and bytes check out (mapped one at a time)."""
    good = set()
    for k in range(manifest.shards):
        path = directory / shard_name(k)
        if not path.is_file():
            continue
        try:
            map_shard(path, k, manifest, verify=True)
        except ShardError:
            path.unlink(missing_ok=True)
            continue
        good.add(k)
    return good


ComputeRange = Callable[[int, int], tuple[list[torch.Tensor], torch.Tensor | None]]


def write_missing(directory: Path, manifest: Manifest, present: set[int], compute: ComputeRange,
                  on_shard: Callable[[int, int], Any] | None = None) -> None:
    """Compute and write the shards of `manifest` not in `present`, one at a time, then mark the manifest
    complete. `compute(start, stop)` returns the features (and mask) of those examples; `on_shard(k, shards)`
    is called after each shard is on disk. Temporary files of an earlier, killed pass are removed first."""
    clean_shard_temporaries(directory)
    for k in range(manifest.shards):
        if k in present:
            continue
        start, stop = manifest.shard_range(k)
        features, mask = compute(start, stop)
        write_shard(directory, k, manifest, features, mask)
        del features, mask
        if on_shard is not None:
            on_shard(k, manifest.shards)
    manifest.complete = True
    write_manifest(directory, manifest)


__all__ = ["Manifest", "MappedShard", "ShardError", "ShardedFeatures", "map_shard", "read_manifest",
           "tensor_checksum", "valid_shards", "write_manifest", "write_missing", "write_shard"]
