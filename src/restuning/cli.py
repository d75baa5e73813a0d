"""The `restuning` command line: train, eval and demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value, e.g. optim.epochs=2")
        out[key] = yaml.safe_load(value)
    return out


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .train.config import load_config
    from .train.loop import train

    try:
        config = load_config(args.config, _overrides(args.set))
    except ConfigError as err:
        print(f"error in {args.config}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(train(config, progress=not args.no_progress)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train.evaluate import evaluate_run

    print(json.dumps(evaluate_run(Path(args.run), args.data)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .train.predict import predict

    if bool(args.text) == bool(args.images):
        print("predict: give either --text or --images", file=sys.stderr)
        return 2
    images = [Path(p) for p in args.images] if args.images else None
    print(json.dumps(predict([Path(r) for r in args.runs], texts=args.text or None, images=images), indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_runs

    print(f"wrote {plot_runs([Path(r) for r in args.runs], Path(args.out))}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, quick=args.quick, json_path=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restuning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a run described by a YAML config (see examples/)")
    train.add_argument("--config", required=True, help="YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.epochs=2")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="top-1 accuracy of a finished run")
    ev.add_argument("--run", required=True, help="the run's output_dir")
    ev.add_argument("--data", default=None, help="a shipped set to evaluate on instead of the run's test split")
    ev.set_defaults(func=_eval)
    pr = sub.add_parser("predict", help="answer several bypass runs' tasks with one backbone forward")
    pr.add_argument("--runs", nargs="+", required=True, help="output_dirs of bypass runs on one backbone")
    pr.add_argument("--text", nargs="*", help="texts to classify")
    pr.add_argument("--images", nargs="*", help="image files to classify")
    pr.set_defaults(func=_predict)
    pl = sub.add_parser("plot", help="accuracy against trainable parameters and memory (paper Fig. 4), PNG")
    pl.add_argument("--runs", nargs="+", required=True, help="finished runs' output_dirs")
    pl.add_argument("--out", default="plot.png")
    pl.set_defaults(func=_plot)
    demo = sub.add_parser("demo", help="MiniLM on tweets and DINOv2-small on MNIST: linear, Res-Tuning, Bypass")
    demo.add_argument("--json", type=Path, help="write the table here as JSON")
    demo.add_argument("--quick", action="store_true", help="smaller data and 2 epochs")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
