"""Time of the bypass's frozen forward in chunks (`backbone_tokens`) against the whole batch at once.

The frozen backbone runs without autograd, so its chunks give the whole batch's features while its transient
activations shrink with the chunk (benchmarks/memory.py measures the peaks). This measures what the chunks
cost in time: `model.features(**inputs)` of a bypass model (mean pooling, so every token is tapped) for each
`backbone_tokens` bound, with and without handing the freed host memory back (`release_host_memory`:
`restuning.precision.release_freed_memory`, before the forward, after each chunk and between tapped blocks where
the resident set grew by `hand_back_growth`), all interleaved call by call in one process (so each sees the
same machine), timed in process CPU time (every thread's; other processes do not count), medians of --repeats
after one warm-up round. Settings (random weights: time does not depend on them; batch 32):
- `vit_bf16`, `vit_int8`, `vit_fp32`: ViT-B/16 at 224 px (197 tokens an image), held in bfloat16 / int8 /
  float32.
- `minilm_32`, `minilm_128`: the shipped all-MiniLM-L6-v2 on random token ids, 32 / 128 tokens.
- `resnet50`: transformers' ResNet-50 at 224 px (x_0, the stem's output, is 56 x 56 positions).

    python benchmarks/backbone_chunks.py --json out/backbone_chunks.json
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
from restuning import BypassConfig
from restuning.precision import set_backbone_dtype

BOUNDS = (None, 4096, 2048, 1024, 512)  # None: the whole batch


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=224, patch_size=16)
    config._attn_implementation = "sdpa"
    return ViTModel(config, add_pooling_layer=False)


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig())  # ResNet-50's configuration


def _minilm() -> nn.Module:
    from restuning.assets import minilm

    return minilm()[0]


def _images(batch: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))}


def _tokens(tokens: int) -> Callable[[int], dict[str, torch.Tensor]]:
    def inputs(batch: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (batch, tokens), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return inputs


# setting -> (backbone, its dtype, inputs of a batch)
SETTINGS: dict[str, tuple[Callable[[], nn.Module], str, Callable[[int], dict[str, torch.Tensor]]]] = {
    "vit_bf16": (_vit, "bfloat16", _images),
    "vit_int8": (_vit, "int8", _images),
    "vit_fp32": (_vit, "float32", _images),
    "minilm_32": (_minilm, "float32", _tokens(32)),
    "minilm_128": (_minilm, "float32", _tokens(128)),
    "resnet50": (_resnet, "float32", _images),
}


def measure(name: str, batch: int, repeats: int) -> dict:
    build, dtype, make_inputs = SETTINGS[name]
    torch.manual_seed(0)
    backbone = build().eval()
    if dtype != "float32":
        backbone = set_backbone_dtype(backbone.to(torch.bfloat16), dtype)
    model = restuning.get_restuning_model(backbone, BypassConfig(num_classes=10, pooling="mean"))
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and dtype != "float32" else v
              for k, v in make_inputs(batch).items()}
    variants = [(bound, release) for bound in BOUNDS for release in (True, False)]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    chunks: dict[int | None, list[int]] = {}
    calls: list[int] = []  # the batch of each backbone call
    model.base_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(len(next(iter(k.values())) if k else a[0])), with_kwargs=True)
    for round_ in range(repeats + 1):  # round 0 warms up (and counts an example's positions, once)
        for bound, release in variants:
            model.backbone_tokens, model.release_host_memory = bound, release
            del calls[:]
            start = time.process_time()
            x_0 = model.features(**inputs)[0]
            if round_:
                times[bound, release].append(time.process_time() - start)
                chunks[bound] = list(calls)
    positions = x_0[0, :, 0].numel() if model.plan.layout == "tokens" else x_0[0, 0].numel()
    whole = {release: median(times[None, release]) for release in (True, False)}
    return {"dtype": dtype, "batch": batch, "positions_per_example": positions, "rows": [
        {"backbone_tokens": bound, "release_host_memory": release, "examples_per_chunk": max(chunks[bound]),
         "chunks": len(chunks[bound]), "cpu_seconds": times[bound, release],
         "median_cpu_seconds": median(times[bound, release]),
         "ratio_to_whole_batch": median(times[bound, release]) / whole[release],
         "ratio_to_keeping_freed": median(times[bound, release]) / median(times[bound, False])}
        for bound, release in variants]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    results = {name: measure(name, args.batch, args.repeats) for name in args.settings}
    print(f"frozen no-grad forward, batch {args.batch}, bounds interleaved, process CPU time, medians of "
          f"{args.repeats}")
    table(("setting", "dtype", "positions/example", "backbone_tokens", "examples/chunk", "hands freed memory back",
           "CPU s", "ratio to whole", "ratio to keeping it"),
          [(name, r["dtype"], r["positions_per_example"], row["backbone_tokens"] or "whole batch",
            row["examples_per_chunk"], row["release_host_memory"], f"{row['median_cpu_seconds']:.3f}",
            f"{row['ratio_to_whole_batch']:.2f}", f"{row['ratio_to_keeping_freed']:.2f}")
           for name, r in results.items() for row in r["rows"]])
    meta = {"batch": args.batch, "repeats": args.repeats, "clock": "process_time", "interleaved": True, **machine()}
    write_json(args.json, {"meta": meta, "method": "bypass", "settings": results})


if __name__ == "__main__":
    main()
