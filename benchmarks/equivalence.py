"""Exact unbinding, measured: bound original vs unbound Res-Tuner for prefix, prompt (VPT-deep) and
adapter, on ViT-B/16- and BERT-shaped backbones (random weights) and the shipped MiniLM, under the
eager and SDPA attention implementations of transformers.

Prints the max abs differences of outputs and of tuner gradients (float32), and the time of one
forward+backward of each unbound form relative to its bound original (median of --repeats).

    python benchmarks/equivalence.py --json out/equivalence.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from restuning.testing.reference import compare_forms


def _vit(attn: str):
    cfg = ViTConfig(image_size=112, patch_size=16, num_hidden_layers=4)  # ViT-B/16 width, 4 blocks
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = ViTModel(cfg).eval()
    return model, {"pixel_values": torch.randn(4, 3, 112, 112)}


def _bert(attn: str):
    cfg = BertConfig(num_hidden_layers=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    mask = torch.ones_like(ids)
    mask[1:, 40:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _minilm(attn: str):
    from restuning.assets import minilm

    model, tok = minilm()
    model.config._attn_implementation = attn
    text = ["Res-Tuning unbinds tuners from the backbone.", "A short one.", "Padding matters here, too."]
    return model.eval(), dict(tok(text, padding=True, return_tensors="pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-minilm", action="store_true", help="skip the shipped MiniLM")
    args = parser.parse_args()
    models = {"vit-b16x4": _vit, "bert-basex4": _bert}
    if not args.no_minilm:
        models["minilm"] = _minilm
    rows = []
    print(f"{'model':<13}{'attn':<7}{'dtype':<9}{'form':<9}{'max|out diff|':>15}{'relative':>10}"
          f"{'max|grad diff|':>16}{'relative':>10}{'time unbound/bound':>20}")
    for name, build in models.items():
        for attn in ("eager", "sdpa"):
            model, inputs = build(attn)
            for dtype in (torch.float32, torch.float64):
                model = model.to(dtype)
                typed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
                for form in ("prefix", "prompt", "adapter"):
                    r = compare_forms(model, typed, form, repeats=args.repeats)
                    ratio = r.unbound_seconds / r.bound_seconds
                    dt = str(dtype).removeprefix("torch.")
                    rows.append(dict(model=name, attn=attn, dtype=dt, form=form, output_diff=r.output_diff,
                                     relative_output_diff=r.relative_output_diff, grad_diff=r.grad_diff,
                                     relative_grad_diff=r.relative_grad_diff, bound_seconds=r.bound_seconds,
                                     unbound_seconds=r.unbound_seconds, time_ratio=ratio))
                    print(f"{name:<13}{attn:<7}{dt:<9}{form:<9}{r.output_diff:>15.2e}{r.relative_output_diff:>10.1e}"
                          f"{r.grad_diff:>16.2e}{r.relative_grad_diff:>10.1e}{ratio:>20.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads())
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
