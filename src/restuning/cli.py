"""The `restuning` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import ResTuningConfig, get_restuning_model
    from .assets import minilm
    from .bound import compare_forms

    model, tokenizer = minilm()
    model.eval()
    sentences = ["The backbone stays frozen.", "Only a few hundred thousand weights learn, in parallel to it."]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
    print("all-MiniLM-L6-v2 with ResTuningConfig() (Res-Adapter of width 10 on every MHA and FFN):")
    tuned = get_restuning_model(model, ResTuningConfig())
    tuned.print_trainable_parameters()
    with torch.no_grad():
        step0 = (tuned(**inputs).last_hidden_state - reference).abs().max().item()
    print(f"output at step 0 vs frozen backbone: max |diff| = {step0:.2e}")
    model = tuned.unload()
    print("\nExact unbinding on MiniLM (bound original vs unbound Res-Tuner, float32, padded batch):")
    print(f"{'form':<9}{'max |out diff|':>16}{'max |grad diff|':>17}")
    for form in ("prefix", "prompt", "adapter"):
        r = compare_forms(model, inputs, form)
        print(f"{form:<9}{r.output_diff:>16.2e}{r.grad_diff:>17.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restuning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="attach Res-Tuners to the shipped MiniLM and check exact unbinding, offline")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
