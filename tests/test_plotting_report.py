"""cellfm_sc.pl plots and the report files (training_results.json, CSVs, PNGs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import cellfm_sc
from cellfm_sc import report
from cellfm_sc.metrics import EvaluationResult, evaluate_predictions

CLASSES = ["Not AD", "Low", "High"]


def _synthetic(n: int = 300, k: int = 3, n_donors: int = 10, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    donor_ids = np.array([f"D{i:02d}" for i in range(n_donors)])
    donors = donor_ids[rng.integers(0, n_donors, n)]
    donor_label = {d: i % k for i, d in enumerate(donor_ids)}
    y = np.array([donor_label[d] for d in donors])
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    emb = rng.normal(size=(n, 16)) + 3.0 * y[:, None]
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [1.1, 0.9, 0.7, 0.6],
            "train_acc": [0.40, 0.55, 0.65, 0.70],
            "validation_loss": [1.0, 0.85, np.nan, 0.8],
            "validation_acc": [0.45, 0.60, np.nan, 0.64],
        }
    )
    result = evaluate_predictions(
        prob,
        y,
        CLASSES,
        obs_names=[f"cell{i}" for i in range(n)],
        donors=donors,
        ordinal=True,
    )
    return {"result": result, "history": history, "embedding": emb, "prob": prob}


# A hand-written schema: key -> allowed types (None allowed where listed)
_NUM = (int, float)
_SCHEMA: dict[str, tuple[type, ...]] = {
    "train_acc_history": (list,),
    "test_acc_history": (list,),
    "best_test_acc": (*_NUM, type(None)),
    "n_genes": (int,),
    "gene_embedding": (str,),
    "epochs": (int,),
    "batch_size": (int,),
    "lr": _NUM,
    "num_classes": (int,),
    "format_version": (int,),
    "created": (str,),
    "classes": (list,),
    "ordinal": (bool,),
    "cell_metrics": (dict,),
    "donor_metrics": (dict, type(None)),
    "donor_method": (str, type(None)),
    "confusion_matrix": (list,),
    "notes": (list,),
    "qwk": (*_NUM, type(None)),
    "qwk_level": (str, type(None)),
    "macro_f1": (*_NUM, type(None)),
    "history": (list,),
    "package_versions": (dict,),
    "umap": (dict,),
    "files": (dict,),
}
_CELL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "n_cells")


def _validate(record: dict[str, Any], *, donors: bool, ordinal: bool) -> None:
    for key, types in _SCHEMA.items():
        assert key in record, f"missing key {key}"
        assert isinstance(record[key], types), (key, type(record[key]))
    k = record["num_classes"]
    assert len(record["classes"]) == k
    assert all(isinstance(x, (*_NUM, type(None))) for x in record["train_acc_history"])
    assert (
        len(record["train_acc_history"])
        == len(record["test_acc_history"])
        == len(record["history"])
    )
    cm = record["confusion_matrix"]
    assert len(cm) == k and all(
        len(row) == k and all(isinstance(v, int) for v in row) for row in cm
    )
    extra = ("qwk", "ordinal_mae", "spearman") if ordinal else ()
    for name in (*_CELL_METRICS, *extra):
        assert isinstance(record["cell_metrics"][name], (*_NUM, type(None))), name
    if donors:
        for name in ("accuracy", "macro_f1", "n_donors", *extra):
            assert isinstance(record["donor_metrics"][name], (*_NUM, type(None))), name
    for name in ("cellfm-sc", "numpy", "anndata", "torch", "scvi-tools"):
        assert name in record["package_versions"]
    assert isinstance(record["umap"]["written"], bool)
    assert isinstance(record["umap"]["note"], (str, type(None)))


def _assert_png_not_blank(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.02, f"{path.name} looks blank"


def test_report_holds_every_file(tmp_path: Path) -> None:
    data = _synthetic()
    res: EvaluationResult = data["result"]
    info = {
        "n_genes": 2000,
        "gene_embedding": "random",
        "batch_size": 16,
        "lr": 1e-4,
        "split_sizes": {"train": 600, "validation": 300},
        "seeds": {"split": 0, "train": 1},
        "checkpoint_variant": "A",
        "embedding_coverage": 0.93,
    }
    res.embedding = data["embedding"]
    res.evaluated_on = "test"
    files = report.write_report(tmp_path / "run", res, history=data["history"], info=info)
    expected = {
        "training_results": "training_results.json",
        "predictions": "predictions.csv",
        "donor_predictions": "donor_predictions.csv",
        "confusion_matrix": "confusion_matrix.png",
        "training_curves": "training_curves.png",
        "umap": "umap.png",
    }
    assert {k: p.name for k, p in files.items()} == expected
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == sorted(expected.values()), "left-over temporary files?"

    record = json.loads((tmp_path / "run" / "training_results.json").read_text())
    _validate(record, donors=True, ordinal=True)
    assert record["train_acc_history"] == [0.40, 0.55, 0.65, 0.70]
    assert record["test_acc_history"] == [0.45, 0.60, None, 0.64]
    # the final model's test accuracy, not the best epoch's validation accuracy (0.64)
    assert record["best_test_acc"] == pytest.approx(res.cell_metrics["accuracy"])
    assert record["epochs"] == 4 and record["num_classes"] == 3
    assert record["qwk_level"] == "donor"
    assert record["qwk"] == pytest.approx(res.donor_metrics["qwk"])
    assert record["seeds"] == {"split": 0, "train": 1}
    assert record["checkpoint_variant"] == "A"
    assert record["files"] == expected
    assert record["umap"] == {"written": True, "note": None}

    pred = pd.read_csv(files["predictions"])
    assert list(pred.columns) == [
        "obs_name",
        "donor",
        "true",
        "predicted",
        "confidence",
        "p_Not AD",
        "p_Low",
        "p_High",
    ]
    assert len(pred) == 300  # every cell
    np.testing.assert_allclose(pred[["p_Not AD", "p_Low", "p_High"]], data["prob"])
    donor = pd.read_csv(files["donor_predictions"])
    assert list(donor.columns[:4]) == ["donor", "true", "predicted", "n_cells"]
    assert len(donor) == 10 and donor["n_cells"].sum() == 300

    for key in ("confusion_matrix", "training_curves", "umap"):
        _assert_png_not_blank(files[key])
    assert not plt.get_fignums(), "report left figures open"


def test_report_without_donors_history_or_embedding(tmp_path: Path) -> None:
    prob = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    res = evaluate_predictions(prob, [0, 1, 1], ["a", "b"])
    files = report.write_report(tmp_path, res, info={"n_genes": 10})
    assert sorted(files) == ["confusion_matrix", "predictions", "training_results"]
    record = json.loads(files["training_results"].read_text())
    _validate(
        {**record, "gene_embedding": "", "batch_size": 0, "lr": 0.0, "epochs": 0},
        donors=False,
        ordinal=False,
    )
    assert record["train_acc_history"] == [] and record["best_test_acc"] is None
    assert record["donor_metrics"] is None and record["qwk"] is None
    assert record["umap"] == {"written": False, "note": "no embedding given"}


def test_umap_skipped_above_threshold_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prob = np.tile([[0.7, 0.3]], (50, 1))
    res = evaluate_predictions(prob, np.zeros(50, dtype=int), ["a", "b"])
    monkeypatch.setattr(report, "UMAP_MAX_CELLS", 20)
    res.embedding = np.zeros((50, 4))
    files = report.write_report(tmp_path, res, info={})
    assert "umap" not in files
    note = json.loads(files["training_results"].read_text())["umap"]["note"]
    assert "50 cells > 20" in note and "umap=True" in note
    files = report.write_report(tmp_path, res, info={}, umap=False)
    assert "umap" not in files


def test_report_rejects_info_overriding_computed_keys(tmp_path: Path) -> None:
    res = evaluate_predictions(np.array([[0.6, 0.4]]), [0], ["a", "b"])
    with pytest.raises(ValueError, match="best_test_acc"):
        report.write_report(tmp_path, res, info={"best_test_acc": 1.0})


def test_best_test_acc_only_for_test_cells(tmp_path: Path) -> None:
    res = evaluate_predictions(np.array([[0.6, 0.4], [0.3, 0.7]]), [0, 0], ["a", "b"])
    for where, expected in (("test", 0.5), ("validation", None), (None, None)):
        res.evaluated_on = where
        record = json.loads(report.write_report(tmp_path, res)["training_results"].read_text())
        assert record["best_test_acc"] == expected, where
        assert record["evaluated_on"] == where


def test_atomic_write_helpers(tmp_path: Path) -> None:
    from cellfm_sc import _atomic

    target = tmp_path / "sub" / "x.json"
    _atomic.write_json_atomic(target, {"a": np.float32(0.5), "b": np.nan, "p": tmp_path})
    assert json.loads(target.read_text()) == {"a": 0.5, "b": None, "p": str(tmp_path)}
    assert (target.stat().st_mode & 0o777) == _atomic.default_mode()
    _atomic.atomic_write(target, "old")
    with pytest.raises(RuntimeError), _atomic.atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("crash")
    assert target.read_text() == "old"  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]  # no temp left


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    from cellfm_sc import _atomic

    target = tmp_path / "model"
    with _atomic.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target.stat().st_mode & 0o777) == _atomic.default_mode(directory=True)
    with pytest.raises(FileExistsError):
        with _atomic.atomic_dir(target):
            pass
    with pytest.raises(RuntimeError), _atomic.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


def test_pl_functions_follow_scanpy_conventions(tmp_path: Path) -> None:
    data = _synthetic(n=120)
    res = data["result"]
    assert cellfm_sc.pl.confusion_matrix is not None  # exposed as cellfm_sc.pl

    fig = cellfm_sc.pl.confusion_matrix(res, show=False)
    assert fig is not None and fig.axes[0].get_title().startswith("Cell-level")
    fig2 = cellfm_sc.pl.confusion_matrix(res, level="donor", normalize=False, show=False)
    assert fig2.axes[0].get_title() == "Donor-level confusion matrix"
    with pytest.raises(ValueError, match="square"):
        cellfm_sc.pl.confusion_matrix(np.zeros((2, 3)), show=False)

    out = tmp_path / "curves.png"
    fig3 = cellfm_sc.pl.training_curves(data["history"], save=out, show=False)
    assert [a.get_title() for a in fig3.axes] == ["loss", "accuracy"]
    _assert_png_not_blank(out)
    # show=None under a non-interactive backend: nothing shown, the figure returned
    assert cellfm_sc.pl.training_curves(data["history"]) is not None

    # a 2-d embedding is drawn as given (no UMAP needed)
    emb2 = data["embedding"][:, :2]
    obs = res.predictions[["true", "predicted"]]
    fig4 = cellfm_sc.pl.embedding(emb2, color=["true", "predicted"], obs=obs, show=False)
    assert fig4 is not None and len(fig4.axes) >= 2
    with pytest.raises(KeyError, match="not found"):
        cellfm_sc.pl.embedding(emb2, color="nope", obs=obs, show=False)
    plt.close("all")


def test_pl_embedding_on_anndata_stores_umap_only_when_asked() -> None:
    import anndata as ad

    data = _synthetic(n=120)
    adata = ad.AnnData(
        obs=data["result"].predictions[["true"]].copy(),
        obsm={"X_cellfm": data["embedding"]},
    )
    fig = cellfm_sc.pl.embedding(adata, color="true", show=False, key_added="X_cellfm_umap")
    assert fig is not None
    assert adata.obsm["X_cellfm_umap"].shape == (120, 2)
    assert set(adata.obsm) == {"X_cellfm", "X_cellfm_umap"} and not adata.uns
    plt.close("all")
