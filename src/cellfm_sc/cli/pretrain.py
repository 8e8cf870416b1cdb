"""``cellfm-sc pretrain``: CellFM's masked-value pretraining on unlabelled ``.h5ad`` files."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cellfm_sc._constants import CORPUS_SAMPLING, PRESET_NAMES
from cellfm_sc.cli._args import (
    Command,
    add_hardware_args,
    add_shared,
    fraction_type,
)
from cellfm_sc.cli._console import CLIError, Console, quiet_libraries
from cellfm_sc.cli._files import RunDirectory, existing_file, print_outputs, read_h5ad
from cellfm_sc.cli._precheck import check_data_columns, check_run_output, read_header
from cellfm_sc.cli._run import train_kwargs, write_resolved_config

__all__ = ["COMMAND", "gene_symbol_columns", "run"]


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA.h5ad", nargs="+", help="input AnnData files (.h5ad)")
    _add_data_options(p)
    _add_model_options(p)
    _add_training_options(p)
    _add_output_options(p)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--layer", help="adata.layers key holding raw counts in every file")
    data.add_argument(
        "--use-raw",
        action="store_true",
        help="raw counts are in adata.raw.X in every file (the CELLxGENE layout)",
    )
    data.add_argument(
        "--gene-symbols",
        metavar="[FILE=]COLUMN",
        action="append",
        default=[],
        help="var column of gene symbols: FILE=COLUMN for one file (e.g. Ensembl var_names "
        "with symbols in var['gene_names']), or COLUMN for every file that has that column; "
        "repeatable. Other files use their var_names",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    add_shared(
        model,
        "--preset",
        help="trunk size to pretrain from scratch (randomly initialised)",
    )
    add_shared(
        model,
        "--checkpoint",
        help="MindSpore CellFM checkpoint to continue pretraining from",
    )
    add_shared(model, "--vocabulary", help="the checkpoint's gene vocabulary")
    add_shared(
        model,
        "--embedding-init",
        help="gene embedding of the corpus' genes: transfer the checkpoint's rows (default "
        "with --vocabulary) or random",
    )
    add_shared(
        model,
        "--num-heads",
        help="retention heads of the checkpoint (default: recorded in it, or 48 at width 1536)",
    )
    add_shared(model, "--max-tokens")
    model.add_argument(
        "--mask-ratio",
        metavar="R",
        type=fraction_type,
        default=0.2,
        help="share of each cell's genes whose values are predicted (80%% of them hidden)",
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training")
    add_shared(train, "--epochs", default=16, help="epochs")
    train.add_argument(
        "--corpus-sampling",
        choices=CORPUS_SAMPLING,
        default="balanced",
        help="balanced: every file the same number of batches per epoch; proportional: every "
        "cell once per epoch (files weigh by their size)",
    )
    train.add_argument(
        "--depth-augmentation",
        metavar="P",
        type=fraction_type,
        default=0.5,
        help="chance that a training cell is read thinned to a random 25-100%% of its counts "
        "each epoch (0 turns it off)",
    )
    train.add_argument(
        "--probe",
        metavar="LABELLED.h5ad",
        help="labelled cells whose kNN macro-F1 on the embeddings is recorded after every "
        "epoch (history.json, loss_curve.png); needs --probe-labels-key",
    )
    train.add_argument(
        "--probe-labels-key",
        metavar="KEY",
        help="obs column of the --probe file with the labels",
    )
    add_shared(train, "--batch-size", default=32)
    add_shared(
        train,
        "--lr",
        help="learning rate (AdamW); auto: 1e-3 from scratch, the checkpoint's fine-tuning "
        "rate when continuing",
    )
    add_shared(train, "--lr-schedule", help="schedule")
    add_shared(train, "--weight-decay", help="AdamW")
    train.add_argument(
        "--validation-size",
        metavar="F",
        type=fraction_type,
        default=0.05,
        help="fraction of every file's cells held out to score the masked loss",
    )
    train.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop when the validation loss stalls",
    )
    add_shared(train, "--patience", help="early stopping")
    add_shared(train, "--seed", help="seed of everything")
    add_shared(train, "--resume")
    add_hardware_args(p, num_nodes=False)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "-o", metavar="OUT", required=True, help="output directory")
    add_shared(out, "--keep-checkpoints")


# --------------------------------------------------------------------------------------------
# validation before any work
# --------------------------------------------------------------------------------------------


def gene_symbol_columns(specs: list[str], files: list[Path]) -> tuple[dict[Path, str], list[str]]:
    """``--gene-symbols`` values: ``({file: column}, [columns for every file that has them])``."""
    per_file: dict[Path, str] = {}
    everywhere: list[str] = []
    for spec in specs:
        name, sep, column = spec.rpartition("=")
        if not sep:
            everywhere.append(spec)
            continue
        if not column or not name:
            raise CLIError(f"--gene-symbols {spec!r}: expected FILE=COLUMN or COLUMN")
        target = Path(name).expanduser()
        hits = [
            f
            for f in files
            if f == target or f.resolve() == target.resolve() or f.name == target.name
        ]
        if not hits:
            raise CLIError(
                f"--gene-symbols {spec!r}: {name} is not one of the input files "
                f"({', '.join(f.name for f in files)})"
            )
        for f in hits:
            per_file[f] = column
    return per_file, everywhere


def validate(opts: dict[str, Any]) -> tuple[list[Path], Path | None]:
    if opts.get("checkpoint") is None and opts.get("preset") is None:
        raise CLIError(
            "pass --preset {" + ",".join(PRESET_NAMES) + "} (pretrain from scratch) or "
            "--checkpoint CKPT (continue a CellFM checkpoint)"
        )
    if opts.get("checkpoint") is not None:
        existing_file(opts["checkpoint"], "checkpoint")
    if opts.get("vocabulary") is not None:
        if opts.get("checkpoint") is None:
            raise CLIError("--vocabulary belongs to a --checkpoint; pass both")
        existing_file(opts["vocabulary"], "vocabulary file")
    if opts.get("embedding_init") == "transfer" and opts.get("vocabulary") is None:
        raise CLIError("--embedding-init transfer needs --checkpoint and --vocabulary")
    if opts.get("mask_ratio") == 0:
        raise CLIError("--mask-ratio must be above 0")
    if opts.get("layer") and opts.get("use_raw"):
        raise CLIError("pass either --layer or --use-raw: the counts are in one of them")
    if bool(opts.get("probe")) != bool(opts.get("probe_labels_key")):
        raise CLIError("--probe and --probe-labels-key go together (labelled cells, their column)")
    if opts.get("probe"):
        existing_file(opts["probe"], "probe file")
    files = [existing_file(f, "data file") for f in opts["data"]]
    seen: dict[Path, Path] = {}
    for f in files:
        key = f.resolve()
        if key in seen:
            raise CLIError(f"data file {f} is given twice")
        seen[key] = f
    per_file, _ = gene_symbol_columns(list(opts.get("gene_symbols") or []), files)
    for f in files:  # from each file's header, in a moment (no heavy import yet)
        try:
            check_data_columns(
                read_header(f),
                layer=opts.get("layer"),
                use_raw=bool(opts.get("use_raw")),
                gene_symbols=per_file.get(f),
            )
        except CLIError as exc:
            raise CLIError(f"{f.name}: {exc}") from exc
    return files, check_run_output(opts)[1]


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _open(files: list[Path], opts: dict[str, Any], con: Console) -> list[Any]:
    """Open every file backed and set it up (layer, raw, its gene symbols column)."""
    from cellfm_sc.model import CellFMPretrainer

    per_file, everywhere = gene_symbol_columns(list(opts.get("gene_symbols") or []), files)
    members = []
    for f in files:
        adata = read_h5ad(f, backed=True)
        var = adata.raw.var if opts.get("use_raw") and adata.raw is not None else adata.var
        column = per_file.get(f)
        if column is None:
            column = next((c for c in everywhere if c in var.columns), None)
        elif column not in var.columns:
            raise CLIError(
                f"--gene-symbols {f.name}={column}: no var column {column!r} in {f}; columns: "
                f"{list(map(str, var.columns))}"
            )
        try:
            CellFMPretrainer.setup_anndata(
                adata,
                layer=opts.get("layer"),
                use_raw=bool(opts.get("use_raw")),
                gene_symbols=column,
            )
        except (ValueError, KeyError) as exc:
            raise type(exc)(f"{f.name}: {exc.args[0] if exc.args else exc}") from exc
        con.info(
            f"{f.name}: {adata.n_obs:,} cells x {adata.n_vars:,} genes"
            + (f", symbols from var[{column!r}]" if column else "")
        )
        members.append(adata)
    return members


#: the files of the output directory, as the summary names them
OUTPUT_FILES = (
    ("cellfm.ckpt", "MindSpore checkpoint (variant A; --checkpoint of finetune)"),
    ("gene_info.csv", "its gene vocabulary (--vocabulary of finetune)"),
    ("model/", "saved model (CellFMPretrainer.load)"),
    ("history.json", "masked loss per epoch and run facts"),
    ("loss_curve.png", "loss curves"),
    ("config_resolved.json", "options used"),
)


def run(args: argparse.Namespace, con: Console) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    started = time.perf_counter()
    files, resume = validate(opts)
    out = Path(opts["output_dir"]).expanduser()
    quiet_libraries(bool(opts.get("quiet")))
    members = _open(files, opts, con)
    run_dir = RunDirectory(out)
    with run_dir.transaction(sys.argv[1:]):
        facts = _run(opts, con, members, run_dir, resume)
    con.result(f"done in {time.perf_counter() - started:.0f} s; {facts['summary']}")
    print_outputs(con, out, OUTPUT_FILES)
    return 0


def _run(
    opts: dict[str, Any],
    con: Console,
    members: list[Any],
    run_dir: RunDirectory,
    resume: Path | None,
) -> dict[str, Any]:
    from cellfm_sc._atomic import write_json_atomic
    from cellfm_sc._json import to_plain
    from cellfm_sc.model import CellFMPretrainer
    from cellfm_sc.plotting import pretraining_curves

    work, out = run_dir.work, run_dir.out
    write_resolved_config(
        work,
        {k: v for k, v in opts.items() if k != "data"},
        resume,
        data=[str(f) for f in opts["data"]],
        command="pretrain",
    )
    embedding_init = opts.get("embedding_init") or (
        "transfer" if opts.get("vocabulary") else "random"
    )
    model = CellFMPretrainer(
        members,
        checkpoint=opts.get("checkpoint"),
        vocabulary_file=opts.get("vocabulary"),
        embedding_init=embedding_init,
        preset=opts.get("preset") if not opts.get("checkpoint") else None,
        num_heads=opts.get("num_heads"),
        max_tokens=opts["max_tokens"],
        mask_ratio=opts["mask_ratio"],
        seed=opts["seed"],
    )
    con.info(model.summary)
    probe = None
    if opts.get("probe"):
        from cellfm_sc.model import EmbeddingProbe

        labelled = read_h5ad(Path(opts["probe"]))
        probe = EmbeddingProbe(labelled, opts["probe_labels_key"], seed=opts["seed"])
        con.info(f"probe: {probe.rows.size:,} labelled cells of {opts['probe']}")
    patience = opts.get("patience", 3)
    model.train(
        **train_kwargs(opts, out, resume),
        batch_size=opts["batch_size"],
        early_stopping=bool(opts.get("early_stopping")) and patience > 0,
        gradient_checkpointing=bool(opts.get("gradient_checkpointing")),
        logger=False,
        corpus_sampling=opts.get("corpus_sampling", "balanced"),
        probe=probe,
        depth_augmentation=opts.get("depth_augmentation", 0.5),
    )
    if model.global_rank_ != 0:
        return {"summary": f"rank {model.global_rank_}"}
    model.export_mindspore(work, overwrite=True)
    model.save(str(work / "model"), overwrite=True)
    history = model.history
    facts = {
        "history": history.to_dict("list"),
        "best_epoch": model.best_epoch_,
        "train_settings": model.train_settings_,
        "n_genes": int(model.vocab.n_genes),
        "config": model.module.trunk.config.to_dict(),
        "corpus": [str(f) for f in opts["data"]],
        "checkpoint": model.pretrained_report_,
    }
    write_json_atomic(work / "history.json", to_plain(facts, finite=False))
    probes = (model.train_settings_ or {}).get("probe") or {}
    pretraining_curves(
        history,
        probe_initial={c: p.get("initial_macro_f1") for c, p in probes.items()},
        title="masked-value pretraining",
        show=False,
        save=work / "loss_curve.png",
    )
    import matplotlib.pyplot as plt

    plt.close("all")
    last = history.iloc[-1]
    val = last.get("validation_loss")
    summary = f"{len(history)} epoch(s), final train loss {last['train_loss']:.4f}"
    if val is not None and val == val:
        summary += f", validation loss {val:.4f} (best epoch {model.best_epoch_})"
    if "probe_macro_f1" in history:
        start = probes["probe_macro_f1"].get("initial_macro_f1")
        summary += f", probe macro-F1 {start:.3f} -> {history['probe_macro_f1'].iloc[-1]:.3f}"
    return {"summary": summary}


COMMAND = Command(
    "pretrain",
    "pretrain CellFM on unlabelled .h5ad files (masked values) and export a checkpoint",
    "Pretrain CellFM with its masked-value objective on one or more unlabelled "
    ".h5ad files (raw counts; read backed, never concatenated; one gene vocabulary over "
    "the union of their gene symbols), from scratch (--preset) or continued from a "
    "checkpoint (--checkpoint, --vocabulary), and write into --output-dir:\n"
    "  cellfm.ckpt               MindSpore checkpoint (variant A)\n"
    "  gene_info.csv             its vocabulary (symbol first; token id = row + 1)\n"
    "  model/                    the saved model (CellFMPretrainer.load)\n"
    "  history.json              masked loss per epoch, run facts\n"
    "  loss_curve.png            loss curves\n"
    "  checkpoint_epoch_N.pth    the newest epoch's and the best's (for --resume; "
    "--keep-checkpoints)\n"
    "Fine-tune from it with: cellfm-sc finetune DATA.h5ad --checkpoint OUT/cellfm.ckpt "
    "--vocabulary OUT/gene_info.csv --embedding-init transfer ...\n"
    "Example:\n"
    "  cellfm-sc pretrain atlas_a.h5ad atlas_b.h5ad --gene-symbols "
    "atlas_b.h5ad=gene_names --preset small --epochs 5 -o runs/pretrain",
    _add_options,
    run,
)
