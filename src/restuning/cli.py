"""The `restuning` command line: train, eval, predict, serve, plot, demo and config; diffusion-train, generate
and fd."""

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


def _load(loader, args: argparse.Namespace):
    """`loader(args.config, --set overrides)`, or None after printing the config error."""
    from .config import ConfigError

    try:
        return loader(args.config, _overrides(args.set))
    except ConfigError as err:
        print(f"error in {args.config}: {err}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    from .errors import RestuningError, TrainingError
    from .train.config import load_config
    from .train.trainer import train

    config = _load(load_config, args)
    if config is None:
        return 2
    try:
        result = train(config, progress=not args.no_progress, allow_changes=tuple(args.allow_change))
    except RestuningError as err:  # a run folder in use or of another config, a damaged checkpoint, divergence
        print(f"train: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    print(json.dumps(result))
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


SERVE_FLAGS = ("runs", "host", "port", "task_root", "api_key", "replicas", "max_batch_size", "max_wait_ms")


def _serve(args: argparse.Namespace) -> int:
    import os

    from .serve import load_serve_config, start

    overrides = _overrides(args.set)
    overrides.update({k: getattr(args, k) for k in SERVE_FLAGS if getattr(args, k) is not None})
    if "api_key" not in overrides and os.environ.get("RESTUNING_API_KEY"):
        overrides["api_key"] = os.environ["RESTUNING_API_KEY"]
    config = load_serve_config(args.config, overrides)
    print(f"starting the service for {len(config.runs) or 'the demo'} run(s) ...", flush=True)
    info = start(config)
    for name, why in info["refused"].items():
        print(f"refused {name}: {why}", file=sys.stderr)
    tasks = {b: sorted(t) for b, t in info["backbones"].items()}
    print(f"serving {json.dumps(tasks)} at {info['url']} (API: {info['url']}/docs); Ctrl-C stops", flush=True)
    import time

    from .serve import stop

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("stopping the service ...", file=sys.stderr, flush=True)
        stop()
    return 0


def _config(args: argparse.Namespace) -> int:
    from .config_reference import reference

    sys.stdout.write(reference(args.format, args.method))
    return 0


def _diffusion_train(args: argparse.Namespace) -> int:
    from .diffusion.train import DiffusionTrainer
    from .diffusion.train_config import load_diffusion_config
    from .errors import RestuningError, TrainingError
    from .ops import OpMatchError

    config = _load(load_diffusion_config, args)
    if config is None:
        return 2
    try:  # setting up: what the config asks of the model and the data is checked here (no training yet)
        trainer = DiffusionTrainer(config, progress=not args.no_progress, allow_changes=tuple(args.allow_change))
    except (ValueError, OpMatchError, RestuningError) as err:  # also PEFT's and the tuners' errors; RunError
        print(f"diffusion-train: {err}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except RestuningError as err:
        print(f"diffusion-train: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    print(json.dumps(result))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .diffusion.generate import generate, load_for_generation
    from .ops import OpMatchError

    for name in ("steps", "num_per_prompt", "batch_size", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"generate: --{name.replace('_', '-')}: expected a positive integer, got {value}", file=sys.stderr)
            return 2
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            print(f"generate: --prompts-file: {err}", file=sys.stderr)
            return 2
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        print("generate: give --prompt TEXT (repeatable) or --prompts-file", file=sys.stderr)
        return 2
    try:
        components, denoiser, tasks = load_for_generation(args.run or [], args.model)
    except (ConfigError, CheckpointError, OpMatchError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    device = args.device or _default_device()
    components.to(device)
    if denoiser is not None:
        denoiser.to(device)
    task_ids = None
    if tasks is not None:  # several bypass runs: prompt i goes to run i, or one prompt to every run
        if len(prompts) == 1:
            prompts = prompts * len(tasks)
        if len(prompts) != len(tasks):
            print(f"generate: {len(tasks)} runs need one prompt each or a single prompt, got {len(prompts)}",
                  file=sys.stderr)
            return 2
        task_ids = tasks
    prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
    task_ids = None if task_ids is None else [t for t in task_ids for _ in range(args.num_per_prompt)]
    try:
        generate(components, prompts, denoiser=denoiser, seeds=args.seed, steps=args.steps, guidance=args.guidance,
                 height=args.height, width=args.width, task_ids=task_ids, batch_size=args.batch_size,
                 out_dir=args.out, progress=not args.no_progress)
    except ValueError as err:  # arguments that only the model can check (the image size)
        print(f"generate: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"images": len(prompts), "out": str(args.out)}))
    return 0


def _fd(args: argparse.Namespace) -> int:
    from .diffusion.metrics import FIDUnavailable, fd_dinov2, fid, load_image_folder

    device = args.device or _default_device()
    try:
        generated = load_image_folder(args.generated, args.crop)
        reference = load_image_folder(args.reference, args.crop)
        if args.features == "dinov2":
            value = fd_dinov2(generated, reference, size=args.size, batch_size=args.batch_size, device=device)
        else:
            value = fid(generated, reference, args.inception, batch_size=args.batch_size, device=device)
    except (FIDUnavailable, ValueError) as err:
        print(f"fd: {err}", file=sys.stderr)
        return 2
    name = "fd_dinov2" if args.features == "dinov2" else "fid"
    print(json.dumps({name: value, "generated": len(generated), "reference": len(reference)}))
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_command(sub, name: str, func, help: str, config_help: str, set_help: str) -> None:
    """A subcommand that runs a YAML run config: --config, --set KEY=VALUE overrides, --allow-change KEY,
    --no-progress."""
    command = sub.add_parser(name, help=help)
    command.add_argument("--config", required=True, help=config_help)
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    command.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                         help="a dotted config key (e.g. optim.epochs) that may differ from the config saved in "
                              "output_dir when a run is started again (repeatable)")
    command.add_argument("--no-progress", action="store_true")
    command.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restuning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_command(sub, "train", _train, "train a run described by a YAML config (see examples/)", "YAML file",
                 "override, e.g. optim.epochs=2")
    ev = sub.add_parser("eval", help="top-1 accuracy of a finished run")
    ev.add_argument("--run", required=True, help="the run's output_dir")
    ev.add_argument("--data", default=None, help="evaluate on this instead of the run's test split: a shipped set "
                    "(mnist, digits, tweets), a CSV/JSONL table of texts or a folder of images per class")
    ev.set_defaults(func=_eval)
    pr = sub.add_parser("predict", help="class names from finished runs; bypass runs on one backbone share one "
                        "backbone forward")
    pr.add_argument("--runs", nargs="+", required=True, help="output_dirs of finished runs")
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
    srv = sub.add_parser("serve", help="finished runs as an HTTP service (Ray Serve): bypass tasks on one backbone "
                         "share its forward, batched across requests")
    srv.add_argument("--runs", nargs="+", help="finished runs' folders (name=folder names a task); default: "
                     "the runs `restuning demo` left in runs/demo")
    srv.add_argument("--config", help="a YAML file of the service's keys (restuning config lists them)")
    srv.add_argument("--host", help="default 127.0.0.1")
    srv.add_argument("--port", type=int, help="default 8000")
    srv.add_argument("--task-root", help="POST /v1/tasks adds runs from under this folder (default: here)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set RESTUNING_API_KEY)")
    srv.add_argument("--replicas", type=int, help="copies of each backbone deployment")
    srv.add_argument("--max-batch-size", type=int, help="inputs per backbone forward at most")
    srv.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other key")
    srv.set_defaults(func=_serve)
    ref = sub.add_parser("config", help="every key of the run configs and of each method's options: type, default, "
                         "meaning (docs/configuration.md is its --format markdown)")
    ref.add_argument("--method", help="only this method's options (and the tuners)")
    ref.add_argument("--format", choices=("text", "markdown"), default="text")
    ref.set_defaults(func=_config)
    _run_command(sub, "diffusion-train", _diffusion_train, "text-to-image fine-tuning of a diffusion UNet (YAML "
                 "config)", "YAML file (see examples/diffusion_mnist_restuning.yaml)", "e.g. optim.max_steps=10")
    gen = sub.add_parser("generate", help="sample images (PLMS, classifier-free guidance) from a base model or runs")
    gen.add_argument("--run", action="append", help="a diffusion-train output_dir; several bypass runs share one "
                     "UNet forward per step (multi-task), prompt i going to run i")
    gen.add_argument("--model", help="sample from a base model instead: 'tiny' or a Stable Diffusion folder")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--num-per-prompt", type=int, default=1)
    gen.add_argument("--steps", type=int, default=50, help="PLMS steps (default 50)")
    gen.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    gen.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--out", default="samples", help="folder for the PNGs and prompts.jsonl")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=_generate)
    fd = sub.add_parser("fd", help="Frechet distance between two image folders: FD-DINOv2 (offline) or FID")
    fd.add_argument("--generated", required=True, help="folder of generated images")
    fd.add_argument("--reference", required=True, help="folder of reference images")
    fd.add_argument("--features", choices=("dinov2", "inception"), default="dinov2")
    fd.add_argument("--inception", help="TorchScript Inception-v3 feature extractor (for --features inception)")
    fd.add_argument("--size", type=int, default=224, help="DINOv2 input size, a multiple of 14")
    fd.add_argument("--crop", type=int, help="centre-crop all images to this square first (mixed sizes)")
    fd.add_argument("--batch-size", type=int, default=32)
    fd.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    fd.set_defaults(func=_fd)
    args = parser.parse_args(argv)
    from .errors import RestuningError

    try:
        return args.func(args)
    except RestuningError as err:  # bad config, data, checkpoint or run folder: a message, not a traceback
        print(f"{args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
