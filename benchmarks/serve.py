"""Load test of `restuning serve`: T bypass tasks on one shipped backbone, answered by the shared-forward
service against the same service running one backbone forward per task (each task on its own backbone
copy: what T separate per-task services would compute), in the same Ray Serve instance and the same run.

For each T, both applications are deployed side by side (`/shared`, `/separate`) and measured in alternation,
`--rounds` times each; a round is a fixed number of requests from K concurrent clients against 127.0.0.1,
so the test stops by itself. Two loads: `one` (each request asks one task, spread evenly over the tasks)
and `all` (each request asks every task for its input: the multi-task case of the paper). Reported:
throughput (requests per second) and p50/p99 latency, medians over the rounds.

    python benchmarks/serve.py --json docs/serve.json            # T = 1, 5, 19 on all-MiniLM-L6-v2
    python benchmarks/serve.py --quick                           # T = 1, 5, fewer requests
    python benchmarks/serve.py --backbone dinov2-small           # images (base64 PNGs)

The tasks are distinct small bypass runs (one per seed, trained once into `--runs-dir` and reused).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import socket
import statistics
import time
from pathlib import Path

from _report import machine, table, write_json

DATA = {"all-MiniLM-L6-v2": {"name": "tweets", "train_size": 64, "test_size": 16, "max_length": 32},
        "dinov2-small": {"name": "mnist", "train_size": 64, "test_size": 16, "image_size": 56}}


def train_tasks(backbone: str, count: int, root: Path) -> list[Path]:
    """`count` finished bypass runs on `backbone` (seeds 0..count-1), trained once and reused."""
    from restuning.config import from_dict
    from restuning.train.config import TrainConfig
    from restuning.train.trainer import Trainer

    runs = []
    for seed in range(count):
        out = root / f"{backbone}-bypass-{seed}"
        config = from_dict(TrainConfig, {"backbone": backbone, "method": {"name": "bypass"}, "data": DATA[backbone],
                                         "seed": seed, "output_dir": str(out),
                                         "optim": {"epochs": 1, "batch_size": 32, "lr": 0.01}})
        Trainer(config, progress=False).run()  # returns at once for a finished run
        runs.append(out)
    return runs


def inputs_for(backbone: str, n: int) -> list[str]:
    if backbone == "all-MiniLM-L6-v2":
        from restuning.data import tweets

        return [str(t) for t in tweets().inputs[:n]]
    from PIL import Image

    from restuning.data import mnist5k

    images = mnist5k().inputs[:n]
    out = []
    for image in images:
        pixels = (image.clamp(0, 1) * 255).byte()
        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy() if pixels.shape[0] == 1 else
                        pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def load(url: str, bodies: list[dict], clients: int, timeout: float) -> dict[str, float]:
    """Send `bodies` from `clients` concurrent clients; throughput and latency percentiles."""
    import requests

    sessions = [requests.Session() for _ in range(clients)]
    latencies: list[float] = []

    def client(k: int) -> None:
        for body in bodies[k::clients]:
            start = time.perf_counter()
            answer = sessions[k].post(url, json=body, timeout=timeout)
            latencies.append(time.perf_counter() - start)
            answer.raise_for_status()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"throughput_rps": len(bodies) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2", choices=sorted(DATA))
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 19])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=384, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--torch-threads", type=int, help="torch threads per backbone replica (default: the "
                        "service's, the machine's cores)")
    parser.add_argument("--loads", nargs="+", default=["one", "all"], choices=["one", "all"])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-serve"))
    parser.add_argument("--quick", action="store_true", help="T = 1 and 5, 128 requests, 2 rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.requests, args.rounds = [1, 5], 128, 2

    from ray import serve

    from restuning.serve import ServeConfig
    from restuning.serve.service import build, plan, start, stop

    runs = train_tasks(args.backbone, max(args.tasks), args.runs_dir)
    texts = inputs_for(args.backbone, 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = []
    first = True
    try:
        for count in args.tasks:
            names = [f"t{i}" for i in range(count)]
            settings = {"runs": [f"{n}={r}" for n, r in zip(names, runs)], "port": port,
                        "max_batch_size": args.max_batch_size, "max_inputs": args.max_batch_size,
                        "max_wait_ms": args.max_wait_ms, "torch_threads": args.torch_threads}
            for mode in ("shared", "separate"):
                config = ServeConfig(**settings, share_forward=mode == "shared")
                if first:  # starts Ray and Serve on 127.0.0.1
                    start(config, route_prefix="/shared", name="shared")
                    first = False
                else:
                    serve.run(build(config, plan(config)[0]), name=mode, route_prefix=f"/{mode}")
            url = f"http://127.0.0.1:{port}"
            for load_kind in args.loads:
                bodies = [{"task": names[i % count], "inputs": [texts[i % len(texts)]]} if load_kind == "one" else
                          {"tasks": names, "inputs": [texts[i % len(texts)]]} for i in range(args.requests)]
                samples: dict[str, list[dict]] = {"shared": [], "separate": []}
                for mode in samples:  # warm-up: first batches, lazy imports
                    load(f"{url}/{mode}/v1/predict", bodies[:args.clients], args.clients, 120)
                for _ in range(args.rounds):
                    for mode in samples:
                        samples[mode].append(load(f"{url}/{mode}/v1/predict", bodies, args.clients, 120))
                for mode, measured in samples.items():
                    rows.append({"tasks": count, "mode": mode, "load": load_kind, "backbone": args.backbone,
                                 **{k: statistics.median(m[k] for m in measured) for k in measured[0]}})
                shared, separate = rows[-2], rows[-1]
                print(f"T={count} load={load_kind}: shared {shared['throughput_rps']:.1f} rps, separate "
                      f"{separate['throughput_rps']:.1f} rps", flush=True)
            serve.delete("shared")
            serve.delete("separate")
    finally:
        stop()
    by_key = {(r["tasks"], r["load"], r["mode"]): r for r in rows}
    for r in rows:
        base = by_key[(r["tasks"], r["load"], "separate")]
        r["throughput_ratio_to_separate"] = r["throughput_rps"] / base["throughput_rps"]
        r["p99_ratio_to_separate"] = r["p99_ms"] / base["p99_ms"]
    table(["T", "load", "mode", "rps", "p50 ms", "p99 ms", "rps / separate", "p99 / separate"],
          [[r["tasks"], r["load"], r["mode"], f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}", f"{r['throughput_ratio_to_separate']:.2f}", f"{r['p99_ratio_to_separate']:.2f}"]
           for r in rows])
    write_json(args.json, {"machine": machine(), "clients": args.clients, "requests_per_round": args.requests,
                           "rounds": args.rounds, "max_batch_size": args.max_batch_size,
                           "max_wait_ms": args.max_wait_ms, "torch_threads": args.torch_threads, "rows": rows})


if __name__ == "__main__":
    main()
