"""What a ``finetune`` run does at either level (cells: :mod:`cellfm_sc.cli.finetune`, donors:
:mod:`cellfm_sc.cli._donor`): options to keywords, the resolved config, the logger, the
held-out cells the report scores and the files every run writes. Both levels import this
module (``pretrain`` its train keywords and resolved config); it imports none of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellfm_sc import __version__
from cellfm_sc.cli._console import Console, show_progress
from cellfm_sc.cli._files import RunDirectory, write_split_h5ads

# the resolved finetune options that are not argparse bookkeeping
FINETUNE_KEYS = (
    "data",
    "labels_key",
    "donor_key",
    "label_order",
    "layer",
    "use_raw",
    "gene_symbols",
    "backed",
    "split_json",
    "split_key",
    "validation_size",
    "test_size",
    "checkpoint",
    "vocabulary",
    "hgnc_table",
    "num_heads",
    "preset",
    "embedding_init",
    "trainable",
    "recipe",
    "max_tokens",
    "level",
    "auto_folds",
    "bag_size",
    "output_dir",
    "no_baseline",
    "batch_size",
    "epochs",
    "lr",
    "lr_schedule",
    "weight_decay",
    "eval_every_steps",
    "early_stopping",
    "patience",
    "monitor",
    "class_weights",
    "depth_augmentation",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "num_workers",
    "gradient_checkpointing",
    "logger",
    "seed",
    "write_split_h5ad",
    "resume",
    "keep_checkpoints",
    "quiet",
    "progress",
    "debug",
)


def build_labelled_model(
    cls: Any, opts: dict[str, Any], con: Console, adata: Any, **kwargs: Any
) -> Any:
    """Set ``adata`` up for the labelled model class ``cls`` and build it from the options
    (``kwargs``: the class's own constructor keywords); every data and model error comes
    before any file is written."""
    cls.setup_anndata(
        adata,
        labels_key=opts["labels_key"],
        donor_key=opts.get("donor_key"),
        layer=opts.get("layer"),
        gene_symbols=opts.get("gene_symbols"),
        label_order=opts.get("label_order"),
        use_raw=bool(opts.get("use_raw")),
    )
    model = cls(adata, **kwargs, **model_kwargs(opts, con))
    con.info(str(model.summary))
    return model


def model_kwargs(opts: dict[str, Any], con: Console) -> dict[str, Any]:
    """Constructor keywords every fine-tuned model class takes (says when no checkpoint)."""
    if not opts.get("checkpoint"):
        con.info(
            f"no --checkpoint: a randomly initialised '{opts.get('preset')}' trunk is trained "
            "(no pretrained CellFM weights)"
        )
    return {
        "checkpoint": opts.get("checkpoint"),
        "vocabulary_file": opts.get("vocabulary"),
        "num_heads": opts.get("num_heads"),
        "preset": opts.get("preset"),
        "embedding_init": opts.get("embedding_init", "random"),
        "trainable": opts.get("trainable", "auto"),
        "max_tokens": opts.get("max_tokens", 2048),
        "seed": opts.get("seed", 0),
        "hgnc_table": opts.get("hgnc_table"),
    }


def make_logger(kind: str, folder: Path) -> Any:
    """The Lightning logger of ``--logger`` under ``folder`` (``False`` for ``none``)."""
    if kind == "none":
        return False
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cls = TensorBoardLogger if kind == "tensorboard" else CSVLogger
    return cls(str(folder), name="", version="")


def train_kwargs(opts: dict[str, Any], out: Path, resume_from: Path | None) -> dict[str, Any]:
    """The ``train`` keywords every training command (``finetune`` at either level,
    ``pretrain``) takes the same way from its options."""
    return {
        "max_epochs": opts["epochs"],
        "validation_size": opts.get("validation_size", 0.1),
        "lr": opts.get("lr", "auto"),
        "lr_schedule": opts.get("lr_schedule", "warmup_cosine"),
        "weight_decay": opts.get("weight_decay", 1e-5),
        "patience": max(opts.get("patience", 3), 1),
        "precision": opts.get("precision"),
        "accelerator": opts.get("accelerator", "auto"),
        "devices": opts.get("devices", "auto"),
        "strategy": opts.get("strategy"),
        "num_workers": opts.get("num_workers", 0),
        "checkpoint_dir": str(out),
        "keep_checkpoints": opts.get("keep_checkpoints", 1),
        "resume_from": str(resume_from) if resume_from else None,
        "enable_progress_bar": show_progress(opts),
    }


def write_resolved_config(
    work: Path, resolved: dict[str, Any], resume_from: Path | None, **facts: Any
) -> None:
    """``config_resolved.json``: the options as the run used them (``resolved``), then
    ``facts`` (the command, ...), the cellfm-sc version and the checkpoint resumed from."""
    from cellfm_sc._atomic import write_json_atomic

    resume = str(resume_from) if resume_from else None
    resolved.update(facts, cellfm_sc_version=__version__, resume_from=resume)
    write_json_atomic(work / "config_resolved.json", resolved)


def held_out(model: Any, con: Console, unit: str) -> tuple[str, str]:
    """``(where, indices)`` the report scores: the test split, else the validation split
    (with a warning), else the training cells; ``unit`` is ``"cells"`` or ``"donors"``."""
    n_test, n_val = len(model.test_indices), len(model.validation_indices)
    cells = unit == "cells"
    if n_test:
        where, indices = f"test {'split' if cells else 'donors'} ({n_test:,} cells)", "test"
    elif n_val:
        where = (
            f"validation split ({n_val:,} cells; no test split: optimistic)"
            if cells
            else "validation donors (no test split: optimistic)"
        )
        indices = "validation"
        con.warn(
            "no test split (--test-size 0): the report scores the validation cells, which chose the model"
            if cells
            else "no test split (--test-size 0): the report scores the validation donors"
        )
    else:
        where, indices = f"training {unit} (nothing held out: optimistic)", "train"
        con.warn(f"nothing was held out; the report scores the training {unit}")
    con.info(f"evaluating on the {where}")
    return where, indices


def train_and_report(
    opts: dict[str, Any],
    con: Console,
    model: Any,
    adata: Any,
    split: Any,
    run_dir: RunDirectory,
    resume_from: Path | None,
    started: float,
    demo: bool,
    *,
    unit: str,
    train: dict[str, Any],
    evaluate: dict[str, Any] | None = None,
    level_files: Callable[[Path, dict[str, Any]], None] | None = None,
    split_obsm: Callable[[], list[str]],
) -> dict[str, Any]:
    """The run of either level inside the run directory's transaction; returns its facts.

    Writes the resolved config (``config_resolved.json``: every finetune option as the run
    used it), trains ``model`` (``train``: the level's own ``train`` keywords beside
    :func:`train_kwargs`), keeps its best weights in ``best_model.pth`` (a plain state dict),
    scores the held-out ``unit`` (``evaluate``: the level's own ``evaluate`` keywords) into
    the report, lets ``level_files(work, files)`` add the level's own files, saves the model,
    and with ``--write-split-h5ad`` writes the split files with the obsm keys
    ``split_obsm()`` returns (it annotates ``adata`` first where the level has not).
    """
    import torch

    from cellfm_sc._atomic import atomic_path
    from cellfm_sc.report import write_report

    work, out = run_dir.work, run_dir.out
    write_resolved_config(
        work,
        {k: opts.get(k) for k in FINETUNE_KEYS if k in opts},
        resume_from,
        command="demo" if demo else "finetune",
        config=opts.get("config"),
    )
    model.train(
        **train,
        **train_kwargs(opts, out, resume_from),
        split=split,
        test_size=opts.get("test_size", 0.1),
        monitor=opts.get("monitor", "auto"),
        logger=make_logger(opts.get("logger", "csv"), work / "logs"),
        **({"num_nodes": opts["num_nodes"]} if opts.get("num_nodes", 1) > 1 else {}),
    )
    if model.global_rank_ != 0:
        return {"rank": model.global_rank_}  # under DDP only the first process writes

    with atomic_path(work / "best_model.pth") as tmp:  # the model holds the best weights now
        torch.save(model.export_state_dict(), tmp)
    where, indices = held_out(model, con, unit)
    result = model.evaluate(
        indices=indices,
        enable_progress_bar=show_progress(opts),
        baseline=not opts.get("no_baseline"),
        **(evaluate or {}),
    )
    info = dict(model.report_info())
    if opts.get("_level_selection") is not None:  # --level auto
        info["level_selection"] = opts["_level_selection"].to_dict()
    files = dict(write_report(work, result, history=model.history, info=info))
    if level_files is not None:
        level_files(work, files)
    model.save(str(work / "model"), overwrite=True)
    files["model"] = work / "model"
    files["best_model"] = work / "best_model.pth"
    files["config_resolved"] = work / "config_resolved.json"
    if (work / "logs").is_dir():
        files["logs"] = work / "logs"
    if opts.get("write_split_h5ad"):
        files.update(write_split_h5ads(adata, model, work, split_obsm(), "cellfm"))
    return {
        "rank": 0,
        "result": result,
        "files": {k: out / Path(v).name for k, v in files.items()},
        "where": where,
        "elapsed": time.perf_counter() - started,
        "model": model,
    }
