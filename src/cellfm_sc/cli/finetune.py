"""``cellfm-sc finetune``: fine-tune on an ``.h5ad`` file and write the model and a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cellfm_sc import __version__
from cellfm_sc._constants import (
    EMBEDDING_INITS,
    FINETUNE_RECIPES,
    LR_SCHEDULES,
    MONITORS,
    PRESET_NAMES,
    TRAINABLE_POLICIES,
)
from cellfm_sc.cli._common import (
    CLIError,
    Console,
    Formatter,
    RunDirectory,
    add_diagnostics,
    add_hardware_args,
    add_keep_checkpoints,
    checkpoints_line,
    existing_file,
    label_order_type,
    lr_type,
    message_of,
    newest_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_int,
    quiet_libraries,
    read_h5ad,
    resume_checkpoint,
    show_progress,
    split_size,
    writable_dir,
    write_split_h5ads,
)
from cellfm_sc.cli._precheck import (
    check_data_columns,
    check_hardware,
    check_split_json,
    read_header,
)

__all__ = ["add_parser", "add_training_options", "finetune", "run"]

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

OUTPUT_FILES = (
    ("model", "saved model (CellFMClassifier.load)"),
    ("best_model", "best weights (state dict)"),
    ("training_results", "metrics and run facts"),
    ("predictions", "per-cell predictions"),
    ("donor_predictions", "per-donor predictions"),
    ("confusion_matrix", "confusion matrix"),
    ("training_curves", "training curves"),
    ("umap", "UMAP of X_cellfm"),
    ("attention", "per-cell attention within its donor (--level donor)"),
    ("attention_umap", "UMAP coloured by attention (--level donor)"),
    ("config_resolved", "options used"),
    ("logs", "CSV log of every logged metric"),
    ("train_h5ad", "train cells: obs + X_cellfm"),
    ("validation_h5ad", "validation cells: obs + X_cellfm"),
    ("test_h5ad", "test cells: obs + X_cellfm"),
)


def add_training_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Options shared by ``finetune`` (all) and ``demo`` (the number of epochs)."""
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs",
        metavar="N",
        type=positive_int,
        default=5 if demo else 20,
        help="maximum epochs",
    )
    if demo:
        return
    train.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=16, help="cells per batch"
    )
    train.add_argument(
        "--lr",
        type=lr_type,
        default="auto",
        help="learning rate (AdamW); auto: 1e-3 for a random trunk, for a pretrained one 1e-4 "
        "at the released width (1536) and 1e-3 for narrower trunks",
    )
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="warmup_cosine",
        help="warmup_cosine: linear warm-up over 5%% of the steps, then cosine to 0; step: "
        "x0.95 per epoch (the original scripts)",
    )
    train.add_argument(
        "--weight-decay",
        metavar="WD",
        type=non_negative_float,
        default=1e-5,
        help="AdamW weight decay",
    )
    train.add_argument(
        "--eval-every-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="also score the validation cells every N training steps (default: once per epoch)",
    )
    train.add_argument(
        "--monitor",
        choices=MONITORS,
        default="auto",
        help="what chooses the kept weights (and stops early); auto: validation donors' QWK "
        "(ordinal) or balanced accuracy when labels belong to donors, else validation loss",
    )
    train.add_argument(
        "--early-stopping",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on from 1,000 validation cells (or 10 validation donors), off below",
    )
    train.add_argument(
        "--patience",
        metavar="N",
        type=non_negative_int,
        default=3,
        help="early stopping: evaluations without improvement (0 turns early stopping off)",
    )
    train.add_argument(
        "--class-weights",
        choices=("none", "balanced", "balanced_donors"),
        default="none",
        help="balanced: classes weigh the same; balanced_donors: donors weigh the same",
    )
    train.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seed of splits, init and sampling"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint_epoch_*.pth in --output-dir",
    )
    add_hardware_args(p, num_nodes=True)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune CellFM on an .h5ad file and write the model and a report",
        description="Fine-tune CellFM on DATA.h5ad (raw counts in X or --layer) to predict "
        "obs[--labels-key], evaluate the restored best model on the test split, and write "
        "into --output-dir:\n"
        "  best_model.pth            state dict of the best model (plain tensors)\n"
        "  checkpoint_epoch_N.pth    the newest epoch's and the best's (for --resume; "
        "--keep-checkpoints)\n"
        "  model/                    the saved model (CellFMClassifier.load)\n"
        "  training_results.json     metrics, histories, run facts\n"
        "  predictions.csv, donor_predictions.csv, *.png, logs/metrics.csv\n"
        "  config_resolved.json      the options used\n"
        "  train.h5ad, validation.h5ad, test.h5ad   with --write-split-h5ad\n"
        "The outputs appear when the run succeeds; a failed run leaves run.log (and the "
        "completed epoch checkpoints). Options may also come from --config (TOML, YAML or "
        "JSON); flags override the file.",
        formatter_class=Formatter,
    )
    p.add_argument(
        "data", metavar="DATA.h5ad", nargs="?", default=None, help="input AnnData (.h5ad)"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML, YAML or JSON file of options (keys as the long flags, e.g. labels_key or "
        "labels-key; optionally under a [finetune] table); flags given here override it",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--labels-key", metavar="COLUMN", default=None, help="obs column to predict (required)"
    )
    data.add_argument(
        "--donor-key",
        metavar="COLUMN",
        default=None,
        help="obs column of donors: donor-level split and metrics (QWK for ordinal labels)",
    )
    data.add_argument(
        "--label-order",
        type=label_order_type,
        default=None,
        metavar="A,B,C",
        help="comma-separated labels, lowest first: makes the labels ordinal "
        "(e.g. 'Not AD,Low,Intermediate,High')",
    )
    data.add_argument(
        "--layer", default=None, help="adata.layers key holding raw counts (default: X)"
    )
    data.add_argument(
        "--use-raw",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="raw counts are in adata.raw.X (the CELLxGENE layout; X holds normalised "
        "values of a gene subset); the genes are adata.raw.var_names",
    )
    data.add_argument(
        "--gene-symbols",
        metavar="COLUMN",
        default=None,
        help="var column of gene symbols when var_names are not symbols",
    )
    data.add_argument(
        "--backed",
        action="store_true",
        help="open DATA.h5ad backed (read rows from disk; for files larger than memory)",
    )
    split = p.add_argument_group("split")
    split.add_argument(
        "--split-json",
        metavar="FILE",
        default=None,
        help="split file with train_indices / test_indices (and val_indices)",
    )
    split.add_argument(
        "--split-key",
        metavar="COLUMN",
        default=None,
        help="obs column with values train / validation / test",
    )
    split.add_argument(
        "--validation-size",
        metavar="SIZE",
        type=split_size,
        default=0.1,
        help="fraction (or count) of donors, or of cells without --donor-key, for validation",
    )
    split.add_argument(
        "--test-size",
        metavar="SIZE",
        type=split_size,
        default=0.1,
        help="fraction (or count) held out for the final evaluation",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        metavar="CKPT",
        default=None,
        help="pretrained MindSpore CellFM checkpoint (e.g. CellFM_80M_weight.ckpt)",
    )
    model.add_argument(
        "--vocabulary",
        metavar="CSV",
        default=None,
        help="the checkpoint's gene vocabulary (CellFM's expand_gene_info.csv)",
    )
    model.add_argument(
        "--hgnc-table",
        metavar="FILE",
        default=None,
        help="HGNC table for alias / previous-symbol gene mapping",
    )
    model.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        metavar="N",
        help="retention heads of the checkpoint (48 assumed for the released models)",
    )
    model.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="model size without a checkpoint (randomly initialised)",
    )
    model.add_argument(
        "--embedding-init",
        choices=EMBEDDING_INITS,
        default="random",
        help="new gene-embedding table: random, or transfer CellFM's rows of mapped genes",
    )
    model.add_argument(
        "--trainable",
        choices=TRAINABLE_POLICIES,
        default="auto",
        help="what is trained; auto: everything the classification uses (encoder+head is the "
        "original scripts' policy)",
    )
    model.add_argument(
        "--recipe",
        choices=FINETUNE_RECIPES,
        default="auto",
        help="how a pretrained trunk is fine-tuned: auto (the measured winner after a "
        "--checkpoint, full without), full (everything at --lr), lp-ft (head first on frozen "
        "features, then everything, the trunk slower), llrd (trunk slower, layer-wise decay), "
        "lp-ft+llrd, frozen-rows (transferred gene rows frozen)",
    )
    model.add_argument(
        "--max-tokens",
        metavar="N",
        type=positive_int,
        default=2048,
        help="expressed genes per cell fed to the model (sampled when a cell has more)",
    )
    model.add_argument(
        "--level",
        choices=("cell", "donor", "auto"),
        default="cell",
        help="cell: classify cells (CellFMClassifier); donor: learn one label per donor from "
        "bags of its cells (CellFMDonorClassifier; needs --donor-key and a label that is "
        "constant within donors; a training step is one bag, --batch-size sets the "
        "inference batch); auto: compare the donor model, the cell classifier + mean and "
        "pseudo-bulk by an inner cross-validation on the training donors "
        "(cellfm_sc.select_level), then train the better CellFM level; the report says "
        "which won and by how much",
    )
    model.add_argument(
        "--auto-folds",
        metavar="K",
        type=positive_int,
        default=5,
        help="--level auto: inner cross-validation folds (>= 3)",
    )
    model.add_argument(
        "--bag-size",
        metavar="N",
        type=positive_int,
        default=128,
        help="--level donor: most cells per bag",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-dir", "-o", metavar="OUT", default=None, help="output directory (required)"
    )
    out.add_argument(
        "--write-split-h5ad",
        action="store_true",
        help="also write train.h5ad / validation.h5ad / test.h5ad: obs with predictions and "
        "obsm['X_cellfm'], no count matrix",
    )
    out.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the baselines fitted on the same split for the report's 'model vs "
        "baseline' (cells: logistic regression on log-normalised counts; donor labels: "
        "pseudo-bulk logistic regression)",
    )
    out.add_argument(
        "--logger",
        choices=("csv", "tensorboard", "none"),
        default="csv",
        help="where the training metrics are logged (under OUT/logs)",
    )
    add_keep_checkpoints(out)
    add_training_options(p)
    add_diagnostics(p)
    p.set_defaults(handler=run)
    return p


