"""Benchmark scripts run on CPU at tiny sizes (smoke tests, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


def test_gpu_train_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    args = "--preset tiny --steps 2 --warmup 1 --max-tokens 32 --batch-size 4 --n-genes 200"
    res = subprocess.run(
        [sys.executable, str(BENCH), *args.split(), "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert result["train_cells_per_s"] > 0 and result["infer_cells_per_s"] > 0


def test_train_vs_commit_benchmark_runs_against_this_tree(tmp_path, pbmc3k_path):
    """Both sides pointed at this tree, tiny sizes: the script runs, alternates and reports."""
    bench = BENCH.parent / "bench_train_vs_commit.py"
    src = str(BENCH.parents[1] / "src")
    out = tmp_path / "r.json"
    args = "--rounds 1 --cells 60 --dims 16 --heads 2 --layers 1 --batch-size 8"
    res = subprocess.run(
        [sys.executable, str(bench), *args.split(), "--old-python", sys.executable,
         "--old-src", src, "--pbmc", str(pbmc3k_path), "--json", str(out), "--markdown"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["rounds"]) == {"old", "new"}
    assert result["summary"]["train_cells"] == {"old": 48, "new": 48}  # 60 - 10% - 10%
    assert result["summary"]["train_ratio"] > 0 and result["summary"]["infer_ratio"] > 0
    assert "| ratio |" in res.stdout
