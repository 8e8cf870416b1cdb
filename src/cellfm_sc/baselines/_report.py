"""Reporting: the baselines that match a model, fitted on its split, side by side."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc._json import to_plain
from cellfm_sc.baselines._split import (
    BaselineResult,
    cell_baseline,
    pseudobulk_baseline,
)

# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

#: metrics shown in "model vs baseline" (those present in both)
_SHOWN = ("qwk", "accuracy", "balanced_accuracy", "macro_f1")


def _fmt(v: Any) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


@dataclasses.dataclass
class BaselineComparison:
    """The baselines of one evaluation (``evaluate(baseline=True)``), held by
    :class:`~cellfm_sc.metrics.EvaluationResult` as ``result.baseline``.

    Attributes
    ----------
    results
        ``{name: BaselineResult}``: ``"pseudobulk"`` (donor labels) and / or
        ``"cell_logistic_regression"`` (cell classifiers).
    notes
        Why a baseline was skipped or what limits it.
    """

    results: dict[str, BaselineResult] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def rows(self, model_metrics: dict[str, dict[str, float] | None]) -> list[dict[str, Any]]:
        """One row per (baseline, level, metric) scored by both: ``baseline``, ``level``,
        ``metric``, ``model``, ``baseline_value``, ``difference`` (model - baseline)."""
        out = []
        for name, res in self.results.items():
            for level, theirs in (("cell", res.cell_metrics), ("donor", res.donor_metrics)):
                ours = model_metrics.get(level)
                if not theirs or not ours:
                    continue
                for m in _SHOWN:
                    if m not in theirs or m not in ours:
                        continue
                    a, b = ours[m], theirs[m]
                    both = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
                    out.append(
                        {
                            "baseline": name,
                            "level": level,
                            "metric": m,
                            "model": a,
                            "baseline_value": b,
                            "difference": a - b if both else None,
                        }
                    )
        return out

    def to_dict(self, model_metrics: dict[str, dict[str, float] | None]) -> dict[str, Any]:
        """The ``baseline`` block of ``training_results.json``: ``results`` (each baseline's
        :meth:`BaselineResult.to_dict`), ``comparison`` (:meth:`rows`), ``notes``."""
        return to_plain(
            {
                "results": {k: v.to_dict() for k, v in self.results.items()},
                "comparison": self.rows(model_metrics),
                "notes": list(self.notes),
            }
        )

    def lines(self, model_metrics: dict[str, dict[str, float] | None]) -> list[str]:
        """The "model vs baseline" table, as lines of text."""
        lines: list[str] = []
        if self.results:
            lines.append("  model vs baseline (same split):")
        shown = self.rows(model_metrics)
        for name, res in self.results.items():
            lines.append(f"    {name}: {res.description}")
            for r in (r for r in shown if r["baseline"] == name):
                diff = "" if r["difference"] is None else f"  {r['difference']:+.4f}"
                lines.append(
                    f"      {r['level']} {r['metric']:<18} model {_fmt(r['model'])}  "
                    f"baseline {_fmt(r['baseline_value'])}{diff}"
                )
        lines.extend(f"  baseline: {n}" for n in self.notes)
        return lines


def _part(rows: np.ndarray, donors: np.ndarray | None, exclude: set[str]) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    if donors is None or not exclude:
        return rows
    return rows[~np.isin(donors[rows], list(exclude))]


def _attempt(out: BaselineComparison, key: str, what: str, fit: Any, **kw: Any) -> None:
    """``out.results[key] = fit(**kw)``; a ValueError becomes a note naming ``what``."""
    try:
        out.results[key] = fit(**kw)
    except ValueError as exc:
        out.notes.append(f"{what} baseline skipped: {exc}")


def compare_on_split(
    adata: Any,
    labels: np.ndarray,
    *,
    train: np.ndarray,
    validation: np.ndarray,
    evaluate: np.ndarray,
    classes: Sequence[str],
    ordered: bool,
    donors: np.ndarray | None = None,
    cells: bool = True,
    layer: str | None = None,
    use_raw: bool = False,
    donor_method: str = "mean_probability",
    seed: int = 0,
) -> BaselineComparison:
    """Fit the baselines that match a model on its training (+ validation) cells and score
    them on the cells the model is scored on.

    ``cells=True`` (a cell classifier): :func:`cell_baseline`, with its donors scored as the
    model's are (``donor_method``) when ``donors`` are given. With ``donors`` and labels that
    are constant within every donor (donor-level labels such as ADNC), also
    :func:`pseudobulk_baseline`. Donors of the evaluated cells are left out of the fitting
    parts, so that a baseline never sees a scored donor. A baseline that cannot be fitted
    (a single class, no labelled cells ...) is skipped with a note.

    Parameters
    ----------
    adata
        AnnData holding every cell named by the parts (raw counts; in memory or backed).
    labels
        ``(n_obs,)`` label codes (-1: missing or unknown).
    train, validation, evaluate
        Cells of the model's split parts and the cells it was scored on.
    classes, ordered
        Class names and whether they are ordered.
    donors
        ``(n_obs,)`` donor of every cell, or None.
    cells
        Fit the cell baseline (False for a donor model: pseudo-bulk only).
    layer, use_raw
        Where the counts are.
    donor_method
        Aggregation of the cell baseline's cells to donors.
    seed
        Seed of the cell baseline's training-cell sample.
    """
    labels = np.asarray(labels, np.int64)
    d = None if donors is None else np.asarray(donors).astype(str)
    evaluate = np.asarray(evaluate, np.int64)
    exclude = set() if d is None else set(np.unique(d[evaluate]).tolist())
    train = _part(train, d, exclude)
    validation = _part(validation, d, exclude)
    out = BaselineComparison()
    common = {"adata": adata, "labels": labels, "classes": classes, "ordered": ordered}
    common.update(train=train, validation=validation, layer=layer, use_raw=use_raw)
    if cells:
        extra = {"evaluate": evaluate, "donors": d, "donor_method": donor_method, "seed": seed}
        _attempt(out, "cell_logistic_regression", "cell", cell_baseline, **extra, **common)
    if d is not None:
        rows = np.concatenate([train, validation, evaluate])
        frame = pd.DataFrame({"d": d[rows], "y": labels[rows]})
        frame = frame[frame["y"] >= 0]
        if not bool((frame.groupby("d")["y"].nunique() <= 1).all()):
            out.notes.append(
                "pseudo-bulk baseline skipped: the labels are not constant within donors"
            )
        else:
            extra = {"donors": d, "test": evaluate, "ordinal": False}
            _attempt(out, "pseudobulk", "pseudo-bulk", pseudobulk_baseline, **extra, **common)
    return out
