"""Epoch time of Res-Tuning-Bypass training from the feature cache against recomputing the backbone.

Two settings, each run both ways with the same bypass (Dual Res-Adapters), AdamW, seed and batches:
- `minilm`: the shipped all-MiniLM-L6-v2 on the shipped tweet-sentiment set (positive/negative,
  confidence >= 0.8, a seeded sample of --examples tweets, 32 tokens); mean pooling, so the bypass
  runs on every token.
- `vit`: a ViT-B/16 (random weights; time does not depend on them) on --images random 224 px images,
  10 classes; CLS pooling, so the bypass runs (exactly) on the CLS token and the cache holds only it.
The cached run builds the store once (timed apart) and then trains from it. `speedup` = median
recompute epoch / median cached epoch; the losses of the two runs are compared too.

    python benchmarks/feature_cache.py --json out/feature_cache.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import machine, median, table, write_json
from torch import nn

import restuning
from restuning import BypassConfig, FeatureCache
from restuning.assets import minilm
from restuning.data import tweets


def _minilm(args) -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], torch.Tensor]:
    data = tweets()
    texts, labels = data.inputs, data.labels.tolist()
    pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:args.examples].tolist()
    _, tokenizer = minilm()
    batch = tokenizer([texts[i] for i in pick], padding="max_length", truncation=True, max_length=args.tokens,
                      return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return lambda: minilm()[0], inputs, torch.tensor([labels[i] for i in pick])


def _vit(args) -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], torch.Tensor]:
    from transformers import ViTConfig, ViTModel

    def build() -> nn.Module:
        config = ViTConfig(image_size=224, patch_size=16)
        config._attn_implementation = "sdpa"
        return ViTModel(config, add_pooling_layer=False)

    g = torch.Generator().manual_seed(0)
    return build, {"pixel_values": torch.randn(args.images, 3, 224, 224, generator=g)}, torch.randint(
        0, 10, (args.images,), generator=g)


SETTINGS = {"minilm": _minilm, "vit": _vit}


def train(build: Callable[[], nn.Module], inputs: dict, labels: torch.Tensor, epochs: int, batch: int,
          cache: FeatureCache | None) -> dict:
    torch.manual_seed(0)
    model = restuning.get_restuning_model(build().eval(), BypassConfig(num_classes=int(labels.max()) + 1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(0)
    build_seconds, epoch_seconds, losses = 0.0, [], []
    model.train()
    for _ in range(epochs):
        stored = None
        if cache is not None:
            start = time.perf_counter()
            stored = cache.get(model, inputs)
            build_seconds += time.perf_counter() - start
        start = time.perf_counter()
        for index in torch.randperm(len(labels), generator=order).split(batch):
            if stored is not None:
                logits = model.forward_features(*stored.batch(index))
            else:
                logits = model(**{k: v[index] for k, v in inputs.items()})
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_seconds.append(time.perf_counter() - start)
    cache_bytes = sum(f.numel() * f.element_size() for f in stored.features) if stored is not None else None
    return {"epoch_seconds": epoch_seconds, "build_seconds": build_seconds, "losses": losses,
            "cache_bytes": cache_bytes, "first_token_only": model.task.first_token_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--examples", type=int, default=512, help="tweets (minilm)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per tweet (minilm)")
    parser.add_argument("--images", type=int, default=128, help="images (vit)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    results = {}
    for name in args.settings:
        build, inputs, labels = SETTINGS[name](args)
        recompute = train(build, inputs, labels, args.epochs, args.batch, cache=None)
        cached = train(build, inputs, labels, args.epochs, args.batch, cache=FeatureCache())
        results[name] = {
            "examples": len(labels), "recompute": recompute, "cached": cached,
            "speedup": median(recompute["epoch_seconds"]) / median(cached["epoch_seconds"]),
            "max_loss_difference": max(abs(a - b) for a, b in zip(recompute["losses"], cached["losses"], strict=True)),
        }

    print(f"bypass training epochs, batch {args.batch}, {args.epochs} epochs, medians")
    table(("setting", "examples", "recompute epoch s", "cached epoch s", "cache build s", "cache MiB", "speedup",
           "max |loss diff|"), [
        (name, r["examples"], f"{median(r['recompute']['epoch_seconds']):.3f}",
         f"{median(r['cached']['epoch_seconds']):.3f}", f"{r['cached']['build_seconds']:.2f}",
         f"{r['cached']['cache_bytes'] / 2**20:.1f}", f"{r['speedup']:.1f}x", f"{r['max_loss_difference']:.1e}")
        for name, r in results.items()
    ])
    meta = {"epochs": args.epochs, "batch": args.batch, "tokens": args.tokens, **machine()}
    write_json(args.json, {"meta": meta, "speedup": min(r["speedup"] for r in results.values()),
                           "speedup_basis": "the smallest speedup over the settings run", "settings": results})


if __name__ == "__main__":
    main()
