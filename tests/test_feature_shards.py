"""The on-disk feature cache: sharded, memory-mapped, written atomically shard by shard, resumable after a
kill, bounded in what it holds, and never reading a half-written, damaged or older-format file."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES
from safetensors.torch import load_file, save_file

import restuning
from restuning import BypassConfig, FeatureCache
from restuning.bypass import shards
from restuning.bypass.cache import fingerprint


def _data(n: int = 24, seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}, torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    backbone = CASES["vit"].model()
    torch.manual_seed(1)
    return restuning.get_restuning_model(backbone, BypassConfig(num_classes=3, pooling="mean"))  # every token


def _example_bytes(model, inputs) -> int:
    return sum(f[0].numel() * f.element_size() for f in model.features(pixel_values=inputs["pixel_values"][:1]))


def _cache(directory, model, inputs, shard_examples: int = 4, shards_resident: int = 2, **kwargs) -> FeatureCache:
    per = _example_bytes(model, inputs)
    return FeatureCache(directory, shard_bytes=shard_examples * per, max_resident_bytes=shards_resident
                        * shard_examples * per + 4096, **kwargs)  # + room for the shards' headers


class _Stop(Exception):
    pass


def _stop_after(k: int):
    def on_shard(done: int, total: int) -> None:
        if done == k:
            raise _Stop

    return on_shard


def _equal(a, b) -> bool:
    fa, fb = a.batch(torch.arange(len(a)))[0], b.batch(torch.arange(len(b)))[0]
    return len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))


def _counting(model) -> list[int]:
    """Counts the examples the backbone is run on."""
    seen = [0]
    features = model.features

    def counted(*args, **kwargs):
        seen[0] += next(iter(kwargs.values())).shape[0]
        return features(*args, **kwargs)

    model.features = counted
    return seen


def test_the_cache_is_sharded_and_memory_mapped(tmp_path):
    inputs, _ = _data()
    model = _model()
    stored = _cache(tmp_path, model, inputs).get(model, inputs)
    assert isinstance(stored, shards.ShardedFeatures) and len(stored) == 24
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cache.json", *(shards.shard_name(k) for k in range(6))]
    manifest = shards.read_manifest(tmp_path)
    assert manifest.complete and manifest.shards == 6 and manifest.shard_examples == 4
    mapped = shards.map_shard(tmp_path / shards.shard_name(1), 1, manifest)
    assert not mapped.features[0].untyped_storage().resizable()  # a view of the file's mapping, not a copy
    by_library = load_file(str(tmp_path / shards.shard_name(1)))  # a standard safetensors file
    assert sorted(by_library) == ["x0", "x1", "x2"]
    assert all(torch.equal(by_library[f"x{i}"], f) for i, f in enumerate(mapped.features))
    expected = model.features(**inputs)
    got, _ = stored.batch(torch.tensor([5, 0, 23, 6]))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e[[5, 0, 23, 6]], atol=1e-6, rtol=1e-6)


def test_a_killed_caching_pass_resumes_and_equals_an_uninterrupted_one(tmp_path):
    inputs, _ = _data()
    model = _model()
    whole = _cache(tmp_path / "whole", model, inputs).get(model, inputs)

    with pytest.raises(_Stop):
        _cache(tmp_path / "killed", model, inputs, on_shard=_stop_after(2)).get(model, inputs)
    manifest = shards.read_manifest(tmp_path / "killed")
    assert manifest is not None and not manifest.complete
    assert sorted(p.name for p in (tmp_path / "killed").glob("shard-*")) == [shards.shard_name(k) for k in range(3)]

    cache = _cache(tmp_path / "killed", model, inputs)
    seen = _counting(model)
    resumed = cache.get(model, inputs)
    assert cache.status == "resumed"
    assert seen[0] == 24 - 12  # shards 0..2 (12 examples) were kept, only the rest computed
    assert _equal(resumed, whole)
    again = _cache(tmp_path / "killed", model, inputs)
    again.get(model, inputs)
    assert again.status == "loaded"


def test_a_half_written_or_damaged_shard_is_never_read(tmp_path, monkeypatch):
    inputs, _ = _data()
    model = _model()
    whole = _cache(tmp_path / "whole", model, inputs).get(model, inputs)
    with pytest.raises(_Stop):
        _cache(tmp_path / "c", model, inputs, on_shard=_stop_after(2)).get(model, inputs)
    folder = tmp_path / "c"
    good = (folder / shards.shard_name(2)).read_bytes()
    # What a kill inside a shard's write leaves: its temporary file, half written...
    (folder / f".{shards.shard_name(3)}.0badcafe.tmp").write_bytes(good[: len(good) // 2])
    # ...and, as a copy that was not atomic would, a truncated shard 1 and a shard 2 with flipped data bytes.
    (folder / shards.shard_name(1)).write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[-8:] = bytes(b ^ 0xFF for b in flipped[-8:])
    (folder / shards.shard_name(2)).write_bytes(bytes(flipped))

    opened: list[tuple[str, bool]] = []
    map_shard = shards.map_shard

    def spy(path, k, manifest, verify=True):
        opened.append((path.name, verify))
        return map_shard(path, k, manifest, verify)

    monkeypatch.setattr(shards, "map_shard", spy)
    cache = _cache(folder, model, inputs)
    seen = _counting(model)
    resumed = cache.get(model, inputs)
    assert cache.status == "resumed" and seen[0] == 24 - 4  # only shard 0 survived the check
    assert not any(name.endswith(".tmp") for name, _ in opened)
    assert all(verify for name, verify in opened)  # every shard's bytes were checked before use
    assert _equal(resumed, whole)
    assert not list(folder.glob(".*"))  # the temporary file is gone


def test_an_older_format_cache_is_rebuilt_never_read(tmp_path):
    """Format 1 (one `features.safetensors` with the same fingerprint) must not be read as features."""
    inputs, _ = _data(n=8)
    model = _model()
    key = fingerprint(model, inputs)
    wrong = [torch.zeros_like(f) for f in model.features(**inputs)]
    save_file({f"x{i}": f for i, f in enumerate(wrong)}, str(tmp_path / "features.safetensors"),
              metadata={"fingerprint": key, "depth": str(len(wrong)), "checksum": "x"})
    cache = _cache(tmp_path, model, inputs)
    got = cache.get(model, inputs)
    assert cache.status == "rebuilt" and not (tmp_path / "features.safetensors").exists()
    assert not torch.equal(got.features[1], wrong[1])
    torch.testing.assert_close(got.features[1], model.features(**inputs)[1], atol=1e-6, rtol=1e-6)

    manifest = (tmp_path / "cache.json").read_text()
    (tmp_path / "cache.json").write_text(manifest.replace('"format_version": 2', '"format_version": 3'))
    cache = _cache(tmp_path, model, inputs)
    cache.get(model, inputs)
    assert cache.status == "rebuilt"


def _train(model, stored, labels, epochs: int = 2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    order = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=order).split(5):  # batches span shards
            features, mask = stored.batch(index)
            loss = torch.nn.functional.cross_entropy(model.forward_features(features, mask), labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_training_from_a_cache_larger_than_its_memory_bound_matches_memory(tmp_path):
    inputs, labels = _data(n=64)
    memory = _train(_model(), FeatureCache().get(_model(), inputs), labels)
    model = _model()
    cache = _cache(tmp_path, model, inputs)
    stored = cache.get(model, inputs)
    total = sum(p.stat().st_size for p in tmp_path.glob("shard-*"))
    bound = cache.max_resident_bytes
    assert total > 5 * bound  # 16 shards on disk, 2 may be mapped at once
    assert 0 < cache.peak_write_bytes <= bound  # the caching pass held one shard and one batch
    disk = _train(model, stored, labels)
    assert 0 < stored.peak_held_bytes <= bound and stored.held_bytes <= bound
    assert memory[0] != memory[-1]
    torch.testing.assert_close(torch.tensor(disk), torch.tensor(memory), atol=1e-6, rtol=1e-6)


def test_bf16_shards_halve_the_bytes_and_train(tmp_path):
    inputs, labels = _data(n=8)
    model = _model()
    f32 = _cache(tmp_path / "f32", model, inputs, shard_examples=8).get(model, inputs)
    bf16 = FeatureCache(tmp_path / "bf16", dtype=torch.bfloat16, shard_bytes=f32.manifest.shard_examples
                        * f32.manifest.example_bytes() // 2, max_resident_bytes=2**24).get(model, inputs)
    assert bf16.features[0].dtype == torch.bfloat16 and bf16.manifest.shard_examples == 8
    size = {k: (tmp_path / k / shards.shard_name(0)).stat().st_size for k in ("f32", "bf16")}
    assert size["bf16"] < 0.55 * size["f32"]
    torch.testing.assert_close(bf16.features[2].float(), f32.features[2], atol=0.02, rtol=0.01)
    assert torch.isfinite(torch.tensor(_train(model, bf16, labels, epochs=1))).all()


def test_bad_bounds_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="at least two shards"):
        FeatureCache(tmp_path, shard_bytes=100, max_resident_bytes=150)
    with pytest.raises(ValueError, match="floating-point"):
        FeatureCache(tmp_path, dtype=torch.int8)
