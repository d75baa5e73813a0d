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
