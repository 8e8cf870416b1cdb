"""Report files of a run, written where users of the original scripts look for them.

:func:`write_report` writes, into one output directory:

``training_results.json``
    The original scripts' keys (``train_acc_history``, ``test_acc_history``,
    ``best_test_acc``, ``n_genes``, ``gene_embedding``, ``epochs``, ``batch_size``, ``lr``,
    ``num_classes``) plus ours: cell- and donor-level metrics (accuracy, balanced accuracy,
    macro-/weighted-F1, and for ordinal labels QWK, MAE, Spearman), the confusion matrix, the
    per-epoch history, the run facts given in ``info`` (split sizes, seeds, checkpoint
    variant, embedding coverage, ...), package versions and the list of files written.
    ``baseline`` (when the evaluation fitted them, ``evaluate(baseline=True)``): each
    baseline's metrics and settings on the same split (``results``), the model-vs-baseline
    rows (``comparison``: ``baseline``, ``level``, ``metric``, ``model``,
    ``baseline_value``, ``difference``) and ``notes``; ``null`` when skipped.
    ``test_acc_history`` keeps the original key name for the set scored after each epoch
    (our ``validation_acc``); ``best_test_acc`` is what it says: the test accuracy of the
    final (restored best) model, with ``best_validation_acc`` (the validation accuracy at the
    chosen epoch, from ``info``) beside it.
``predictions.csv``
    One row per cell: ``obs_name``, ``donor`` (if any), ``true``, ``predicted``,
    ``confidence``, ``p_<class>`` per class.
``donor_predictions.csv``
    One row per donor (only when donors were given): ``donor``, ``true``, ``predicted``,
    ``n_cells``, ``p_<class>`` per class.
``confusion_matrix.png``, ``training_curves.png``, ``umap.png``
    Made by :mod:`cellfm_sc.plotting` (one home per plot). ``training_curves.png`` needs a
    history; ``umap.png`` needs ``result.embedding`` and is skipped above 200,000 cells unless
    ``umap=True`` (the JSON says why it is missing).

Every file is written atomically: to a temporary file in the same directory, then renamed
over the target with :func:`os.replace`, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cellfm_sc._atomic import atomic_path, write_json_atomic
from cellfm_sc._json import to_plain
from cellfm_sc.metrics import EvaluationResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "UMAP_MAX_CELLS",
    "package_versions",
    "write_report",
]

#: Above this many cells ``umap.png`` is skipped unless ``umap=True``.
UMAP_MAX_CELLS = 200_000

REPORT_FORMAT_VERSION = 1

_PACKAGES = (
    "cellfm-sc",
    "torch",
    "anndata",
    "numpy",
    "scvi-tools",
    "lightning",
    "scanpy",
    "pandas",
    "scipy",
)

# keys of training_results.json computed here; ``info`` may not set them
_COMPUTED_KEYS = frozenset(
    {
        "format_version",
        "created",
        "train_acc_history",
        "test_acc_history",
        "best_test_acc",
        "history",
        "classes",
        "ordinal",
        "cell_metrics",
        "donor_metrics",
        "donor_method",
        "confusion_matrix",
        "notes",
        "baseline",
        "qwk",
        "qwk_level",
        "macro_f1",
        "package_versions",
        "umap",
        "files",
    }
)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a run (``None`` when not installed).

    Examples
    --------
    >>> package_versions()["numpy"]  # doctest: +SKIP
    '2.1.3'
    """
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _history_lists(history: pd.DataFrame | None) -> tuple[list[Any], list[Any]]:
    if history is None or len(history) == 0:
        return [], []
    train = history["train_acc"] if "train_acc" in history else pd.Series(dtype=float)
    val = history["validation_acc"] if "validation_acc" in history else pd.Series(dtype=float)
    train_l = to_plain(pd.to_numeric(train, errors="coerce").astype(float).tolist())
    val_f = pd.to_numeric(val, errors="coerce").astype(float)
    val_l = to_plain(val_f.tolist())
    return train_l, val_l


def write_report(
    out_dir: str | os.PathLike[str],
    result: EvaluationResult,
    *,
    history: pd.DataFrame | None = None,
    info: Mapping[str, Any] | None = None,
    umap: bool | None = None,
) -> dict[str, Path]:
    """Write the report files of a run into ``out_dir`` (created if needed).

    Parameters
    ----------
    out_dir
        Output directory.
    result
        The evaluation (:func:`cellfm_sc.metrics.evaluate_predictions`) of the held-out
        cells.
    history
        One row per epoch with columns ``epoch``, ``train_loss``, ``train_acc``,
        ``validation_loss``, ``validation_acc`` (NaN where not recorded).
        ``train_acc_history`` / ``test_acc_history`` come from ``train_acc`` /
        ``validation_acc`` (the original scripts' names: their "test" set was the set
        scored after each epoch, our validation set). ``best_test_acc`` is the accuracy of
        the final (restored best) model on the test cells when ``result`` scored the test
        split (``result.evaluated_on == "test"``), else ``None``.
    info
        Run facts merged into ``training_results.json``: ``n_genes``, ``gene_embedding``
        (``"random"`` / ``"transfer"``), ``epochs`` (default: rows of ``history``),
        ``batch_size``, ``lr``, ``num_classes`` (default: number of classes), and any other
        JSON-able facts (split sizes, seeds, checkpoint variant, embedding coverage, ...).
        Keys computed here (metrics, histories, ``files`` ...) may not be set.
    umap
        ``True``: always draw the UMAP; ``False``: never; ``None``: only up to
        ``UMAP_MAX_CELLS`` cells.

    Returns
    -------
    dict of str to pathlib.Path
        The files written, keyed ``training_results``, ``predictions``,
        ``donor_predictions``, ``confusion_matrix``, ``training_curves``, ``umap`` (only
        those written).

    Examples
    --------
    >>> res = evaluate_predictions(prob, y, classes, donors=donors, ordinal=True)  # doctest: +SKIP
    >>> res.embedding = emb  # or model.evaluate(), which fills it  # doctest: +SKIP
    >>> files = write_report("run1", res, history=hist, info={"n_genes": 36601})  # doctest: +SKIP
    >>> sorted(files)  # doctest: +SKIP
    ['confusion_matrix', 'donor_predictions', 'predictions', 'training_curves',
     'training_results', 'umap']
    """
    import matplotlib.pyplot as plt

    from cellfm_sc import plotting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    clash = sorted(_COMPUTED_KEYS & set(info))
    if clash:
        raise ValueError(f"info may not set keys computed by the report: {clash}")
    if history is not None:
        history = pd.DataFrame(history)
    files: dict[str, Path] = {}

    # tables
    with atomic_path(out / "predictions.csv") as tmp:
        result.predictions.to_csv(tmp, index_label="obs_name")
    files["predictions"] = out / "predictions.csv"
    if result.donor_table is not None:
        with atomic_path(out / "donor_predictions.csv") as tmp:
            result.donor_table.to_csv(tmp, index_label="donor")
        files["donor_predictions"] = out / "donor_predictions.csv"

    _write_figures(out, result, history, files, plt, plotting)
    umap_note = _write_umap(out, result, umap, files, plt, plotting)

    # training_results.json last, so that it lists every file
    record = _results_record(result, history, info, files, umap_note)
    files["training_results"] = out / "training_results.json"
    record["files"] = {key: path.name for key, path in files.items()}
    write_json_atomic(files["training_results"], record)
    return files


