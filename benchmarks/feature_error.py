"""How far a low-precision frozen backbone moves its features from float32's.

For each shipped backbone, the last hidden state of a batch in float32 against the same backbone held in
bfloat16, in int8 as restuning holds it (`backbone_dtype: int8`: linear layers with one scale per 128 weights of
an output channel), and in int8 with one scale per output channel (torchao's `Int8WeightOnlyConfig()`, the
earlier default): relative error `||y - y_fp32|| / ||y_fp32||` over the batch.
- `dinov2`: DINOv2-small on 16 seeded random 112 px images (values in [0, 1]).
- `minilm`: all-MiniLM-L6-v2 on the first 16 shipped tweets, 32 tokens (padding masked out).

    python benchmarks/feature_error.py --json out/feature_error.json
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from _report import machine, table, write_json
from torch import nn

from restuning.precision import set_backbone_dtype


def _dinov2() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor | None]:
    from restuning.assets import dinov2_small

    images = torch.rand(16, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    return dinov2_small().eval(), {"pixel_values": images}, None


def _minilm() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor | None]:
    from restuning.assets import minilm
    from restuning.data import tweets

    model, tokenizer = minilm()
    batch = tokenizer(tweets().inputs[:16], padding="max_length", truncation=True, max_length=32,
                      return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model.eval(), inputs, batch["attention_mask"]


SETTINGS: dict[str, Callable[[], tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor | None]]] = {
    "dinov2": _dinov2, "minilm": _minilm}


def _per_channel_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())  # every nn.Linear, one scale per output channel
    return model


HOLDINGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "bfloat16": lambda m: m,
    "int8": lambda m: set_backbone_dtype(m, "int8"),
    "int8, one scale per output channel": _per_channel_int8,
}


def measure(name: str) -> dict[str, float]:
    model, inputs, mask = SETTINGS[name]()
    keep = 1.0 if mask is None else mask[..., None].float()
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state * keep
        errors = {}
        for holding, hold in HOLDINGS.items():
            low = hold(copy.deepcopy(model).to(torch.bfloat16))
            cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
            out = low(**cast).last_hidden_state.float() * keep
            errors[holding] = ((out - reference).norm() / reference.norm()).item()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    results = {name: measure(name) for name in args.settings}
    print("relative change of the last hidden state against float32")
    table(("backbone", *HOLDINGS), [(name, *(f"{100 * e[h]:.2f}%" for h in HOLDINGS)) for name, e in results.items()])
    write_json(args.json, {"meta": machine(), "relative_error": results})


if __name__ == "__main__":
    main()
