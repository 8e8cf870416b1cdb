"""The baselines of a model's evaluation, fitted on the model's own split (internal).

``evaluate(baseline=True)`` of :class:`~cellfm_sc.model.CellFMClassifier` and
:class:`~cellfm_sc.model.CellFMDonorClassifier` call :func:`split_baseline`; the baselines
themselves live in :mod:`cellfm_sc.baselines`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellfm_sc.baselines import BaselineComparison, compare_on_split

__all__ = ["split_baseline"]


def split_baseline(
    model: Any,
    adata: Any,
    evaluate: np.ndarray,
    labels: np.ndarray,
    donors: np.ndarray | None,
    *,
    cells: bool,
    donor_method: str = "mean_probability",
) -> BaselineComparison:
    """Baselines fitted on ``model``'s training / validation cells of ``adata`` and scored on
    the cells ``evaluate`` (positions in ``adata``) the model was scored on.

    ``labels`` are the cells' label codes (-1: not scored), ``donors`` their donors (or
    None); ``cells`` asks for the cell baseline (a cell classifier) beside pseudo-bulk. A
    model without a split, or an AnnData that lacks its training cells, gets an empty
    comparison with a note saying why.
    """
    split = model._split_for(adata)
    if split is None:
        why = (
            "the model has no training split"
            if model.split_names_ is None
            else "this AnnData lacks the model's training cells (matched by obs name)"
        )
        return BaselineComparison(notes=[f"baselines skipped: {why}"])
    return compare_on_split(
        adata,
        labels,
        train=split.train,
        validation=split.validation,
        evaluate=evaluate,
        classes=list(model.classes_),
        ordered=bool(model.ordinal_),
        donors=donors,
        cells=cells,
        layer=model.layer,
        use_raw=model.use_raw,
        donor_method=donor_method,
        seed=model.seed,
    )
