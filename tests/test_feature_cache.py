"""FeatureCache: tapped features computed once; training from them equals training without; stale stores
(other weights, config, dtype, taps or inputs) and damaged or tampered files are rebuilt."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES
from safetensors.torch import load_file

import restuning
from restuning import BypassConfig, FeatureCache
from restuning.bypass.cache import _describe, fingerprint


def _data(seed: int = 0, n: int = 12) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}, torch.randint(0, 3, (n,), generator=g)


def _model(config: BypassConfig | None = None, depth: int = 2):
    torch.manual_seed(0)
    model = CASES["vit"].model(depth=depth)
    torch.manual_seed(1)
    return restuning.get_restuning_model(model, config or BypassConfig(num_classes=3))


def _train(model, inputs, labels, cache: FeatureCache | None, epochs: int = 3) -> list[float]:
    """Mini-batch AdamW over `epochs`, shuffled with a fixed seed; from the cache when one is given."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    order = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(epochs):
        stored = cache.get(model, inputs) if cache is not None else None
        for index in torch.randperm(len(labels), generator=order).split(4):
            if stored is not None:
                features, mask = stored.batch(index)
                logits = model.forward_features(features, mask)
            else:
                logits = model(pixel_values=inputs["pixel_values"][index])
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_training_from_the_cache_gives_the_same_losses():
    inputs, labels = _data()
    direct = _train(_model(), inputs, labels, cache=None)
    cache = FeatureCache()
    cached = _train(_model(), inputs, labels, cache)
    assert cache.status == "memory"  # built in epoch 1, reused in epochs 2 and 3
    assert len(direct) == 9 and direct[0] != direct[-1]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(direct), atol=1e-6, rtol=1e-6)


def test_disk_cache_is_reused_and_stale_stores_are_rebuilt(tmp_path):
    inputs, labels = _data()
    model = _model()
    first = FeatureCache(tmp_path).get(model, inputs)
    cache = FeatureCache(tmp_path)
    again = cache.get(model, inputs)
    assert cache.status == "loaded"
    assert all(torch.equal(a, b) for a, b in zip(first.features, again.features, strict=True))

    other_data, _ = _data(seed=1)
    FeatureCache(tmp_path).get(model, inputs)
    cache = FeatureCache(tmp_path)
    cache.get(model, other_data)
    assert cache.status == "rebuilt"

    other_taps = _model(BypassConfig(layers=[0], num_classes=3))
    cache = FeatureCache(tmp_path)
    fewer = cache.get(other_taps, other_data)
    assert cache.status == "rebuilt" and len(fewer.features) == 2

    other_backbone = _model()
    with torch.no_grad():
        other_backbone.base_model.embeddings.cls_token.add_(1.0)
    cache = FeatureCache(tmp_path)
    cache.get(other_backbone, other_data)
    assert cache.status == "rebuilt"


def test_a_stale_memory_store_is_rebuilt_and_never_used():
    inputs, _ = _data()
    cache = FeatureCache()
    model = _model()
    cache.get(model, inputs)
    with torch.no_grad():
        model.base_model.layers[0].mlp.fc1.weight.mul_(2)
    fresh = cache.get(model, inputs)
    assert cache.status == "rebuilt"
    expected = model.features(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(fresh.features, expected, strict=True))


def test_batch_norm_backbones_are_fingerprinted_and_running_statistics_count():
    from conftest import CNN_CASES

    model = restuning.get_restuning_model(CNN_CASES["resnet"].model(), BypassConfig(num_classes=3))
    inputs = CNN_CASES["resnet"].inputs()
    cache = FeatureCache()
    cache.get(model, inputs)
    with torch.no_grad():
        model.base_model.embedder.embedder.normalization.running_mean.add_(0.5)
    cache.get(model, inputs)
    assert cache.status == "rebuilt"


