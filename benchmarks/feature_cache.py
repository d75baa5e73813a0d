"""Step time of Res-Tuning-Bypass training from the feature cache against recomputing the backbone.

Two settings, each trained both ways with the same bypass (Dual Res-Adapters), AdamW (the training loop's:
fused where torch has it), seed and batches:
- `minilm`: the shipped all-MiniLM-L6-v2 on the shipped tweet-sentiment set (positive/negative,
  confidence >= 0.8, a seeded sample of --examples tweets, 32 tokens); mean pooling, so the bypass
  runs on every token.
- `vit`: a ViT-B/16 (random weights; time does not depend on them) on --images random 224 px images,
  10 classes; CLS pooling, so the bypass runs (exactly) on the CLS token and the cache holds only it.
A third run trains from the same cache with the bypass read out step by step (`BypassTask.pooled_form = False`:
every full-width b_l made, as before the pooled form of restuning/bypass/pooled.py), to show what that form buys.
The runs are interleaved step by step (one recomputing step, then the cached steps on the same batch), so all
see the same machine; a step is timed in process CPU time (`time.process_time`: every thread's, so
other processes on the machine do not count), from the batch's gather (cache) or backbone forward to the
optimizer step. The cache is built once, timed apart. `speedup` = median recomputing step / median cached
step; the losses of the runs are compared too. The cached step's matrix-product FLOPs (forward and
backward, `torch.utils.flop_counter`) over its median time give its achieved GFLOP/s, printed beside a
square GEMM of the same FLOPs timed the same way in the same run.

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
from torch.utils.flop_counter import FlopCounterMode

import restuning
from restuning import BypassConfig, FeatureCache
from restuning.assets import minilm
from restuning.data import tweets
from restuning.train.optim import adamw, adamw_implementation


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


class Run:
    """One of the two runs of a setting: its model, optimizer, step times (CPU seconds) and losses."""

    def __init__(self, build: Callable[[], nn.Module], num_classes: int, compile_task: bool, pooled_form: bool = True):
        torch.manual_seed(0)
        self.model = restuning.get_restuning_model(build().eval(), BypassConfig(num_classes=num_classes))
        self.model.task.pooled_form = pooled_form
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, lr=1e-3, weight_decay=0.05)
        self.implementation = adamw_implementation(params)
        self.compiled = self.model.compile_task() if compile_task else None
        self.model.train()
        self.seconds: list[float] = []
        self.losses: list[float] = []

    def step(self, forward: Callable[[], torch.Tensor], labels: torch.Tensor) -> None:
        start = time.process_time()
        loss = nn.functional.cross_entropy(forward(), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.seconds.append(time.process_time() - start)
        self.losses.append(loss.item())


def step_flops(run: Run, stored, index: torch.Tensor, labels: torch.Tensor) -> int:
    """Matrix-product FLOPs of one cached step's forward and backward (the optimizer's are elementwise)."""
    counter = FlopCounterMode(display=False)
    features, mask = stored.batch(index)
    with counter:  # the eager task (a compiled one computes the same products)
        logits = run.model.task(features, mask, run.model.final_norm, recompute=False)
        nn.functional.cross_entropy(logits, labels[index]).backward()
    run.model.zero_grad()
    return counter.get_total_flops()


def _pooled(run: Run, stored) -> bool:
    """Whether the run's task reads the bypass out in its pooled form (`BypassTask.reads_pooled`)."""
    task = run.model.task
    return task.reads_pooled(task.chosen(stored.batch(torch.arange(1))[0]), run.model.final_norm)


def square_gemm(flops: int, repeats: int = 30) -> tuple[int, float]:
    """(n, median CPU seconds) of an (n, n) x (n, n) float32 product of about `flops` (2 n^3) FLOPs."""
    n = max(8, round((flops / 2) ** (1 / 3)))
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        times.append(time.process_time() - start)
    return n, median(times)


