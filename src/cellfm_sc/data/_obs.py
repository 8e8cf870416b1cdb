"""Reading obs columns the user named (one home for the "not a column" error)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cellfm_sc._errors import missing_column

__all__ = ["obs_column"]


def obs_column(adata: Any, key: str, *, keyword: str, allow_missing: bool = False) -> pd.Series:
    """``adata.obs[key]``, or a clear error naming the keyword, the column and the choices.

    Parameters
    ----------
    adata
        AnnData (in memory or backed).
    key
        The column the user asked for.
    keyword
        The argument that named it (``"labels_key"``, ``"donor_key"``, ...): errors say
        ``labels_key='x'`` so the command line can reword them as ``--labels-key x``.
    allow_missing
        Whether missing values (NaN) are allowed; otherwise they are an error with the count.

    Raises
    ------
    KeyError
        The column does not exist (the message lists the columns there are).
    ValueError
        The column holds missing values and ``allow_missing`` is false.

    Examples
    --------
    >>> import anndata as ad, pandas as pd
    >>> a = ad.AnnData(obs=pd.DataFrame({"cell_type": ["T", "B"]}, index=["c1", "c2"]))
    >>> list(obs_column(a, "cell_type", keyword="labels_key"))
    ['T', 'B']
    """
    if key not in adata.obs.columns:
        raise KeyError(missing_column(keyword, key, adata.obs.columns, "adata.obs"))
    col = adata.obs[key]
    if not allow_missing:
        missing = int(col.isna().sum())
        if missing:
            raise ValueError(
                f"{keyword}={key!r}: the column has {missing} missing value(s) (NaN) out of "
                f"{col.size} cells; fill them or drop those cells first"
            )
    return col


def check_labels(
    labels: pd.Series, labels_key: str, label_order: list[str] | None = None
) -> list[str]:
    """Check a labels column for a classifier; return its classes present, sorted.

    Raises
    ------
    ValueError
        ``label_order`` with repeated entries or missing a label of the column (both named),
        or a single class.
    """
    present = sorted(set(labels.astype(str)))
    if label_order is not None:
        if len(set(label_order)) != len(label_order):
            raise ValueError(f"label_order has repeated entries: {label_order}")
        unknown = sorted(set(present) - set(label_order))
        if unknown:
            raise ValueError(
                f"labels {unknown[:10]} of labels_key={labels_key!r} are not in "
                f"label_order={label_order}"
            )
    if len(present) < 2:
        raise ValueError(
            f"labels_key={labels_key!r} has a single class ({present}); a classifier "
            "needs at least two"
        )
    return present