def test_a_damaged_file_is_rebuilt(tmp_path):
    inputs, _ = _data()
    model = _model()
    cache = FeatureCache(tmp_path)
    good = cache.get(model, inputs)
    path = tmp_path / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    cache = FeatureCache(tmp_path)
    again = cache.get(model, inputs)
    assert cache.status == "rebuilt"
    assert all(torch.equal(a, b) for a, b in zip(good.features, again.features, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "shard-00000.safetensors"]  # no temporary


def _vit_with(hidden_act: str, weights: dict | None = None):
    """The test ViT with another activation, optionally loaded with the given weights."""
    from transformers import ViTModel

    reference = CASES["vit"].model()
    config = reference.config.__class__.from_dict({**reference.config.to_dict(), "hidden_act": hidden_act})
    config._attn_implementation = reference.config._attn_implementation
    backbone = ViTModel(config).eval()
    backbone.load_state_dict(weights if weights is not None else reference.state_dict())
    torch.manual_seed(1)
    return restuning.get_restuning_model(backbone, BypassConfig(num_classes=3))


def test_the_backbone_config_is_in_the_key(tmp_path):
    """Same weights, other activation: another key, and the stored gelu features are not reused."""
    inputs, _ = _data()
    gelu, relu = _vit_with("gelu"), _vit_with("relu")
    assert all(torch.equal(a, b) for a, b in zip(gelu.base_model.state_dict().values(),
                                                 relu.base_model.state_dict().values(), strict=True))
    assert fingerprint(gelu, inputs) != fingerprint(relu, inputs)
    first = FeatureCache(tmp_path).get(gelu, inputs).features  # read now: the next get replaces the files
    cache = FeatureCache(tmp_path)
    got = cache.get(relu, inputs)
    assert cache.status == "rebuilt"
    expected = relu.features(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(got.features, expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got.features, first, strict=True))

    wider = _model()
    key = fingerprint(wider, inputs)
    wider.base_model.double()
    assert fingerprint(wider, inputs) != key


def test_a_module_without_a_config_is_described_by_its_module_tree():
    torch.manual_seed(0)
    relu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    gelu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    gelu.load_state_dict(relu.state_dict())
    assert _describe(relu) != _describe(gelu)
    assert _describe(relu) != _describe(relu.to(torch.float64))


def test_a_tampered_file_is_rebuilt_never_used(tmp_path):
    """Bytes flipped inside a tensor's data, header intact: the file still parses, the checksum catches it."""
    inputs, _ = _data()
    model = _model()
    good = FeatureCache(tmp_path).get(model, inputs).features  # read now: the store maps its files lazily
    path = tmp_path / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 16, header + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    tampered = load_file(str(path))
    assert not all(torch.equal(tampered[f"x{i}"], f) for i, f in enumerate(good))

    cache = FeatureCache(tmp_path)
    again = cache.get(model, inputs)
    assert cache.status == "rebuilt"
    assert all(torch.equal(a, b) for a, b in zip(good, again.features, strict=True))
    cache = FeatureCache(tmp_path)
    cache.get(model, inputs)
    assert cache.status == "loaded"  # the rebuilt file is whole again


def test_a_cached_batch_in_memory_or_on_disk_takes_integer_indices_or_a_boolean_mask_and_refuses_others(tmp_path):
    torch.manual_seed(0)
    model = restuning.get_restuning_model(CASES["bert"].model(), BypassConfig(num_classes=2, pooling="mean"))
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 90, (5, 6), generator=g),
              "attention_mask": torch.ones(5, 6, dtype=torch.long)}
    in_memory = FeatureCache().get(model, inputs)
    per = sum(f[0].numel() * f.element_size() for f in in_memory.features)
    on_disk = FeatureCache(tmp_path, shard_bytes=2 * per, max_resident_bytes=4 * per + 8192).get(model, inputs)
    assert type(on_disk) is not type(in_memory)  # sharded: 3 shards of at most 2 examples
    for stored in (in_memory, on_disk):  # the disk's caching pass ran 2 examples at a time: its own rounding
        whole = stored.batch(torch.arange(5))[0]
        (*picked,), mask = stored.batch(torch.tensor([3, 0]))
        assert all(torch.equal(p, w[[3, 0]]) for p, w in zip(picked, whole, strict=True)) and mask.shape == (2, 6)
        (*masked,), mask = stored.batch(torch.tensor([False, True, False, True, False]))
        assert all(torch.equal(p, w[[1, 3]]) for p, w in zip(masked, whole, strict=True)) and mask.shape == (2, 6)
        for bad, message in ((torch.tensor([-1]), r"must lie in \[0, 5\), got -1..-1"),
                             (torch.tensor([0, 5]), r"must lie in \[0, 5\), got 0..5"),
                             (torch.tensor([True, False]), r"one value per example \(5\), got shape \(2,\)"),
                             (torch.tensor([0.0, 1.0]), r"integers or a boolean mask, got torch.float32")):
            with pytest.raises(IndexError, match=message):
                stored.batch(bad)
