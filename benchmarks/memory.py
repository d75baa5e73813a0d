"""Training memory of one step, per method: full fine-tuning, linear probing, Res-Tuning (Dual
Res-Adapters), Res-Tuning-Bypass (as configured by default: CLS head, so the bypass runs on the CLS
token alone, and each bypass step is recomputed in backward; then on every token with a mean-pooled
head; then on every token without recomputing) and PEFT's LoRA (rank 8 on query/value), on a
ViT-B/16 (random weights; memory does not depend on them), 224 px, batch 32, AdamW, 100 classes.

Methods that read a frozen backbone also run with it held in bfloat16 and in int8 weight-only
(`backbone_dtype`; rows `method@bfloat16`, `method@int8`; trainable weights and AdamW stay float32).

Each method runs in its own process so that the process peak (ru_maxrss) is its own. Reported per
method: bytes autograd saves for backward (saved_tensors_hooks, parameters excluded), parameter +
gradient + optimizer bytes, the process peak, CUDA max_memory_allocated on a GPU, the step time, and
each method's ratio to full fine-tuning (on the peak, and on the saved activations).

    python benchmarks/memory.py --json out/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _report import keep_freed_memory, machine, median, table, write_json
from torch import nn

# Row -> (registered method, its options). The bypass by default has a CLS head, so it runs on the CLS token
# alone (exact); `all_tokens` pools the mean, which makes it run on every token, as in the paper;
# `no_recompute` also keeps every bypass activation for backward; `backbone_batch_8` runs the frozen forward 8
# examples at a time (the same features; smaller transient activations); `attention_pool` reads every token through
# a learned query; `reinject_2` runs the last two blocks again on the bypass state, with autograd.
METHODS = {
    "full": ("full", {}),
    "linear": ("linear", {}),
    "restuning": ("restuning", {}),
    "bypass": ("bypass", {}),
    "bypass_backbone_batch_8": ("bypass", {"backbone_batch": 8}),
    "bypass_keep_freed": ("bypass", {}),  # without handing freed host memory back after each frozen chunk
    "bypass_all_tokens": ("bypass", {"pooling": "mean"}),
    "bypass_no_recompute": ("bypass", {"pooling": "mean", "recompute": False}),
    "bypass_attention_pool": ("bypass", {"pooling": "attention"}),
    "bypass_reinject_2": ("bypass", {"reinject": 2}),
    "bypass_attention_reinject_2": ("bypass", {"pooling": "attention", "reinject": 2}),
    "bypass_softmax": ("bypass", {"combine": "softmax", "vertical": None}),
    "bypass_token_mixer": ("bypass", {"horizontal": "res_token_mixer"}),
    "peft_lora": ("peft_lora", {"target_modules": ["q_proj", "v_proj"]}),
    "side_tuning": ("side_tuning", {}),
    "lst": ("lst", {}),
    "dtl": ("dtl", {}),
    "dtl_plus": ("dtl_plus", {}),
}
NUM_CLASSES = 100


def _backbone(image_size: int, layers: int, device: str, dtype: str = "float32") -> nn.Module:
    """A ViT-B/16 of `layers` blocks with random weights, allocated in place as `from_pretrained` loads one (on
    the meta device, then storage of the final dtype filled in place), in bfloat16 for a low-precision `dtype`:
    neither a float32 copy nor the initialisers' temporaries count in the peak."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=image_size, patch_size=16, num_hidden_layers=layers, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32 if dtype == "float32" else torch.bfloat16)
    try:
        with torch.device("meta"):
            model = ViTModel(config, add_pooling_layer=False)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm):
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.normal_(0.0, 0.02)
    return model


def build(method: str, image_size: int, layers: int, device: str, dtype: str = "float32") -> nn.Module:
    """The classifier a run of `method` trains (`restuning.methods`), on a ViT-B/16 of `layers` blocks held in
    `dtype`."""
    from restuning.methods import build_classifier
    from restuning.precision import set_backbone_dtype

    name, options = METHODS[method]
    backbone = set_backbone_dtype(_backbone(image_size, layers, device, dtype), dtype)
    model = build_classifier(name, backbone, NUM_CLASSES, options)
    return keep_freed_memory(model) if method == "bypass_keep_freed" else model