# --------------------------------------------------------------------------------------------
# validation before any work
# --------------------------------------------------------------------------------------------


def validate_options(opts: dict[str, Any], need_data: bool = True) -> None:
    missing = [
        flag
        for flag, key in (
            ("DATA.h5ad", "data"),
            ("--labels-key", "labels_key"),
            ("--output-dir", "output_dir"),
        )
        if opts.get(key) in (None, "") and (need_data or key != "data")
    ]
    if missing:
        raise CLIError(f"finetune needs {', '.join(missing)} (on the command line or in --config)")
    if opts.get("level", "cell") in ("donor", "auto") and not opts.get("donor_key"):
        raise CLIError(f"--level {opts['level']} needs --donor-key (the obs column of donors)")
    if opts.get("level") == "auto" and opts.get("auto_folds", 5) < 3:
        raise CLIError("--auto-folds must be >= 3 (one fold tests, one validates, the rest train)")
    if opts.get("level", "cell") == "donor" and opts.get("recipe", "auto") != "auto":
        raise CLIError("--recipe applies to --level cell; the donor model has its own recipe")
    if opts.get("split_json") and opts.get("split_key"):
        raise CLIError("give either --split-json or --split-key, not both")
    if opts.get("checkpoint") is None and opts.get("preset") is None:
        raise CLIError(
            "pass --checkpoint CKPT (a pretrained CellFM) or --preset "
            f"{{{','.join(PRESET_NAMES)}}} (a randomly initialised model)"
        )
    if opts.get("embedding_init") == "transfer":
        if opts.get("checkpoint") is None:
            raise CLIError("--embedding-init transfer needs --checkpoint")
        if opts.get("vocabulary") is None:
            raise CLIError(
                "--embedding-init transfer needs --vocabulary (the checkpoint's gene list, "
                "CellFM's expand_gene_info.csv)"
            )
    if opts.get("vocabulary") is not None and opts.get("checkpoint") is None:
        raise CLIError("--vocabulary belongs to a --checkpoint; pass both")
    for key, what in (
        ("checkpoint", "checkpoint"),
        ("vocabulary", "vocabulary file"),
        ("hgnc_table", "HGNC table"),
        ("split_json", "split file"),
    ):
        if opts.get(key) is not None:
            existing_file(opts[key], what)
    if need_data:
        existing_file(opts["data"], "data file")


