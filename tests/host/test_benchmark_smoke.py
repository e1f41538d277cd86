"""The GPU benchmark's CPU smoke mode runs in CI and prints its one JSON line (no claims about time)."""
import json
import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]


def test_sampling_benchmark_cpu_mode_reports_every_config(host):
    proc = subprocess.run([sys.executable, "benchmarks/sampling_benchmark.py", "--device", "cpu", "--quick",
                           "--configs", "sd15", "masked"], cwd=PACK_DIR, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]["batch1"]
    assert set(results) == {"plain", "sd15", "masked"}
    assert results["plain"]["ratio"] == 1.0 and all(r["median_s"] > 0 for r in results.values())
    assert (report["comfyui"], report["size"], report["steps"]) == ("0.3.64", 64, 2)
