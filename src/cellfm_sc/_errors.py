"""Errors and error wording shared by the library and the command line's light front.

Imports nothing heavy (no numpy, pandas, torch), so ``cellfm-sc`` can refuse a bad column,
layer or accelerator before the heavy imports start, in the same words the library uses
later (the library's checks build their messages here too).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "UntrainedModelError",
    "missing_column",
    "missing_layer",
    "missing_raw",
]


class UntrainedModelError(RuntimeError):
    """Inference asked of a model that was never trained: its outputs would be random.

    Raised by ``predict``, ``annotate``, ``evaluate``, ``get_latent_representation`` and
    ``predict_donors`` of a model that :meth:`~cellfm_sc.model.CellFMClassifier.train` never
    ran on and that was not loaded from the save of a trained model; pass
    ``allow_untrained=True`` to compute them anyway. Cell embeddings of a trunk loaded from
    a pretrained checkpoint with ``embedding_init="transfer"`` are not refused.
    """


def _shown(names: Iterable[object], limit: int = 20) -> str:
    cols = [str(c) for c in names]
    text = ", ".join(repr(c) for c in cols[:limit]) + (" ..." if len(cols) > limit else "")
    return text or "(none)"


def missing_column(keyword: str, key: str, columns: Iterable[object], where: str) -> str:
    """``{keyword}={key!r} is not a column of {where}; columns are: ...``.

    Examples
    --------
    >>> missing_column("labels_key", "ADNC", ["celltype"], "adata.obs")
    "labels_key='ADNC' is not a column of adata.obs; columns are: 'celltype'"
    """
    return f"{keyword}={key!r} is not a column of {where}; columns are: {_shown(columns)}"


def missing_layer(layer: str, layers: Iterable[object]) -> str:
    """The message of a ``layer`` that ``adata.layers`` does not hold."""
    existing = [str(k) for k in layers]
    return (
        f"layer {layer!r} not found in adata.layers; existing layers: "
        f"{existing if existing else 'none'} (use layer=None for adata.X)"
    )


def missing_raw(layers: Iterable[object]) -> str:
    """The message of ``use_raw=True`` on an AnnData without ``raw``."""
    existing = [str(k) for k in layers]
    return (
        "adata.raw is None: use_raw=True reads counts from adata.raw.X, which this "
        f"AnnData does not have; layers: {existing if existing else 'none'} "
        "(pass layer=... naming one, or use_raw=False for adata.X)"
    )