def check_checkpoint(path: str) -> None:
    """Fail early, with a usage error, on a file that is not a sound MindSpore checkpoint."""
    from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint

    try:
        read_mindspore_checkpoint(path)
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint is not a readable MindSpore checkpoint: {exc}") from exc


def split_from_options(opts: dict[str, Any], adata: Any) -> Any:
    import json

    from cellfm_sc.data import split_from_json, split_from_obs

    if opts.get("split_json"):
        try:
            return split_from_json(opts["split_json"], adata)
        except json.JSONDecodeError as exc:
            raise CLIError(f"split file {opts['split_json']} is not JSON: {exc}") from exc
        except (ValueError, KeyError) as exc:
            raise CLIError(f"split file {opts['split_json']}: {message_of(exc)}") from exc
    if opts.get("split_key"):
        return split_from_obs(adata, opts["split_key"], donor_key=opts.get("donor_key"))
    return None


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def write_resolved_config(
    work: Path, opts: dict[str, Any], resume_from: Path | None, demo: bool
) -> None:
    """``config_resolved.json``: every finetune option as the run used it."""
    from cellfm_sc._atomic import write_json_atomic

    resolved = {k: opts.get(k) for k in FINETUNE_KEYS if k in opts}
    resolved.update(
        {
            "command": "demo" if demo else "finetune",
            "config": opts.get("config"),
            "cellfm_sc_version": __version__,
            "resume_from": str(resume_from) if resume_from else None,
        }
    )
    write_json_atomic(work / "config_resolved.json", resolved)


