"""The data benchmarks run at tiny sizes (smoke tests, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~30 s together (subprocesses, full pbmc3k epochs)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_bucketing_runs(pbmc3k_path, tmp_path):
    out = tmp_path / "r.json"
    args = "--seaad-cells 64 --train-cells 16 --rounds 1 --batch-sizes 8"
    res = subprocess.run(
        [sys.executable, str(BENCH / "bench_bucketing.py"), *args.split(), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    pbmc = r["padding"][0]
    assert pbmc["data"] == "pbmc3k" and pbmc["bucketed"]["waste"] < pbmc["plain"]["waste"]
    assert r["train"]["bucketed_cells_per_s"] > 0 and r["train"]["plain_cells_per_s"] > 0


def test_bench_count_check_runs():
    res = subprocess.run(
        [sys.executable, str(BENCH / "bench_count_check.py"), "--cells", "2000", "--nnz", "50"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2,000 cells" in res.stdout and "peak RSS" in res.stdout
