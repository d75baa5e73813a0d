"""Multi-task inference: one `MultiTaskBypass` (one backbone forward, T bypass tasks) against T separate
Res-Tuning models (Dual Res-Adapters), each running its own backbone forward, on the same inputs.

ViT-B/16 with random weights (time does not depend on them). For T = 1, 5 and 19 tasks the two are
timed alternately, and `ratio` = median multi-task time / median separate time. The bypass heads read
the CLS token by default, so each bypass runs on that token alone (exact); `--pooling mean` makes
every bypass run on every token.

    python benchmarks/multitask.py --json out/multitask.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from _report import machine, median, seconds, table, write_json
from torch import nn

import restuning
from restuning import BypassConfig, MultiTaskBypass, ResTuningConfig

NUM_CLASSES = 10


class _TunedClassifier(nn.Module):
    """One separate task: a Res-Tuning model on its own backbone copy and a linear head on the CLS token."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.tuned = restuning.get_restuning_model(backbone, ResTuningConfig())
        for tuner in self.tuned.tuners.values():  # trained-looking weights, so no branch is skipped
            nn.init.normal_(tuner.up.weight, std=0.02)
        self.head = nn.Linear(backbone.config.hidden_size, NUM_CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tuned(pixel_values=pixel_values).last_hidden_state[:, 0])


def _backbone(image_size: int, layers: int) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=image_size, patch_size=16, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return ViTModel(config, add_pooling_layer=False).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 19])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pooling", default="auto", choices=["auto", "mean"],
                        help="auto: CLS head, the bypass runs on the CLS token; mean: on every token")
    args = parser.parse_args()

    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    backbone = _backbone(args.image_size, args.layers)
    rows = []
    for t in args.tasks:
        multi = MultiTaskBypass(copy.deepcopy(backbone))
        for i in range(t):
            multi.add_task(f"task{i}", BypassConfig(num_classes=NUM_CLASSES, pooling=args.pooling))
        separate = [_TunedClassifier(copy.deepcopy(backbone)).eval() for _ in range(t)]
        multi.eval()

        def run_multi(multi=multi):
            with torch.no_grad():
                return multi(pixel_values=x)

        def run_separate(separate=separate):
            with torch.no_grad():
                return [model(pixel_values=x) for model in separate]

        run_multi()
        run_separate()
        multi_times, separate_times = [], []
        for _ in range(args.repeats):  # alternate, so that drifts of the machine hit both
            multi_times += seconds(run_multi, 1, warmup=False)
            separate_times += seconds(run_separate, 1, warmup=False)
        rows.append({"tasks": t, "multi_seconds": median(multi_times), "separate_seconds": median(separate_times),
                     "ratio": median(multi_times) / median(separate_times),
                     "multi_all": multi_times, "separate_all": separate_times})
        del multi, separate

    print(f"ViT-B/16 x{args.layers}, {args.image_size} px, batch {args.batch}, inference, median of {args.repeats}")
    table(("tasks", "multi-task bypass s", "separate Res-Tuning s", "ratio"),
          [(r["tasks"], f"{r['multi_seconds']:.3f}", f"{r['separate_seconds']:.3f}", f"{r['ratio']:.3f}")
           for r in rows])
    meta = {"pooling": args.pooling, "batch": args.batch, "image_size": args.image_size, "layers": args.layers,
            "repeats": args.repeats, **machine()}
    write_json(args.json, {"meta": meta, "ratio": {str(r["tasks"]): r["ratio"] for r in rows}, "rows": rows})


if __name__ == "__main__":
    main()
