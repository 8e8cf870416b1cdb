"""``cellfm-sc finetune --level donor``: train a :class:`~cellfm_sc.model.CellFMDonorClassifier`.

Its :func:`donor_level` runs in :mod:`cellfm_sc.cli.finetune`'s run-directory transaction and
writes, besides the usual report (``training_results.json`` with donor metrics and their
bootstrap intervals, ``donor_predictions.csv``, ``predictions.csv``, plots, ``model/``,
``best_model.pth``):

``attention.csv``
    Every cell: ``obs_name``, ``donor``, ``split``, ``attention`` (its weight within its
    donor; a donor's weights sum to 1) and ``donor_prediction``.
``attention_umap.png``
    UMAP of the cell embeddings coloured by attention (and by the donor's prediction).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from cellfm_sc.cli._console import CLIError, Console, show_progress
from cellfm_sc.cli._run import build_labelled_model, model_kwargs

#: the donor model's selection quantities among ``--monitor``'s choices
_DONOR_MONITORS = (
    "auto",
    "validation_loss",
    "validation_donor_qwk",
    "validation_donor_balanced_acc",
)


def _check_options(opts: dict[str, Any]) -> None:
    if opts.get("monitor", "auto") not in _DONOR_MONITORS:
        raise CLIError(
            f"--monitor {opts['monitor']} is a cell-level quantity; --level donor follows one of "
            f"{', '.join(_DONOR_MONITORS)}"
        )
    if opts.get("class_weights", "none") != "none":
        raise CLIError("--class-weights applies to --level cell only (donor bags weigh the same)")
    if opts.get("eval_every_steps"):
        raise CLIError("--eval-every-steps applies to --level cell only (donor level: per epoch)")


def build_donor_model(opts: dict[str, Any], con: Console, adata: Any) -> Any:
    """Set the data up and build the donor model: every data and model error comes before
    any file is written."""
    from cellfm_sc.model import CellFMDonorClassifier

    _check_options(opts)
    con.info(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes; donor labels "
        f"obs[{opts['labels_key']!r}], donors obs[{opts['donor_key']!r}]"
    )
    bag_size = opts.get("bag_size", 128)
    return build_labelled_model(CellFMDonorClassifier, opts, con, adata, bag_size=bag_size)


def choose_level(opts: dict[str, Any], con: Console, adata: Any, split: Any) -> Any:
    """``--level auto``: run :func:`cellfm_sc.select_level` on the training + validation
    donors of the split, set ``opts["level"]`` to the better CellFM level (``"donor"`` or
    ``"cell"``) and keep the selection in ``opts["_level_selection"]``; returns the split (made
    here by donor when the options give none, so that the chosen model trains on it)."""
    from cellfm_sc.data import split_by_donor
    from cellfm_sc.model import select_level

    _check_options(opts)
    if split is None:
        split = split_by_donor(
            adata,
            opts["donor_key"],
            opts["labels_key"],
            opts.get("test_size", 0.1),
            opts.get("validation_size", 0.1),
            opts.get("seed", 0),
        )
    rows = np.sort(np.concatenate([split.train, split.validation]))
    k = opts.get("auto_folds", 5)
    con.info(
        f"--level auto: inner {k}-fold cross-validation of pseudo-bulk, the donor model and the "
        f"cell classifier on the {len(rows):,} training + validation cells"
    )
    kwargs = model_kwargs(opts, con)
    try:
        sel = select_level(
            adata,
            opts["labels_key"],
            opts["donor_key"],
            label_order=opts.get("label_order"),
            indices=rows,
            k=k,
            layer=opts.get("layer"),
            use_raw=bool(opts.get("use_raw")),
            gene_symbols=opts.get("gene_symbols"),
            model_kwargs=kwargs,
            donor_kwargs={"bag_size": opts.get("bag_size", 128)},
            train_kwargs={"max_epochs": opts["epochs"], "lr": opts.get("lr", "auto")},
            cell_train_kwargs={"batch_size": opts.get("batch_size", 16)},
            seed=opts.get("seed", 0),
        )
    except ValueError as exc:
        raise CLIError(f"--level auto: {exc}") from exc
    chosen = sel.best_of(("donor", "cell"))
    con.info(str(sel))
    if sel.winner == "pseudobulk":
        con.warn(
            f"--level auto: pseudo-bulk beat both CellFM levels on the training donors (by "
            f"{sel.scores['pseudobulk'] - sel.scores[chosen]:.3f} {sel.metric} over the better "
            f"one, {chosen}); {chosen} is trained, and the report shows pseudo-bulk on the "
            "test donors beside it"
        )
    opts["level"] = chosen
    opts["_level_selection"] = sel
    return split


def donor_level(opts: dict[str, Any], con: Console, model: Any, adata: Any) -> dict[str, Any]:
    """The donor level's part of :func:`~cellfm_sc.cli._run.train_and_report` for ``model``
    (from :func:`build_donor_model`): its ``train`` and ``evaluate`` keywords, and the
    attention files beside the report."""
    early = {"auto": False, "on": True, "off": False}[opts.get("early_stopping", "auto")]
    batch = max(opts.get("batch_size", 16), 64)
    return {
        "unit": "donors",
        "train": {
            "early_stopping": early and opts.get("patience", 3) > 0,
            "gradient_checkpointing": True if opts.get("gradient_checkpointing") else "auto",
        },
        "evaluate": {"batch_size": batch},
        "level_files": functools.partial(_write_attention, opts, con, model, adata, batch),
        "split_obsm": lambda: ["X_cellfm"],
    }


def _write_attention(
    opts: dict[str, Any],
    con: Console,
    model: Any,
    adata: Any,
    batch: int,
    work: Path,
    files: dict[str, Any],
) -> None:
    """Every cell's attention within its donor (``attention.csv``), and the UMAP coloured by
    it (``attention_umap.png``)."""
    from cellfm_sc import plotting
    from cellfm_sc._atomic import atomic_path
    from cellfm_sc.report import UMAP_MAX_CELLS

    model.annotate(adata, batch_size=batch, enable_progress_bar=show_progress(opts))
    table = adata.obs[[opts["donor_key"]]].copy()
    table.columns = ["donor"]
    table["split"] = adata.obs["cellfm_split"].astype(str)
    table["attention"] = adata.obs["cellfm_attention"]
    table["donor_prediction"] = adata.obs["cellfm_donor_prediction"]
    with atomic_path(work / "attention.csv") as tmp:
        table.to_csv(tmp, index_label="obs_name")
    files["attention"] = work / "attention.csv"
    if adata.n_obs <= UMAP_MAX_CELLS:
        import matplotlib.pyplot as plt

        obs = table[["attention", "donor_prediction"]].copy()
        fig = plotting.embedding(
            adata.obsm["X_cellfm"],
            color=["attention", "donor_prediction"],
            obs=obs,
            show=False,
            wspace=0.35,
        )
        try:
            plotting.save_figure(fig, work / "attention_umap.png")
        finally:
            plt.close(fig)
        files["attention_umap"] = work / "attention_umap.png"
    else:
        con.warn(f"attention_umap.png skipped: {adata.n_obs:,} cells > {UMAP_MAX_CELLS:,}")
