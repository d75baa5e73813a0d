"""FeatureCache: tapped features computed once; training from them equals training without; stale stores
are rebuilt."""

from __future__ import annotations

import torch
from conftest import CASES

import restuning
from restuning import BypassConfig, FeatureCache


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
    path = next(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:100])
    cache = FeatureCache(tmp_path)
    again = cache.get(model, inputs)
    assert cache.status == "rebuilt"
    assert all(torch.equal(a, b) for a, b in zip(good.features, again.features, strict=True))
    assert [p.name for p in tmp_path.iterdir()] == ["features.safetensors"]  # no temporary file left
