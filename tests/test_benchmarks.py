"""The benchmark scripts run and write the JSON their docs describe (tiny configs; figures are not asserted
beyond what must hold on any machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_diffusion_memory_writes_one_object_per_method_with_ratios(tmp_path, precision):
    out = tmp_path / "dm.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "diffusion_memory.py"), "--config", "tiny", "--steps", "1",
                           "--threads", "1", "--precision", precision, "--methods", "bypass", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == {"full", "bypass"} and result["meta"]["precision"] == precision
    full, bypass = methods["full"], methods["bypass"]
    assert full["ratio_to_full"]["peak_rss_bytes"] == 1.0
    # The bypass's UNet runs without autograd: it saves a small fraction of what full fine-tuning saves,
    # and trains far fewer parameters.
    assert bypass["ratio_to_full"]["saved_activation_bytes"] < 0.2
    assert bypass["trainable_params"] < 0.05 * full["trainable_params"]
    if precision == "bf16":  # the frozen UNet stored in bf16: its parameter bytes are half of float32's
        unet_params = full["total_params"]
        assert bypass["parameter_bytes"] < 2 * unet_params + 4 * bypass["trainable_params"] + 1


@pytest.mark.xdist_group("serve")
def test_serve_benchmark_writes_rows_for_both_modes(tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "serve.py"), "--tasks", "1", "2", "--requests", "8",
                           "--rounds", "1", "--clients", "2", "--runs-dir", str(tmp_path / "runs"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["tasks"], r["mode"], r["load"]) for r in rows} == {
        (t, m, load) for t in (1, 2) for m in ("shared", "separate") for load in ("one", "all")}
    for r in rows:
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        if r["mode"] == "separate":
            assert r["throughput_ratio_to_separate"] == 1.0 and r["p99_ratio_to_separate"] == 1.0


def test_frontier_report_merges_rows_fills_ratios_and_plots(tmp_path):
    def row(method, task, acc, memory_row=None):
        return {"method": method, "task": task, "accuracy_mean": acc, "accuracy_std": 0.5, "lr": 0.01,
                "trainable_params": 10, "memory_row": memory_row, "memory_ratio_to_full": None,
                "one_forward_serves_many_tasks": method == "bypass"}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"rows": [row("bypass", "tweets/minilm", 90.0, "bypass"),
                                          row("lst", "tweets/minilm", 89.0, "lst")]}))
    second.write_text(json.dumps({"rows": [row("bypass", "tweets/minilm", 91.0, "bypass"),  # replaces a.json's
                                           {"method": "lst", "task": "mnist/efficientnet", "error": "maps"}]}))
    memory, steps = tmp_path / "memory.json", tmp_path / "steps.json"
    memory.write_text(json.dumps({"methods": {"bypass": {"ratio_to_full": 0.25}, "lst": {"ratio_to_full": 0.35}}}))
    steps.write_text(json.dumps({"rows": [
        {"task": "tweets/minilm", "method": "bypass", "dtype": "float32", "cached": False, "ratio_to_full": 0.3},
        {"task": "tweets/minilm", "method": "bypass", "dtype": "float32", "cached": True, "ratio_to_full": 0.07}]}))
    out, plot = tmp_path / "merged.json", tmp_path / "frontier.png"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "frontier_report.py"), str(first), str(second),
                           "--memory-json", str(memory), "--step-time-json", str(steps), "--json", str(out),
                           "--plot", str(plot)], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["task"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("tweets/minilm", "bypass"), ("tweets/minilm", "lst"), ("mnist/efficientnet", "lst")}
    bypass = rows[("tweets/minilm", "bypass")]
    assert bypass["accuracy_mean"] == 91.0 and bypass["memory_ratio_to_full"] == 0.25
    assert bypass["step_time_ratio_to_full"] == 0.07  # the cached step, as the trainer trains it
    assert rows[("tweets/minilm", "lst")]["memory_ratio_to_full"] == 0.35
    assert "error" in rows[("mnist/efficientnet", "lst")]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_backbone_chunks_times_each_bound_with_the_chunks_it_ran(tmp_path):
    out = tmp_path / "chunks.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "backbone_chunks.py"), "--settings", "minilm_32",
                           "--batch", "40", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["settings"]["minilm_32"]
    assert result["positions_per_example"] == 32
    assert {(row["backbone_tokens"], row["release_host_memory"]) for row in result["rows"]} == {
        (b, release) for b in (None, 4096, 2048, 1024, 512) for release in (True, False)}
    for release in (True, False):
        rows = {row["backbone_tokens"]: row for row in result["rows"] if row["release_host_memory"] is release}
        # 40 tweets of 32 tokens: 1024 positions take 32 of them, 512 take 16; the first round counted them.
        assert {b: (r["examples_per_chunk"], r["chunks"]) for b, r in rows.items()} == {
            None: (40, 1), 4096: (40, 1), 2048: (40, 1), 1024: (32, 2), 512: (16, 3)}
        assert rows[None]["ratio_to_whole_batch"] == 1.0 and all(r["median_cpu_seconds"] > 0 for r in rows.values())
        if not release:  # the baseline of that ratio
            assert all(r["ratio_to_keeping_freed"] == 1.0 for r in rows.values())


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_a_benchmark_json_stopped_while_written_leaves_the_previous_file_whole(tmp_path, monkeypatch, fail_at):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("_report", BENCHMARKS / "_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    out = tmp_path / "result.json"
    report.write_json(out, {"run": 1})

    class Stopped(Exception):
        pass

    if fail_at == "write":  # the process dies halfway through the bytes
        def write_text(self, text, *args, **kwargs):
            with open(self, "w") as f:
                f.write(text[: len(text) // 2])
            raise Stopped
        monkeypatch.setattr(Path, "write_text", write_text)
    else:  # the bytes are written, the process dies before the rename
        def replace(*args):
            raise Stopped
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Stopped):
        report.write_json(out, {"run": 2, "rows": list(range(100))})
    assert json.loads(out.read_text()) == {"run": 1}
    monkeypatch.undo()
    report.write_json(out, {"run": 3})  # the next run replaces the partial file and the result
    assert json.loads(out.read_text()) == {"run": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