def measure(build: Callable[[], nn.Module], inputs: dict, labels: torch.Tensor, epochs: int, batch: int,
            compile_task: bool) -> dict:
    classes = int(labels.max()) + 1
    recompute, cached = Run(build, classes, False), Run(build, classes, compile_task)
    # The same cached run with the bypass read out step by step (full-width b_l), as before the pooled form.
    stepwise = Run(build, classes, compile_task, pooled_form=False)
    start = time.process_time()
    stored = FeatureCache().get(cached.model, inputs)
    build_seconds = time.process_time() - start
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=order).split(batch):
            recompute.step(lambda index=index: recompute.model(**{k: v[index] for k, v in inputs.items()}),
                           labels[index])
            for run in (cached, stepwise):
                run.step(lambda run=run, index=index: run.model.forward_features(*stored.batch(index)), labels[index])
    full = torch.arange(min(batch, len(labels)))
    flops = step_flops(cached, stored, full, labels)
    n, gemm_seconds = square_gemm(flops)
    cached_step = median(cached.seconds)
    return {
        "recompute": {"step_seconds": recompute.seconds, "losses": recompute.losses},
        "cached": {"step_seconds": cached.seconds, "losses": cached.losses, "build_seconds": build_seconds,
                   "cache_bytes": sum(f.numel() * f.element_size() for f in stored.features),
                   "first_token_only": cached.model.task.first_token_only,
                   "compiled": None if cached.compiled is None else cached.compiled.compiled},
        "cached_step_by_step": {"step_seconds": stepwise.seconds, "losses": stepwise.losses,
                                "pooled_form": _pooled(stepwise, stored)},
        "pooled_form": _pooled(cached, stored),
        "optimizer": cached.implementation,
        "speedup": median(recompute.seconds) / cached_step,
        "speedup_step_by_step": median(recompute.seconds) / median(stepwise.seconds),
        "max_loss_difference": max(abs(a - b) for run in (cached, stepwise)
                                   for a, b in zip(recompute.losses, run.losses, strict=True)),
        "step_gflop": flops / 1e9, "step_gflops_per_cpu_second": flops / 1e9 / cached_step,
        "square_gemm": {"n": n, "cpu_seconds": gemm_seconds, "gflops_per_cpu_second": 2 * n**3 / 1e9 / gemm_seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--examples", type=int, default=512, help="tweets (minilm)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per tweet (minilm)")
    parser.add_argument("--images", type=int, default=128, help="images (vit)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile the cached run's bypass task")
    args = parser.parse_args()

    results = {}
    for name in args.settings:
        build, inputs, labels = SETTINGS[name](args)
        results[name] = {"examples": len(labels), **measure(build, inputs, labels, args.epochs, args.batch,
                                                            args.compile)}

    print(f"bypass training steps, batch {args.batch}, {args.epochs} epochs, interleaved, process CPU time, medians")
    table(("setting", "examples", "recompute step ms", "cached step ms", "speedup", "pooled form",
           "step by step ms", "its speedup", "cache build s", "cache MiB",
           "step GFLOP", "step GFLOP/s", "square GEMM GFLOP/s (n)", "of GEMM", "max |loss diff|"), [
        (name, r["examples"], f"{1e3 * median(r['recompute']['step_seconds']):.1f}",
         f"{1e3 * median(r['cached']['step_seconds']):.2f}", f"{r['speedup']:.1f}x", r["pooled_form"],
         f"{1e3 * median(r['cached_step_by_step']['step_seconds']):.2f}", f"{r['speedup_step_by_step']:.1f}x",
         f"{r['cached']['build_seconds']:.2f}", f"{r['cached']['cache_bytes'] / 2**20:.1f}",
         f"{r['step_gflop']:.3f}", f"{r['step_gflops_per_cpu_second']:.1f}",
         f"{r['square_gemm']['gflops_per_cpu_second']:.1f} ({r['square_gemm']['n']})",
         f"{r['step_gflops_per_cpu_second'] / r['square_gemm']['gflops_per_cpu_second']:.2f}",
         f"{r['max_loss_difference']:.1e}")
        for name, r in results.items()
    ])
    print("GFLOP/s are per CPU second (process time counts every thread); the optimizer is "
          f"{next(iter(results.values()))['optimizer']} AdamW")
    meta = {"epochs": args.epochs, "batch": args.batch, "tokens": args.tokens, "clock": "process_time",
            "interleaved": True, "compile": args.compile, **machine()}
    write_json(args.json, {"meta": meta, "method": "bypass", "dtype": "float32",
                           "speedup": min(r["speedup"] for r in results.values()),
                           "speedup_basis": "the smallest median-step speedup over the settings run",
                           "settings": results})


if __name__ == "__main__":
    main()
