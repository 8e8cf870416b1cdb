"""Plots of a fine-tuning run: confusion matrix, training curves, embedding (``cellfm_sc.pl``).

The functions follow scanpy's conventions:

* ``show=None`` shows the figure when the matplotlib backend is interactive and nothing is
  saved; ``show=True`` calls ``plt.show()`` and returns ``None``; ``show=False`` returns the
  :class:`~matplotlib.figure.Figure`.
* ``save="path.png"`` writes the figure (atomically: temporary file, then rename) to that
  exact path (unlike scanpy, no ``figdir`` prefix is added); the format follows the suffix.

matplotlib and scanpy are imported inside the functions, so importing this module is cheap.

Examples
--------
>>> import cellfm_sc as cfm
>>> fig = cfm.pl.confusion_matrix(result, show=False)  # doctest: +SKIP
>>> cfm.pl.training_curves(model.history, save="curves.png", show=False)  # doctest: +SKIP
>>> cfm.pl.embedding(adata, color=["label", "cellfm_prediction"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from cellfm_sc._atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "confusion_matrix",
    "embedding",
    "pretraining_curves",
    "save_figure",
    "training_curves",
]

_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def save_figure(
    fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150, **kwargs: Any
) -> Path:
    """Save a matplotlib figure atomically, rendered with a non-interactive backend.

    The format follows the suffix of ``path`` (default PNG); the user's pyplot backend is
    not changed.

    Examples
    --------
    >>> save_figure(fig, "out/confusion_matrix.png")  # doctest: +SKIP
    """
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    kwargs.setdefault("bbox_inches", "tight")
    # Agg renders raster formats; vector formats use their own (also non-interactive) backend
    backend = "agg" if fmt in ("png", "jpg", "jpeg", "tif", "tiff", "webp", "raw", "rgba") else None
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, backend=backend, **kwargs)
    return target


def _finish(fig: Figure, show: bool | None, save: str | os.PathLike[str] | None) -> Figure | None:
    """Save and/or show ``fig`` following scanpy's ``show``/``save`` conventions."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        save_figure(fig, save)
    if show is None:
        show = save is None and matplotlib.get_backend().lower() not in _NON_INTERACTIVE
    if show:
        plt.show()
        return None
    return fig


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def confusion_matrix(
    cm: Any,
    classes: Sequence[str] | None = None,
    normalize: bool = True,
    *,
    level: Literal["cell", "donor"] = "cell",
    title: str | None = None,
    cmap: str = "Blues",
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
    ax: Axes | None = None,
) -> Figure | None:
    """Heat map of a confusion matrix (rows true, columns predicted).

    Parameters
    ----------
    cm
        A ``(K, K)`` count matrix, or an :class:`~cellfm_sc.metrics.EvaluationResult`
        (its cell-level matrix, or the donor-level one with ``level="donor"``).
    classes
        ``K`` class names; taken from the result when ``cm`` is one, else ``0 .. K-1``.
    normalize
        Colour by the row-normalised fraction (recall per true class); cells are annotated
        with the fraction and the count. ``False`` colours by counts.
    level
        With an ``EvaluationResult``: ``"cell"`` or ``"donor"`` confusion matrix.
    title
        Axes title; a default names the level and the normalisation.
    cmap
        Matplotlib colour map.
    show, save
        See the module docstring.
    ax
        Draw into this axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure or None
        ``None`` when shown.

    Examples
    --------
    >>> fig = confusion_matrix(np.array([[5, 1], [2, 7]]), ["a", "b"], show=False)
    >>> len(fig.axes)  # the matrix and its colour bar
    2
    """
    if hasattr(cm, "confusion") and hasattr(cm, "classes"):
        result = cm
        classes = list(result.classes) if classes is None else list(classes)
        if level == "donor":
            if result.donor_table is None:
                raise ValueError("this result has no donor table (no donors were given)")
            from cellfm_sc.metrics import confusion_matrix as _cm

            table = result.donor_table
            matrix = _cm(
                table["true"].cat.codes.to_numpy(),
                table["predicted"].cat.codes.to_numpy(),
                n_classes=len(classes),
            )
        else:
            matrix = np.asarray(result.confusion)
    else:
        matrix = np.asarray(cm)
    if level not in ("cell", "donor"):
        raise ValueError(f"level must be 'cell' or 'donor', got {level!r}")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
    k = matrix.shape[0]
    classes = [str(c) for c in (classes if classes is not None else range(k))]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for a {k} x {k} matrix")

    counts = matrix.astype(float)
    row_sum = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_sum, out=np.zeros_like(counts), where=row_sum > 0)
    values = frac if normalize else counts
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)

    side = max(3.2, 0.55 * k + 2.2)
    fig, ax = _new_axes(ax, (side + 1.0, side))
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class" if normalize else "count")
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title is None:
        title = f"{level.capitalize()}-level confusion matrix"
        title += " (row-normalised)" if normalize else ""
    ax.set_title(title)
    if k <= 20:
        fontsize = 9 if k <= 8 else 7
        for i in range(k):
            for j in range(k):
                n = int(matrix[i, j])
                if not normalize:
                    text = str(n)
                elif k <= 10:
                    text = f"{frac[i, j]:.2f}\n({n})"
                else:
                    text = f"{frac[i, j]:.2f}"
                dark = values[i, j] > 0.6 * vmax
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if dark else "black",
                )
    return _finish(fig, show, save)


