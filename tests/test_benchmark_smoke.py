"""The GPU benchmark script runs on CPU at tiny sizes (a smoke test, not a timing)."""

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