def supports(method: str, dtype: str) -> bool:
    from restuning.methods import get_method

    return dtype == "float32" or get_method(METHODS[method][0]).low_precision


def measure(method: str, batch: int, image_size: int, layers: int, device: str, dtype: str = "float32") -> dict:
    """One AdamW step of `method` (the training loop's AdamW); run in a fresh process."""
    from restuning.memory import SavedTensorMeter, state_bytes
    from restuning.train.optim import adamw

    model = build(method, image_size, layers, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedTensorMeter(model.parameters()) as meter:
        loss = nn.functional.cross_entropy(model(pixel_values=x), y)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    states = state_bytes(model, optimizer)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "method": method,
        "dtype": dtype,
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params": sum(p.numel() for p in frozen),
        "saved_activation_bytes": meter.bytes,
        "parameter_bytes": states["parameters"],
        "gradient_bytes": states["gradients"],
        "optimizer_bytes": states["optimizer"],
        "param_grad_optim_bytes": states["parameters"] + states["gradients"] + states["optimizer"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "step_seconds": seconds,
    }


def _run_worker(method: str, dtype: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--dtype", dtype, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--layers", str(args.layers), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(method: str, dtype: str) -> str:
    return method if dtype == "float32" else f"{method}@{dtype}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, default=12, help="ViT-B/16 depth (12)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per method; medians reported")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                        choices=["float32", "bfloat16", "int8"], help="backbone dtypes, for the methods that take them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.image_size, args.layers, args.device, args.dtype)))
        return

    methods = ["full", *[m for m in args.methods if m != "full"]]
    cells = [(m, d) for m in methods for d in ["float32", *[d for d in args.dtypes if d != "float32"]]
             if supports(m, d) and (d == "float32" or d in args.dtypes)]
    runs = {_row(m, d): [] for m, d in cells}
    for _ in range(args.repeats):  # the process peak varies run to run (allocator): take the median
        for m, d in cells:
            runs[_row(m, d)].append(_run_worker(m, d, args))
    rows = {}
    for m, results in runs.items():
        peaks = sorted(r["peak_rss_bytes"] for r in results)
        rows[m] = {**results[0], "peak_rss_bytes": median(peaks), "peak_rss_all": peaks,  # byte counts are exact
                   "step_seconds": median([r["step_seconds"] for r in results])}
    full = rows["full"]
    for row in rows.values():
        row["ratio_to_full"] = row["peak_rss_bytes"] / full["peak_rss_bytes"]
        row["saved_activation_ratio_to_full"] = row["saved_activation_bytes"] / full["saved_activation_bytes"]
        if row["cuda_max_allocated_bytes"] is not None:
            row["cuda_ratio_to_full"] = row["cuda_max_allocated_bytes"] / full["cuda_max_allocated_bytes"]

    print(f"ViT-B/16 x{args.layers}, {args.image_size} px, batch {args.batch}, one AdamW step on {args.device}; "
          f"medians of {args.repeats} processes per method")
    header = ("method", "trainable", "saved act MiB", "param+grad+optim MiB", "peak MiB", "peak/full", "act/full",
              "cuda MiB", "step s")
    table(header, [
        (name, f"{r['trainable_params']:,d}", _mib(r["saved_activation_bytes"]),
         _mib(r["param_grad_optim_bytes"]), _mib(r["peak_rss_bytes"]), f"{r['ratio_to_full']:.3f}",
         f"{r['saved_activation_ratio_to_full']:.4f}",
         _mib(r["cuda_max_allocated_bytes"]), f"{r['step_seconds']:.2f}")
        for name, r in rows.items()
    ])
    meta = {"repeats": args.repeats, "batch": args.batch, "image_size": args.image_size, "layers": args.layers,
            "device": args.device, **machine(),
            "ratio_basis": "ratio_to_full is on the median process peak (ru_maxrss) over --repeats fresh processes"}
    write_json(args.json, {"meta": meta, "methods": rows})

if __name__ == "__main__":
    main()
