"""benchmarks/shift_transfer.py runs end to end at tiny sizes (a smoke test, not a result),
and its shift does what its docstring says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _shift_module():
    sys.path.insert(0, str(BENCH))
    try:
        import shift_transfer
    finally:
        sys.path.remove(str(BENCH))
    return shift_transfer


def test_shift_raises_the_program_and_halves_the_depth(pbmc3k_path):
    st = _shift_module()
    pbmc = ad.read_h5ad(pbmc3k_path)
    rows = np.arange(0, 2700, 9)
    shifted = st.shift_cells(pbmc, rows, seed=1)
    again = st.shift_cells(pbmc, rows, seed=1)
    assert (shifted.X != again.X).nnz == 0  # the same cells are shifted the same way
    x = sp.csr_matrix(shifted.X)
    assert np.all(x.data == np.round(x.data)) and x.data.min() > 0  # counts, no stored zeros
    assert list(shifted.obs_names) == list(pbmc.obs_names[rows])
    assert (shifted.obs["celltype"] == pbmc.obs["celltype"].iloc[rows]).all()
    facts = st.shift_summary(pbmc[rows], shifted)
    assert 0.4 < facts["median_counts_shifted"] / facts["median_counts"] < 0.7
    assert facts["isg_share_shifted"] > 3 * facts["isg_share"]
    # genes outside the program only lose counts
    outside = ~np.isin(np.asarray(pbmc.var_names), st.ISG_PROGRAM)
    before = sp.csr_matrix(pbmc.X[rows])[:, outside].toarray()
    assert (x[:, outside].toarray() <= before).all()


@pytest.mark.slow
def test_shift_benchmark_runs(tmp_path, shared_dir):
    st = _shift_module()
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
        "--max-tokens", "32", "--fractions", "0.1", "--seeds", "0", "--epochs", "0.1:2",
        "--recipes", "auto", "lp-ft", "slow", "--variant", "slow:recipe=llrd,pretrained_lr=0.1",
        "--markdown",
    ]  # fmt: skip
    res = subprocess.run(
        [sys.executable, str(BENCH / "shift_transfer.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["config"] for r in rows} == {"random", "auto", "lp-ft", "slow", "logreg"}
    for r in rows:
        assert 0.0 <= r["macro_f1_same"] <= 1.0 and 0.0 <= r["macro_f1_shifted"] <= 1.0
    by = {r["config"]: r for r in rows}
    assert by["lp-ft"]["recipe"]["name"] == "lp-ft"
    assert by["slow"]["recipe"] == {
        "name": "llrd (custom)",
        "head_phase": 0.0,
        "pretrained_lr": 0.1,
        "layer_decay": 0.7,
        "transferred_rows_lr": 1.0,
        "interpolate": 1.0,
        "shrink": 1.0,
    }
    facts = json.loads((out / "pretrained-balanced" / "pretrain.json").read_text())
    assert set(facts["probe"]) == {"probe_same_macro_f1", "probe_shifted_macro_f1"}
    assert len(facts["history"]["probe_shifted_macro_f1"]) == 1
    # the table: one line per test set, the default's gains over both baselines
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    assert "| auto (= full) |" in table[0] and table[0].endswith("auto - logreg |")
    same = next(ln for ln in table if "| same |" in ln)
    gain = by["auto"]["macro_f1_same"] - by["random"]["macro_f1_same"]
    assert same.split(" | ")[-2] == f"{gain:+.3f}"
    probes = st.probe_table([out / "pretrained-balanced"])
    assert probes.splitlines()[2].startswith("| before |") and "| 1 |" in probes
    assert [ln.split(" | ")[:2] for ln in table[2:]] == [
        ["| 10% (33)", "same"],
        ["| 10% (33)", "shifted"],
    ]