_CURVES = {
    "loss": (("train_loss", "train"), ("validation_loss", "validation")),
    "accuracy": (("train_acc", "train"), ("validation_acc", "validation")),
}


def training_curves(
    history: pd.DataFrame | Mapping[str, Sequence[float]],
    *,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure | None:
    """Loss and accuracy per epoch, train vs validation (two panels).

    Parameters
    ----------
    history
        One row per epoch with columns ``epoch`` (optional; default ``1 .. n``),
        ``train_loss``, ``train_acc``, ``validation_loss``, ``validation_acc``. Missing
        columns and NaN entries (e.g. epochs without validation) are skipped.
    title
        Figure title.
    show, save
        See the module docstring.

    Returns
    -------
    matplotlib.figure.Figure or None

    Examples
    --------
    >>> h = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "train_acc": [0.5, 0.8]})
    >>> fig = training_curves(h, show=False)
    >>> [a.get_title() for a in fig.axes]
    ['loss', 'accuracy']
    """
    import matplotlib.pyplot as plt

    hist = pd.DataFrame(history)
    if "epoch" in hist:
        epochs = hist["epoch"].to_numpy()
    else:
        epochs = np.arange(1, len(hist) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    colours = {"train": "tab:blue", "validation": "tab:orange"}
    for ax, (panel, series) in zip(axes, _CURVES.items()):
        drawn = 0
        for column, label in series:
            if column not in hist:
                continue
            y = pd.to_numeric(hist[column], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(y)
            if not ok.any():
                continue
            ax.plot(epochs[ok], y[ok], marker="o", markersize=3, label=label, color=colours[label])
            drawn += 1
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(frameon=False)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        if panel == "accuracy" and drawn:
            ax.set_ylim(-0.02, 1.02)
        if len(epochs) and len(epochs) <= 20:
            ax.set_xticks(np.unique(epochs))
    if title:
        fig.suptitle(title)
    return _finish(fig, show, save)


_PRETRAINING_PANELS = (
    ("loss", "masked-value loss"),
    ("value_mse", "value decoder MSE"),
    ("cellwise_mse", "cellwise decoder MSE"),
)


def pretraining_curves(
    history: pd.DataFrame | Mapping[str, Sequence[float]],
    *,
    probe_initial: float | Mapping[str, float] | None = None,
    title: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure | None:
    """Masked-value loss and its two parts per epoch, train vs validation (three panels),
    and the probe's macro-F1 beside them when the history has it (a fourth panel).

    Parameters
    ----------
    history
        ``CellFMPretrainer.history``: one row per
        epoch with ``epoch`` (optional), ``train_loss``, ``validation_loss``,
        ``train_value_mse``, ``validation_value_mse``, ``train_cellwise_mse``,
        ``validation_cellwise_mse`` and, from ``train(probe=...)``, ``probe_macro_f1``.
        Missing columns and NaN entries are skipped.
    probe_initial
        The probe's score before training, drawn as a dashed line (where the probe curve
        rises above it, pretraining helps); for several probes a dict by history column.
    title, show, save
        See the module docstring.

    Examples
    --------
    >>> h = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5]})
    >>> fig = pretraining_curves(h, show=False)
    >>> [a.get_title() for a in fig.axes]
    ['masked-value loss', 'value decoder MSE', 'cellwise decoder MSE']
    >>> h["probe_macro_f1"] = [0.4, 0.6]
    >>> [a.get_title() for a in pretraining_curves(h, show=False).axes][-1]
    'probe macro-F1'
    """
    import matplotlib.pyplot as plt

    hist = pd.DataFrame(history)
    epochs = hist["epoch"].to_numpy() if "epoch" in hist else np.arange(1, len(hist) + 1)
    probe_columns = [c for c in hist.columns if c.startswith("probe_") and c.endswith("macro_f1")]
    has_probe = bool(probe_columns)
    n_panels = 4 if has_probe else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(4.0 * n_panels, 3.6), layout="constrained")
    colours = {"train": "tab:blue", "validation": "tab:orange"}
    for ax, (key, panel) in zip(axes, _PRETRAINING_PANELS):
        drawn = 0
        for part in ("train", "validation"):
            column = f"{part}_{key}"
            if column not in hist:
                continue
            y = pd.to_numeric(hist[column], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(
                    epochs[ok], y[ok], marker="o", markersize=3, label=part, color=colours[part]
                )
                drawn += 1
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(frameon=False)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        if len(epochs) and len(epochs) <= 20:
            ax.set_xticks(np.unique(epochs))
    if has_probe:
        ax = axes[3]
        if not isinstance(probe_initial, Mapping):
            probe_initial = {probe_columns[0]: probe_initial} if probe_initial is not None else {}
        for i, column in enumerate(probe_columns):
            colour = plt.get_cmap("tab10")(2 + i)
            name = column[len("probe_") : -len("macro_f1")].strip("_") or "probe"
            y = pd.to_numeric(hist[column], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(y)
            ax.plot(epochs[ok], y[ok], marker="o", markersize=3, color=colour, label=name)
            start = probe_initial.get(column)
            if start is not None and np.isfinite(start):
                ax.axhline(start, ls="--", color=colour, alpha=0.6, label=f"{name}, before")
        ax.set_title("probe macro-F1")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        if len(epochs) and len(epochs) <= 20:
            ax.set_xticks(np.unique(epochs))
    if title:
        fig.suptitle(title)
    return _finish(fig, show, save)


def embedding(
    adata_or_embedding: Any,
    color: str | Sequence[str] | None = None,
    *,
    basis: str = "X_cellfm",
    obs: pd.DataFrame | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    key_added: str | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Figure | None:
    """UMAP of a cell embedding (default ``obsm["X_cellfm"]``), coloured by ``obs`` columns.

    A thin wrapper of :func:`scanpy.pp.neighbors`, :func:`scanpy.tl.umap` and
    :func:`scanpy.pl.embedding`, run on a throwaway AnnData that holds only ``obs`` and the
    embedding (never the count matrix); the caller's AnnData is not modified unless
    ``key_added`` is given.

    Parameters
    ----------
    adata_or_embedding
        An AnnData with ``obsm[basis]``, or an ``(n_cells, d)`` array.
    color
        ``obs`` column(s) to colour by (scanpy's ``color``).
    basis
        ``obsm`` key of the embedding. A 2-column embedding is drawn as is (no UMAP).
    obs
        Cell annotations for an array input (``n_cells`` rows).
    n_neighbors, random_state
        Passed to scanpy's neighbours and UMAP.
    key_added
        With an AnnData: ``obsm`` key to store the 2-d UMAP under, and to reuse when it is
        already there (e.g. ``"X_cellfm_umap"``).
    show, save
        See the module docstring.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``palette``, ``legend_loc``, ``size`` ...).

    Returns
    -------
    matplotlib.figure.Figure or None

    Examples
    --------
    >>> emb = np.random.default_rng(0).normal(size=(200, 16))
    >>> obs = pd.DataFrame({"label": pd.Categorical(np.repeat(["a", "b"], 100))})
    >>> fig = embedding(emb, color="label", obs=obs, show=False)  # doctest: +SKIP
    """
    import anndata as ad
    import scanpy as sc

    stored = None
    if isinstance(adata_or_embedding, ad.AnnData):
        adata = adata_or_embedding
        if key_added is not None and key_added in adata.obsm:
            stored = np.asarray(adata.obsm[key_added])
        if basis not in adata.obsm:
            raise KeyError(
                f"obsm[{basis!r}] not found; available: {list(adata.obsm.keys())} "
                "(run model.get_latent_representation() and store it there first)"
            )
        x = np.asarray(adata.obsm[basis])
        cell_obs = adata.obs.copy() if obs is None else obs
    else:
        adata = None
        x = np.asarray(adata_or_embedding)
        if x.ndim != 2:
            raise ValueError(f"an embedding must be (n_cells, d), got shape {x.shape}")
        cell_obs = obs if obs is not None else pd.DataFrame(index=range(x.shape[0]))
    n = x.shape[0]
    if len(cell_obs) != n:
        raise ValueError(f"obs has {len(cell_obs)} rows for {n} embedding rows")
    cell_obs = cell_obs.copy()
    cell_obs.index = cell_obs.index.astype(str)
    colours = [color] if isinstance(color, str) else list(color or [])
    missing = [c for c in colours if c not in cell_obs.columns]
    if missing:
        raise KeyError(f"obs column(s) {missing} not found; available: {list(cell_obs.columns)}")

    tmp = ad.AnnData(obs=cell_obs, obsm={basis: x})
    if stored is not None:
        coords = stored
    elif x.shape[1] == 2:
        coords = x
    else:
        extra = {"transformer": "sklearn"} if n <= 10_000 else {}
        sc.pp.neighbors(
            tmp,
            n_neighbors=min(n_neighbors, max(n - 1, 2)),
            use_rep=basis,
            random_state=random_state,
            **extra,
        )
        sc.tl.umap(tmp, random_state=random_state)
        coords = tmp.obsm["X_umap"]
        if adata is not None and key_added is not None:
            adata.obsm[key_added] = coords
    tmp.obsm["X_plot"] = np.asarray(coords)
    # scanpy's default (120000 / n) draws very large dots for a few hundred cells
    kwargs.setdefault("size", min(120_000 / max(n, 1), 40.0))
    with warnings.catch_warnings():
        # scanpy-internal matplotlib deprecation noise (cmap.set_bad), not the user's concern
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        fig = sc.pl.embedding(
            tmp, basis="X_plot", color=colours or None, show=False, return_fig=True, **kwargs
        )
    name = basis if (x.shape[1] == 2 and stored is None) else "UMAP"
    for ax in fig.axes:
        if ax.get_xlabel().lower().startswith(("x_plot", "plot")):
            ax.set_xlabel(f"{name}1")
            ax.set_ylabel(f"{name}2")
    return _finish(fig, show, save)