def _make_logger(kind: str, folder: Path) -> Any:
    if kind == "none":
        return False
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if kind == "tensorboard":
        return TensorBoardLogger(str(folder), name="", version="")
    return CSVLogger(str(folder), name="", version="")


def finetune(
    opts: dict[str, Any], con: Console, adata: Any = None, demo: bool = False
) -> dict[str, Any]:
    """The finetune path shared by ``finetune`` and ``demo``; returns the run's facts."""
    started = time.perf_counter()
    if adata is None:  # the file's columns and layers, read from its header in a moment
        check_data_columns(
            read_header(Path(opts["data"])),
            obs={
                "labels_key": opts.get("labels_key"),
                "donor_key": opts.get("donor_key"),
                "split_key": opts.get("split_key"),
            },
            layer=opts.get("layer"),
            use_raw=opts.get("use_raw"),
            gene_symbols=opts.get("gene_symbols"),
        )
    check_split_json(opts.get("split_json"))
    out = writable_dir(opts["output_dir"], "--output-dir")
    check_hardware(opts.get("accelerator", "auto"), opts.get("devices", "auto"))
    resume_from = resume_checkpoint(out) if opts.get("resume") else None
    if resume_from is None and out.is_dir() and newest_checkpoint(out) is not None:
        con.warn(
            f"{out} already holds checkpoint_epoch_*.pth files of an earlier run; this run "
            "overwrites those of the epochs it reaches (use --resume to continue that run "
            "instead, or another --output-dir)"
        )
    if opts.get("checkpoint"):
        check_checkpoint(opts["checkpoint"])

    quiet_libraries(bool(opts.get("quiet")))
    if adata is None:
        con.info(f"reading {opts['data']}" + (" (backed)" if opts.get("backed") else ""))
        adata = read_h5ad(Path(opts["data"]), backed=bool(opts.get("backed")))

    from cellfm_sc.data import obs_column

    for key, keyword in (("labels_key", "labels_key"), ("donor_key", "donor_key")):
        if opts.get(key):
            obs_column(adata, opts[key], keyword=keyword, allow_missing=True)
    split = split_from_options(opts, adata)
    if opts.get("level", "cell") == "auto":
        from cellfm_sc.cli._donor import choose_level

        split = choose_level(opts, con, adata, split)

    if opts.get("level", "cell") == "donor":
        from cellfm_sc.cli._donor import build_donor_model

        model = build_donor_model(opts, con, adata)
    else:
        model = build_model(opts, con, adata)
    run_dir = RunDirectory(out)
    with run_dir.transaction(sys.argv[1:]):
        return _run(opts, con, model, adata, split, run_dir, resume_from, started, demo)


