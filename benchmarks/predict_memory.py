"""Peak memory of `restuning predict` as the number of inputs grows: it streams its inputs in batches, so
the process peak should stay flat.

Trains one small MiniLM bypass run on the shipped tweets (or takes `--run`), then for each N answers N
tweets with `restuning.train.predict.predict` in a fresh process and reports the process peak (ru_maxrss)
and its ratio to the smallest N's.

    python benchmarks/predict_memory.py --json out/predict_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import machine, table, write_json

CHILD = """
import json, resource, sys
from restuning.data import tweets
from restuning.train.predict import predict
n, run, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
texts = (tweets().inputs * (n // 1000 + 1))[:n]
answers = predict([run], texts=texts, batch_size=batch)
assert len(answers[run]) == n
print(json.dumps({"inputs": n, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def train_run(root: Path) -> Path:
    from restuning.train.config import DataConfig, MethodConfig, OptimConfig, TrainConfig
    from restuning.train.trainer import Trainer

    config = TrainConfig(backbone="all-MiniLM-L6-v2", method=MethodConfig(name="bypass"),
                         data=DataConfig(name="tweets", train_size=200, test_size=100, max_length=32),
                         optim=OptimConfig(lr=1e-2, epochs=1, warmup_epochs=0.0), output_dir=str(root / "run"))
    Trainer(config, progress=False).run()
    return Path(config.output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run (default: train a small MiniLM bypass run)")
    parser.add_argument("--inputs", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp))
        rows = []
        for n in args.inputs:
            done = subprocess.run([sys.executable, "-c", CHILD, str(n), str(run), str(args.batch_size)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_bytes"]
    for row in rows:
        row["ratio_to_smallest"] = row["peak_rss_bytes"] / base
    table(["inputs", "peak MiB", "ratio"], [[r["inputs"], f"{r['peak_rss_bytes'] / 2**20:,.0f}",
                                             f"{r['ratio_to_smallest']:.3f}"] for r in rows])
    write_json(args.json, {"rows": rows, "batch_size": args.batch_size, **machine()})


if __name__ == "__main__":
    main()
