"""benchmarks/pretraining_transfer.py runs end to end at tiny sizes (a smoke test, not a result)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_transfer.py"


@pytest.mark.slow
def test_pretraining_transfer_benchmark_runs(tmp_path, shared_dir):
    data = tmp_path / "data"
    data.mkdir()
    src = shared_dir / "data"
    rng = np.random.default_rng(0)
    for name, n in (
        ("liao2020_balf_raw.h5ad", 60),
        ("delorey2021_lung_raw.h5ad", 40),
        ("pbmc3k_raw.h5ad", 400),
    ):
        full = ad.read_h5ad(src / name)
        full[np.sort(rng.choice(full.n_obs, n, replace=False))].copy().write_h5ad(data / name)
    out = tmp_path / "out"
    args = [
        "--data-dir", str(data), "--out", str(out), "--pretrain-epochs", "1",
        "--max-tokens", "32", "--fractions", "0.1", "--seeds", "0", "--epochs", "0.1:1",
        "--markdown",
    ]  # fmt: skip
    res = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["config"] for r in rows} == {"random", "pretrained", "logreg"}
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in rows)
    assert (out / "pretrained" / "cellfm.ckpt").is_file()
    facts = json.loads((out / "pretrained" / "pretrain.json").read_text())
    assert facts["corpus"]["delorey2021_lung_raw.h5ad"]["train"] == 38
    assert "| 10% (" in res.stdout and "pretrained - random" in res.stdout