def _write_figures(
    out: Path,
    result: EvaluationResult,
    history: pd.DataFrame | None,
    files: dict[str, Path],
    plt: Any,
    plotting: Any,
) -> None:
    """``confusion_matrix.png`` (cell level, and donor level beside it when there are
    donors) and ``training_curves.png``."""
    # confusion matrix: cell level, and donor level beside it when there are donors
    if result.donor_table is not None:
        k = len(result.classes)
        side = max(3.2, 0.55 * k + 2.2)
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.0, side), layout="constrained")
        plotting.confusion_matrix(result, level="cell", ax=axes[0], show=False)
        plotting.confusion_matrix(result, level="donor", ax=axes[1], show=False)
    else:
        fig = plotting.confusion_matrix(result, show=False)
    _save_close(fig, out / "confusion_matrix.png", plt)
    files["confusion_matrix"] = out / "confusion_matrix.png"

    if history is not None and len(history):
        fig = plotting.training_curves(history, show=False)
        _save_close(fig, out / "training_curves.png", plt)
        files["training_curves"] = out / "training_curves.png"


def _write_umap(
    out: Path,
    result: EvaluationResult,
    umap: bool | None,
    files: dict[str, Path],
    plt: Any,
    plotting: Any,
) -> str | None:
    """``umap.png`` of the embedding when it is drawn; else the note that says why not."""
    n_cells = len(result.predictions)
    umap_note: str | None = None
    embedding = result.embedding
    if embedding is None:
        umap_note = "no embedding given"
    elif umap is False:
        umap_note = "disabled (umap=False)"
    elif umap is None and n_cells > UMAP_MAX_CELLS:
        umap_note = f"skipped: {n_cells} cells > {UMAP_MAX_CELLS}; pass umap=True to draw it anyway"
    else:
        emb = np.asarray(embedding)
        if emb.shape[0] != n_cells:
            raise ValueError(f"embedding has {emb.shape[0]} rows for {n_cells} predicted cells")
        obs = result.predictions[["true", "predicted"]].copy()
        obs.columns = ["true label", "prediction"]
        fig = plotting.embedding(emb, color=list(obs.columns), obs=obs, show=False, wspace=0.35)
        _save_close(fig, out / "umap.png", plt)
        files["umap"] = out / "umap.png"

    return umap_note


def _results_record(
    result: EvaluationResult,
    history: pd.DataFrame | None,
    info: dict[str, Any],
    files: dict[str, Path],
    umap_note: str | None,
) -> dict[str, Any]:
    """The content of ``training_results.json`` (without its ``files`` entry)."""
    train_hist, test_hist = _history_lists(history)
    summary = result.to_dict()
    cell_m = summary["cell_metrics"]
    cell_accuracy = cell_m.get("accuracy")
    donor_m = summary["donor_metrics"]
    if result.ordinal:
        qwk_level = "donor" if donor_m is not None else "cell"
        qwk = (donor_m if donor_m is not None else cell_m).get("qwk")
    else:
        qwk_level, qwk = None, None
    return {
        # the original scripts' keys
        "train_acc_history": train_hist,
        "test_acc_history": test_hist,
        "best_test_acc": cell_accuracy if result.evaluated_on == "test" else None,
        "n_genes": info.pop("n_genes", None),
        "gene_embedding": info.pop("gene_embedding", None),
        "epochs": info.pop("epochs", len(history) if history is not None else None),
        "batch_size": info.pop("batch_size", None),
        "lr": info.pop("lr", None),
        "num_classes": info.pop("num_classes", len(result.classes)),
        # ours
        "format_version": REPORT_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "qwk": qwk,
        "qwk_level": qwk_level,
        "macro_f1": cell_m.get("macro_f1"),
        **summary,
        "history": to_plain(history.to_dict(orient="records")) if history is not None else [],
        **info,
        "package_versions": package_versions(),
        "umap": {"written": "umap" in files, "note": umap_note},
    }


def _save_close(fig: Figure, path: Path, plt: Any) -> None:
    from cellfm_sc.plotting import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
