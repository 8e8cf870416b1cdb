"""``benchmarks/donor_level.py``: the task builder and a ``--quick`` run (a smoke test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "donor_level.py"


def _bench():
    spec = importlib.util.spec_from_file_location("donor_level_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_task_moves_the_affected_cells_by_the_measured_fold_changes(pbmc3k_path, wu2020_path):
    bench = _bench()
    source, reference = ad.read_h5ad(pbmc3k_path), ad.read_h5ad(wu2020_path)
    program = bench.measured_program(
        reference, "source", "Blood", "Tumor", n_genes=20, genes=source.var_names
    )
    assert len(program) == 20 and program.abs().min() > 1  # > 2-fold, as measured
    task, cols, fold = bench.make_donor_task(
        source, program, n_donors=16, cells_per_donor=200, cell_type="CD4 T", seed=0
    )
    obs = task.obs
    assert obs["donor"].nunique() == 16 and list(obs["stage"].cat.categories) == list("0123")
    assert not obs.loc[obs["celltype"] != "CD4 T", "affected"].any()
    share = obs[obs["celltype"] == "CD4 T"].groupby("stage", observed=True)["affected"].mean()
    np.testing.assert_allclose(share.to_numpy(), [0.0, 0.15, 0.30, 0.45], atol=0.06)
    # the CD4 T cells' mean counts per 10k of the up genes move by about the measured ratio
    x = task.X.toarray().astype(np.float64)
    cp = x / x.sum(axis=1, keepdims=True) * 1e4
    t = (obs["celltype"] == "CD4 T").to_numpy()
    hit, rest = cp[t & obs["affected"].to_numpy()], cp[t & ~obs["affected"].to_numpy()]
    up = fold > 1
    ratio = (hit[:, cols[up]].mean(0) + 0.5) / (rest[:, cols[up]].mean(0) + 0.5)
    assert np.median(np.log2(ratio) / np.log2(fold[up])) == pytest.approx(1.0, abs=0.25)


@pytest.mark.slow
def test_donor_benchmark_quick_run(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), "--variant", "m:pooling=mean"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"pseudobulk", "cell", "donor", "donor:m"}
    assert all(r["n_donors"] == 3 for r in result["methods"].values())
    assert result["task"]["cell_type"] == "CD4 T"