def build_model(opts: dict[str, Any], con: Console, adata: Any) -> Any:
    """Set the data up and build the model: every data and model error comes before any
    file is written."""
    from cellfm_sc.model import CellFMClassifier

    con.info(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes; labels obs[{opts['labels_key']!r}]"
        + (f"; donors obs[{opts['donor_key']!r}]" if opts.get("donor_key") else "")
    )
    CellFMClassifier.setup_anndata(adata, donor_key=opts.get("donor_key"), **setup_kwargs(opts))
    model = CellFMClassifier(adata, **model_kwargs(opts, con))
    con.info(str(model.summary))
    return model


def setup_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """``setup_anndata`` keywords every labelled model class takes, from the options."""
    return {
        "labels_key": opts["labels_key"],
        "layer": opts.get("layer"),
        "gene_symbols": opts.get("gene_symbols"),
        "label_order": opts.get("label_order"),
        "use_raw": bool(opts.get("use_raw")),
    }


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


def _run(
    opts: dict[str, Any],
    con: Console,
    model: Any,
    adata: Any,
    split: Any,
    run_dir: RunDirectory,
    resume_from: Path | None,
    started: float,
    demo: bool,
) -> dict[str, Any]:
    import torch

    from cellfm_sc._atomic import atomic_path
    from cellfm_sc.report import write_report

    if opts.get("level", "cell") == "donor":
        from cellfm_sc.cli._donor import run_donor_level

        return run_donor_level(opts, con, model, adata, split, run_dir, resume_from, started, demo)
    work, out = run_dir.work, run_dir.out
    write_resolved_config(work, opts, resume_from, demo)

    patience = opts.get("patience", 3)
    early = {"auto": "auto", "on": True, "off": False}[opts.get("early_stopping", "auto")]
    if patience == 0:
        early = False
    class_weights = opts.get("class_weights", "none")
    model.train(
        max_epochs=opts["epochs"],
        batch_size=opts.get("batch_size", 16),
        lr=opts.get("lr", "auto"),
        lr_schedule=opts.get("lr_schedule", "warmup_cosine"),
        weight_decay=opts.get("weight_decay", 1e-5),
        validation_size=opts.get("validation_size", 0.1),
        test_size=opts.get("test_size", 0.1),
        split=split,
        recipe=opts.get("recipe", "auto"),
        early_stopping=early,
        patience=max(patience, 1),
        monitor=opts.get("monitor", "auto"),
        class_weights=None if class_weights == "none" else class_weights,
        check_val_every_n_steps=opts.get("eval_every_steps"),
        precision=opts.get("precision"),
        accelerator=opts.get("accelerator", "auto"),
        devices=opts.get("devices", "auto"),
        strategy=opts.get("strategy"),
        num_workers=opts.get("num_workers", 0),
        gradient_checkpointing=bool(opts.get("gradient_checkpointing")),
        checkpoint_dir=str(out),
        keep_checkpoints=opts.get("keep_checkpoints", 1),
        resume_from=str(resume_from) if resume_from else None,
        logger=_make_logger(opts.get("logger", "csv"), work / "logs"),
        enable_progress_bar=show_progress(opts),
        **({"num_nodes": opts["num_nodes"]} if opts.get("num_nodes", 1) > 1 else {}),
    )
    if model.global_rank_ != 0:
        return {"rank": model.global_rank_}  # under DDP only the first process writes

    # the model holds the best weights after training
    with atomic_path(work / "best_model.pth") as tmp:
        torch.save(model.export_state_dict(), tmp)

    n_test, n_val = len(model.test_indices), len(model.validation_indices)
    if n_test:
        where, indices = f"test split ({n_test:,} cells)", "test"
    elif n_val:
        where, indices = (
            f"validation split ({n_val:,} cells; no test split: optimistic)",
            "validation",
        )
        con.warn(
            "no test split (--test-size 0): the report scores the validation cells, which chose the model"
        )
    else:
        where, indices = "training cells (nothing held out: optimistic)", "train"
        con.warn("nothing was held out; the report scores the training cells")
    con.info(f"evaluating on the {where}")
    result = model.evaluate(
        indices=indices,
        enable_progress_bar=show_progress(opts),
        baseline=not opts.get("no_baseline"),
    )
    files = dict(write_report(work, result, history=model.history, info=report_info(model, opts)))
    model.save(str(work / "model"), overwrite=True)
    files["model"] = work / "model"
    files["best_model"] = work / "best_model.pth"
    files["config_resolved"] = work / "config_resolved.json"
    if (work / "logs").is_dir():
        files["logs"] = work / "logs"

    if opts.get("write_split_h5ad"):
        key = "cellfm"
        model.annotate(
            adata,
            key_added=key,
            batch_size=max(opts.get("batch_size", 16), 64),
            enable_progress_bar=show_progress(opts),
        )
        files.update(
            write_split_h5ads(adata, model, work, ["X_cellfm", f"{key}_probabilities"], key)
        )
    return {
        "rank": 0,
        "result": result,
        "files": {k: out / Path(v).name for k, v in files.items()},
        "where": where,
        "elapsed": time.perf_counter() - started,
        "model": model,
    }


def report_info(model: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """The run facts of ``training_results.json``: the model's, and the level selection of
    ``--level auto``."""
    info = dict(model.report_info())
    if opts.get("_level_selection") is not None:
        info["level_selection"] = opts["_level_selection"].to_dict()
    return info


def print_summary(con: Console, facts: dict[str, Any], out: Path) -> None:
    con.result()
    con.result(f"done in {facts['elapsed']:.0f} s; evaluated on the {facts['where']}")
    if facts.get("level_selection") is not None:
        con.result(str(facts["level_selection"]))
    con.result(str(facts["result"]))
    con.result()
    con.result(f"output directory: {out}")
    files = facts["files"]
    for key, what in OUTPUT_FILES:
        if key in files:
            name = Path(files[key]).name + ("/" if key in ("model", "logs") else "")
            con.result(f"  {name:<26} {what}")
    line = checkpoints_line(out)
    if line:
        con.result(line)


def run(args: argparse.Namespace, con: Console) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    validate_options(opts)
    facts = finetune(opts, con)
    if facts["rank"] == 0:
        facts["level_selection"] = opts.get("_level_selection")
        print_summary(con, facts, Path(opts["output_dir"]).expanduser())
    return 0
