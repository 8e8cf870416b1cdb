"""Query data: other classes, one class, missing labels and another gene set all predict."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from cellfm_sc import CellFMClassifier, datasets

from .test_cli import assert_usage_error, run_cli

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    train = datasets.pbmc3k()[:240].copy()
    train.obs["cell_type"] = train.obs["celltype"]
    train.write_h5ad(folder / "train.h5ad")
    proc = run_cli(
        "finetune", folder / "train.h5ad", "--preset", "tiny", "--labels-key", "cell_type",
        "--epochs", "1", "--max-tokens", "128", "--output-dir", folder / "RUN", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder


def _query(kind: str) -> ad.AnnData:
    q = datasets.pbmc3k()[300:380].copy()
    q.obs["cell_type"] = q.obs["celltype"].astype(str)
    if kind == "unseen":
        q.obs.iloc[:30, q.obs.columns.get_loc("cell_type")] = "Alien cells"
    elif kind == "single":
        q.obs["cell_type"] = "B"
    elif kind == "missing":
        q.obs["cell_type"] = q.obs["cell_type"].astype(object)
        q.obs.iloc[:10, q.obs.columns.get_loc("cell_type")] = np.nan
    elif kind == "genes80":
        rng = np.random.default_rng(0)
        keep = np.sort(rng.choice(q.n_vars, int(0.8 * q.n_vars), replace=False))
        q = q[:, keep].copy()
    elif kind == "no_labels":
        del q.obs["cell_type"]
    return q


@pytest.mark.parametrize("kind", ["unseen", "single", "missing", "genes80", "no_labels"])
def test_cli_predicts_query_data(run, kind):
    path = run / f"{kind}.h5ad"
    _query(kind).write_h5ad(path)
    out = run / f"out_{kind}.h5ad"
    proc = run_cli("predict", run / "RUN" / "model", path, "--output", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    annotated = ad.read_h5ad(out)
    assert annotated.obs["cellfm_prediction"].notna().all()
    assert (annotated.obs["cellfm_split"] == "none").all()  # none of these cells trained
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("cellfm-sc: warning:")]
    if kind == "genes80":
        assert len(warnings) == 1 and "80.0%" in warnings[0], proc.stderr
    else:
        assert not [w for w in warnings if "genes" in w], proc.stderr


def test_too_few_genes_is_an_error_that_names_the_numbers(run):
    q = _query("plain")
    q = q[:, : q.n_vars // 3].copy()
    path = run / "third.h5ad"
    q.write_h5ad(path)
    proc = run_cli("predict", run / "RUN" / "model", path, "--output", run / "x.h5ad", "--quiet")
    assert_usage_error(proc, "(33.3%)", "--min-gene-coverage 0.5", "--min-gene-coverage 0.33")
    proc = run_cli(
        "predict", run / "RUN" / "model", path, "--output", run / "x.h5ad", "--quiet",
        "--min-gene-coverage", "0.3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_evaluate_scores_known_labels_and_reports_the_rest(run):
    q = _query("unseen")
    model = CellFMClassifier.load(run / "RUN" / "model", q)
    result = model.evaluate(q, indices=np.arange(q.n_obs))
    assert result.cell_metrics["n_cells"] == q.n_obs - 30
    assert any("30 cell(s) not scored" in n and "Alien cells (30)" in n for n in result.notes)
    with pytest.raises(ValueError, match=r"no test cells|not in this AnnData"):
        model.evaluate(q)  # the saved split's test cells are not in the query
