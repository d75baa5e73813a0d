"""Epoch time of Res-Tuning-Bypass training from the feature cache against recomputing the backbone.

The shipped all-MiniLM-L6-v2 on the shipped tweet-sentiment set (positive/negative, confidence >= 0.8,
a seeded sample of --examples tweets, 32 tokens). Both runs train the same bypass (Dual Res-Adapters,
2 classes) with AdamW from the same seed over the same batches; the cached run builds the store once
(timed apart) and then trains from it. `speedup` = median recompute epoch / median cached epoch. The
losses of the two runs are compared too.

    python benchmarks/feature_cache.py --json out/feature_cache.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import machine, median, table, write_json

import restuning
from restuning import BypassConfig, FeatureCache
from restuning.assets import minilm, tweet_sentiment


def _data(examples: int, tokens: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    texts, labels = tweet_sentiment()
    pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:examples].tolist()
    _, tokenizer = minilm()
    batch = tokenizer([texts[i] for i in pick], padding="max_length", truncation=True, max_length=tokens,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, torch.tensor(
        [labels[i] for i in pick])


def train(inputs: dict, labels: torch.Tensor, epochs: int, batch: int, cache: FeatureCache | None) -> dict:
    torch.manual_seed(0)
    backbone, _ = minilm()
    model = restuning.get_restuning_model(backbone.eval(), BypassConfig(num_classes=2))
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
    return {"epoch_seconds": epoch_seconds, "build_seconds": build_seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    inputs, labels = _data(args.examples, args.tokens)
    recompute = train(inputs, labels, args.epochs, args.batch, cache=None)
    cached = train(inputs, labels, args.epochs, args.batch, cache=FeatureCache())
    speedup = median(recompute["epoch_seconds"]) / median(cached["epoch_seconds"])
    loss_diff = max(abs(a - b) for a, b in zip(recompute["losses"], cached["losses"], strict=True))

    print(f"MiniLM bypass, {args.examples} tweets x {args.tokens} tokens, batch {args.batch}, {args.epochs} epochs")
    table(("run", "median epoch s", "cache build s", "first loss", "last loss"), [
        ("recompute backbone", f"{median(recompute['epoch_seconds']):.3f}", "-",
         f"{recompute['losses'][0]:.4f}", f"{recompute['losses'][-1]:.4f}"),
        ("from feature cache", f"{median(cached['epoch_seconds']):.3f}", f"{cached['build_seconds']:.2f}",
         f"{cached['losses'][0]:.4f}", f"{cached['losses'][-1]:.4f}"),
    ])
    print(f"speedup {speedup:.1f}x; max |loss difference| between the runs {loss_diff:.2e}")
    meta = {"examples": args.examples, "tokens": args.tokens, "epochs": args.epochs, "batch": args.batch, **machine()}
    write_json(args.json, {"meta": meta, "speedup": speedup, "max_loss_difference": loss_diff,
                           "recompute": recompute, "cached": cached})


if __name__ == "__main__":
    main()
