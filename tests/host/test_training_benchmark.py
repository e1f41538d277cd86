"""The training benchmark's CPU smoke mode runs in CI: every configuration runs through the same code as on the
GPU and prints its JSON line; in fp32 this pack's prediction is the official loop's (no claims about time)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", ["sd15", "plus"])
def test_training_benchmark_cpu_mode_runs_every_config_and_agrees_with_the_official_loop(host, variant):
    proc = subprocess.run([sys.executable, "benchmarks/training_benchmark.py", "--device", "cpu", "--quick",
                           "--variant", variant],
                          cwd=PACK_DIR, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert set(results) == {"official", "ours", "ours-encoders"}, "ours-fp16 needs a GPU"
    assert all(r["samples_per_s"] > 0 and r["mean_loss"] > 0 for r in results.values())
    for name in ("ours", "ours-encoders"):
        assert results[name]["relative_error_vs_official"] < 1e-4, name
        assert abs(results[name]["fixed_batch_loss"] - results["official"]["fixed_batch_loss"]) < 1e-4, name
    assert (report["comfyui"], report["size"], report["batch"], report["variant"]) == ("0.3.64", 64, 1, variant)
