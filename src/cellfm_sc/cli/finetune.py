"""``cellfm-sc finetune``: fine-tune on an ``.h5ad`` file and write the model and a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cellfm_sc._constants import PRESET_NAMES
from cellfm_sc.cli._args import Command
from cellfm_sc.cli._console import (
    CLIError,
    Console,
    message_of,
    quiet_libraries,
    show_progress,
)
from cellfm_sc.cli._files import (
    RunDirectory,
    existing_file,
    newest_checkpoint,
    print_outputs,
    read_h5ad,
)
from cellfm_sc.cli._finetune_options import add_finetune_options, add_training_options
from cellfm_sc.cli._precheck import (
    check_data_columns,
    check_run_output,
    check_split_json,
    read_header,
)
from cellfm_sc.cli._run import build_labelled_model, train_and_report

__all__ = ["COMMAND", "add_training_options", "finetune", "run"]


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA.h5ad", nargs="?", help="input AnnData (.h5ad)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML, YAML or JSON file of options (keys as the long flags, e.g. labels_key or "
        "labels-key; optionally under a [finetune] table); flags given here override it",
    )
    add_finetune_options(p)


# --------------------------------------------------------------------------------------------
# validation before any work
# --------------------------------------------------------------------------------------------


def validate_options(opts: dict[str, Any]) -> None:
    missing = [
        flag
        for flag, key in (
            ("DATA.h5ad", "data"),
            ("--labels-key", "labels_key"),
            ("--output-dir", "output_dir"),
        )
        if opts.get(key) in (None, "")
    ]
    if missing:
        raise CLIError(f"finetune needs {', '.join(missing)} (on the command line or in --config)")
    if opts.get("level", "cell") in ("donor", "auto") and not opts.get("donor_key"):
        raise CLIError(f"--level {opts['level']} needs --donor-key (the obs column of donors)")
    if opts.get("level") == "auto" and opts.get("auto_folds", 5) < 3:
        raise CLIError("--auto-folds must be >= 3 (one fold tests, one validates, the rest train)")
    if opts.get("level", "cell") == "donor" and opts.get("recipe", "auto") != "auto":
        raise CLIError("--recipe applies to --level cell; the donor model has its own recipe")
    if opts.get("level", "cell") == "donor" and opts.get("depth_augmentation", "auto") != "auto":
        raise CLIError("--depth-augmentation applies to --level cell")
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
    existing_file(opts["data"], "data file")


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
    out, resume_from = check_run_output(opts)
    if resume_from is None and out.is_dir() and newest_checkpoint(out) is not None:
        con.warn(
            f"{out} already holds checkpoint_epoch_*.pth files of an earlier run; this run "
            "overwrites those of the epochs it reaches (use --resume to continue that run "
            "instead, or another --output-dir)"
        )

    quiet_libraries(bool(opts.get("quiet")))
    if adata is None:
        con.info(f"reading {opts['data']}" + (" (backed)" if opts.get("backed") else ""))
        adata = read_h5ad(Path(opts["data"]), backed=bool(opts.get("backed")))

    from cellfm_sc.data import obs_column

    for key in ("labels_key", "donor_key"):
        if opts.get(key):
            obs_column(adata, opts[key], keyword=key, allow_missing=True)
    split = split_from_options(opts, adata)
    if opts.get("level", "cell") == "auto":
        from cellfm_sc.cli._donor import choose_level

        split = choose_level(opts, con, adata, split)

    if opts.get("level", "cell") == "donor":
        from cellfm_sc.cli._donor import build_donor_model, donor_level

        model, level = build_donor_model(opts, con, adata), donor_level
    else:
        model, level = build_model(opts, con, adata), _cell_level
    run_dir = RunDirectory(out)
    with run_dir.transaction(sys.argv[1:]):
        return train_and_report(
            opts,
            con,
            model,
            adata,
            split,
            run_dir,
            resume_from,
            started,
            demo,
            **level(opts, con, model, adata),
        )


def build_model(opts: dict[str, Any], con: Console, adata: Any) -> Any:
    """Set the data up and build the model: every data and model error comes before any
    file is written."""
    from cellfm_sc.model import CellFMClassifier

    con.info(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes; labels obs[{opts['labels_key']!r}]"
        + (f"; donors obs[{opts['donor_key']!r}]" if opts.get("donor_key") else "")
    )
    return build_labelled_model(CellFMClassifier, opts, con, adata)


def _cell_level(opts: dict[str, Any], con: Console, model: Any, adata: Any) -> dict[str, Any]:
    """The cell level's part of :func:`~cellfm_sc.cli._run.train_and_report`."""
    early = {"auto": "auto", "on": True, "off": False}[opts.get("early_stopping", "auto")]
    if opts.get("patience", 3) == 0:
        early = False
    class_weights = opts.get("class_weights", "none")

    def split_obsm() -> list[str]:
        model.annotate(
            adata,
            key_added="cellfm",
            batch_size=max(opts.get("batch_size", 16), 64),
            enable_progress_bar=show_progress(opts),
        )
        return ["X_cellfm", "cellfm_probabilities"]

    train = {
        "batch_size": opts.get("batch_size", 16),
        "recipe": opts.get("recipe", "auto"),
        "early_stopping": early,
        "class_weights": None if class_weights == "none" else class_weights,
        "check_val_every_n_steps": opts.get("eval_every_steps"),
        "gradient_checkpointing": bool(opts.get("gradient_checkpointing")),
    }
    train["depth_augmentation"] = opts.get("depth_augmentation", "auto")
    return {"unit": "cells", "train": train, "split_obsm": split_obsm}


#: the files of the output directory, as the summary names them
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


def print_summary(con: Console, facts: dict[str, Any], out: Path) -> None:
    con.result()
    con.result(f"done in {facts['elapsed']:.0f} s; evaluated on the {facts['where']}")
    if facts.get("level_selection") is not None:
        con.result(str(facts["level_selection"]))
    con.result(str(facts["result"]))
    con.result()
    files = facts["files"]
    rows = [
        (Path(files[key]).name + ("/" if key in ("model", "logs") else ""), what)
        for key, what in OUTPUT_FILES
        if key in files
    ]
    print_outputs(con, out, rows)


def run(args: argparse.Namespace, con: Console) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    validate_options(opts)
    facts = finetune(opts, con)
    if facts["rank"] == 0:
        facts["level_selection"] = opts.get("_level_selection")
        print_summary(con, facts, Path(opts["output_dir"]).expanduser())
    return 0


COMMAND = Command(
    "finetune",
    "fine-tune CellFM on an .h5ad file and write the model and a report",
    "Fine-tune CellFM on DATA.h5ad (raw counts in X or --layer) to predict "
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
    _add_options,
    run,
)
