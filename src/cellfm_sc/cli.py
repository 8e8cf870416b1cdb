"""The ``cellfm-sc`` command line.

Subcommands
-----------
``inspect``
    What a MindSpore CellFM checkpoint holds: variant, configuration, parameters, and the
    optimizer/bookkeeping entries a load would skip.
``finetune``
    Fine-tune CellFM on an ``.h5ad`` file and write the model, checkpoints, predictions,
    metrics and plots into an output directory.
``predict``
    Annotate an ``.h5ad`` file with a fine-tuned model (predictions, confidence, class
    probabilities and the cell embedding).
``embed``
    Only the cell embedding ``obsm["X_cellfm"]`` of an ``.h5ad`` file.
``demo``
    The whole fine-tuning path, offline, on the shipped PBMC 3k subset with a small randomly
    initialised model.

Usage and data errors print one line starting with ``cellfm-sc: error:`` on stderr and exit
with status 2 (``--debug`` shows the traceback as well). This module imports nothing heavy at
import time (no torch, anndata, scanpy, scvi-tools, Lightning), so ``cellfm-sc --help``
answers at once; the handlers import what they need.

Examples
--------
.. code-block:: bash

    cellfm-sc inspect CellFM_80M_weight.ckpt
    cellfm-sc finetune sea_ad.h5ad --labels-key ADNC --donor-key "Donor ID" \\
        --label-order "Not AD,Low,Intermediate,High" \\
        --checkpoint CellFM_80M_weight.ckpt --vocabulary expand_gene_info.csv \\
        --output-dir runs/adnc
    cellfm-sc predict runs/adnc/model query.h5ad --output query_annotated.h5ad
    cellfm-sc demo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cellfm_sc import __version__

__all__ = ["CLIError", "build_parser", "main"]

PROG = "cellfm-sc"
# kept in step with cellfm_sc.nn (PRESETS, TRAINABLE_POLICIES) and cellfm_sc.pretrained;
# spelled out here so that --help does not import torch (a test checks they agree)
PRESETS = ("tiny", "small", "80M", "800M")
TRAINABLE = ("encoder+head", "head", "encoder+head+embedding", "all", "lora")
EMBEDDING_INITS = ("random", "transfer")
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64")

#: settings of ``cellfm-sc demo`` (2 CPU cores: well under 3 minutes)
DEMO_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "embedding_init": "random",
    "trainable": "all",
    "epochs": 5,
    "batch_size": 16,
    "lr": 1e-3,
    "max_tokens": 512,
    "validation_size": 0.1,
    "test_size": 0.2,
    "patience": 3,
    "seed": 0,
}

# the resolved finetune options that are not argparse bookkeeping
_FINETUNE_KEYS = (
    "data",
    "labels_key",
    "donor_key",
    "label_order",
    "layer",
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
    "max_tokens",
    "output_dir",
    "batch_size",
    "epochs",
    "lr",
    "weight_decay",
    "eval_every_steps",
    "patience",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "num_workers",
    "gradient_checkpointing",
    "seed",
    "write_split_h5ad",
    "resume",
    "quiet",
    "debug",
)


class CLIError(Exception):
    """A usage or data error: reported as one ``cellfm-sc: error:`` line, exit status 2."""


# --------------------------------------------------------------------------------------------
# argument types (argparse turns their ArgumentTypeError into a usage error)
# --------------------------------------------------------------------------------------------


def _number_type(cast: type, minimum: float, strict: bool, what: str):
    """An argparse ``type=``: ``cast(text)`` that is finite and above (or at) ``minimum``."""

    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = value > minimum if strict else value >= minimum
        if not ok or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _number_type(int, 0, True, "a positive integer")
_non_negative_int = _number_type(int, 0, False, "an integer >= 0")
_positive_float = _number_type(float, 0, True, "a positive number")
_non_negative_float = _number_type(float, 0, False, "a number >= 0")


def _split_size(text: str) -> float | int:
    """A fraction in [0, 1) or a count (an integer >= 1)."""
    text = str(text).strip()
    try:
        if re.fullmatch(r"\d+", text):
            return int(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in [0, 1) or a count, got {text!r}"
        ) from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a count, got {text!r}")
    return value


def _devices(text: str) -> int | str | list[int]:
    """``auto``, a number of devices (``2``) or a list of device indices (``0,1``)."""
    text = str(text).strip()
    if text == "auto":
        return "auto"
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise argparse.ArgumentTypeError("--devices must be 'auto', N >= 1, or a list '0,1'")
        return int(text)
    if re.fullmatch(r"\d+(,\d+)+,?", text):
        return [int(t) for t in text.split(",") if t]
    raise argparse.ArgumentTypeError(
        f"expected 'auto', a number of devices or a list like '0,1', got {text!r}"
    )


def _device(text: str) -> str | None:
    """``auto`` (None) or a torch device string."""
    text = str(text).strip()
    if text == "auto":
        return None
    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _label_order(text: str) -> list[str]:
    labels = [t.strip() for t in str(text).split(",")]
    if len(labels) < 2 or any(not t for t in labels):
        raise argparse.ArgumentTypeError(
            f"expected at least two comma-separated labels, lowest first, got {text!r}"
        )
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"labels repeat in {text!r}")
    return labels


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``cellfm-sc: error: ...``, status 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {_one_line(message)}{hint}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; wraps description paragraphs but keeps indented lines as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                out.append(
                    textwrap.fill(
                        " ".join(paragraph),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
                paragraph.clear()

        for line in text.splitlines():
            if line.startswith(" ") or not line.strip():
                flush()
                out.append(indent + line)
            else:
                paragraph.append(line.strip())
        flush()
        return "\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars and no info messages (warnings and errors are still shown)",
    )
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _add_finetune_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Options shared by ``finetune`` (all) and ``demo`` (training only)."""
    d = DEMO_DEFAULTS if demo else {}
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs",
        metavar="N",
        type=_positive_int,
        default=d.get("epochs", 5),
        help="maximum epochs",
    )
    if demo:
        return
    train.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=16, help="cells per batch"
    )
    train.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (AdamW)")
    train.add_argument(
        "--weight-decay",
        metavar="WD",
        type=_non_negative_float,
        default=1e-5,
        help="AdamW weight decay",
    )
    train.add_argument(
        "--eval-every-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also score the validation cells every N training steps (default: once per epoch)",
    )
    train.add_argument(
        "--patience",
        metavar="N",
        type=_non_negative_int,
        default=3,
        help="early stopping: evaluations without improvement of validation accuracy "
        "(0 turns early stopping off)",
    )
    train.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seed of splits, init and sampling"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint_epoch_*.pth in --output-dir",
    )
    hw = p.add_argument_group("hardware")
    hw.add_argument(
        "--accelerator",
        default="auto",
        choices=("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
        help="Lightning accelerator",
    )
    hw.add_argument(
        "--devices",
        metavar="D",
        type=_devices,
        default="auto",
        help="'auto', a number of devices (4) or device indices (0,1); several GPUs use DDP",
    )
    hw.add_argument(
        "--num-nodes",
        metavar="N",
        type=_positive_int,
        default=1,
        help="machines taking part (multi-node DDP under SLURM or torchrun)",
    )
    hw.add_argument(
        "--strategy",
        metavar="NAME",
        default=None,
        help="Lightning strategy, e.g. ddp (default: Lightning's choice)",
    )
    hw.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="numeric precision, e.g. bf16-mixed on recent GPUs (default: 32)",
    )
    hw.add_argument(
        "--num-workers",
        metavar="N",
        type=_non_negative_int,
        default=0,
        help="data-loader worker processes",
    )
    hw.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layer activations in the backward pass (much less GPU memory, "
        "e.g. for the 800M preset)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``cellfm-sc`` argument parser (also used to generate the CLI reference).

    Returns
    -------
    argparse.ArgumentParser
        With subcommands ``inspect``, ``finetune``, ``predict``, ``embed`` and ``demo``.

    Examples
    --------
    >>> args = build_parser().parse_args(["inspect", "model.ckpt", "--num-heads", "8"])
    >>> args.command, args.num_heads
    ('inspect', 8)
    """
    parser = _Parser(
        prog=PROG,
        description="Fine-tune the CellFM single-cell foundation model on an AnnData (.h5ad).",
        epilog="Run 'cellfm-sc COMMAND --help' for the options of a command. "
        "Documentation: https://cellfm-sc.readthedocs.io",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # ---- inspect --------------------------------------------------------------------------
    p = sub.add_parser(
        "inspect",
        help="show what a MindSpore CellFM checkpoint holds",
        description="Show a MindSpore CellFM checkpoint's variant (A: public MindSpore CellFM, "
        "A': annotation Backbone, B: with ST tokens), the configuration read from its "
        "shapes, a table of its parameters, and the optimizer/bookkeeping entries a load "
        "would skip. Reads the file with cellfm-sc's own parser (no MindSpore, nothing "
        "unpickled).",
        formatter_class=_Formatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="MindSpore .ckpt file")
    p.add_argument(
        "--num-heads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="retention heads (cannot be read from shapes; 48 is assumed for 1536-wide "
        "released models)",
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON instead of tables")
    _common(p)
    p.set_defaults(handler=_cmd_inspect)

    # ---- finetune -------------------------------------------------------------------------
    p = sub.add_parser(
        "finetune",
        help="fine-tune CellFM on an .h5ad file and write the model and a report",
        description="Fine-tune CellFM on DATA.h5ad (raw counts in X or --layer) to predict "
        "obs[--labels-key], then evaluate on the test split (or validation split when there "
        "is no test split) and write into --output-dir:\n"
        "  best_model.pth            state dict of the best model (plain tensors)\n"
        "  checkpoint_epoch_N.pth    one per epoch (for --resume)\n"
        "  model/                    the saved model (CellFMClassifier.load)\n"
        "  training_results.json     metrics, histories, run facts\n"
        "  predictions.csv, donor_predictions.csv, *.png\n"
        "  config_resolved.json      the options used\n"
        "  train.h5ad, test.h5ad     with --write-split-h5ad: obs + obsm['X_cellfm']\n"
        "Options may also come from --config (TOML or YAML); flags override the file.",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "data", metavar="DATA.h5ad", nargs="?", default=None, help="input AnnData (.h5ad)"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML or YAML file of options (keys as the long flags, e.g. labels_key or "
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
        type=_label_order,
        default=None,
        metavar="A,B,C",
        help="comma-separated labels, lowest first: makes the labels ordinal "
        "(e.g. 'Not AD,Low,Intermediate,High')",
    )
    data.add_argument(
        "--layer", default=None, help="adata.layers key holding raw counts (default: X)"
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
        type=_split_size,
        default=0.1,
        help="fraction (or count) of donors, or of cells without --donor-key, for validation",
    )
    split.add_argument(
        "--test-size",
        metavar="SIZE",
        type=_split_size,
        default=0.2,
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
        type=_positive_int,
        default=None,
        metavar="N",
        help="retention heads of the checkpoint (48 assumed for the released models)",
    )
    model.add_argument(
        "--preset",
        choices=PRESETS,
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
        choices=TRAINABLE,
        default="encoder+head",
        help="what is trained; the rest is frozen",
    )
    model.add_argument(
        "--max-tokens",
        metavar="N",
        type=_positive_int,
        default=2048,
        help="expressed genes per cell fed to the model (sampled when a cell has more)",
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
    _add_finetune_options(p)
    _common(p)
    p.set_defaults(handler=_cmd_finetune)

    # ---- predict / embed ------------------------------------------------------------------
    for name, helptext, desc in (
        (
            "predict",
            "annotate an .h5ad file with a fine-tuned model",
            "Add obs['<key>_prediction'], obs['<key>_confidence'], "
            "obsm['<key>_probabilities'] and obsm['X_<key>'] to DATA.h5ad and write the "
            "result to --output (atomically; with --backed without the count matrix).",
        ),
        (
            "embed",
            "write the CellFM cell embedding of an .h5ad file",
            "Write obs and obsm['X_cellfm'] (the cls embedding) of DATA.h5ad to --output; "
            "the output holds no count matrix.",
        ),
    ):
        p = sub.add_parser(name, help=helptext, description=desc, formatter_class=_Formatter)
        p.add_argument(
            "model_dir", metavar="MODEL_DIR", help="a saved model (OUT/model of finetune)"
        )
        p.add_argument("data", metavar="DATA.h5ad", help="input AnnData (.h5ad)")
        p.add_argument("--output", "-o", metavar="OUT.h5ad", required=True, help="output file")
        p.add_argument(
            "--batch-size", metavar="N", type=_positive_int, default=64, help="cells per batch"
        )
        if name == "predict":
            p.add_argument(
                "--key-added",
                default="cellfm",
                help="prefix of the obs/obsm keys written",
            )
        p.add_argument(
            "--layer",
            default=None,
            help="adata.layers key holding raw counts (default: as the model was set up)",
        )
        p.add_argument(
            "--device",
            default="auto",
            type=_device,
            help="torch device: auto (a GPU when there is one), cpu, cuda, cuda:1, mps",
        )
        p.add_argument(
            "--backed",
            action="store_true",
            help="read DATA.h5ad backed (the count matrix stays on disk); the output then "
            "holds obs, obsm and uns only, never a copy of the counts",
        )
        _common(p)
        p.set_defaults(handler=_cmd_predict if name == "predict" else _cmd_embed)

    # ---- demo -----------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="fine-tune a small random model on the shipped PBMC 3k subset (offline)",
        description="Run the whole finetune path offline on the shipped PBMC 3k subset "
        "(1,200 cells, 8 cell types; 10x Genomics, CC BY 4.0) with the 'tiny' preset "
        "(64 dims, 2 layers), randomly initialised: no pretrained CellFM weights are used. "
        "Takes well under a minute on 2 CPU cores.",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--output-dir",
        "-o",
        metavar="DIR",
        default="cellfm_demo",
        help="output directory",
    )
    _add_finetune_options(p, demo=True)
    _common(p)
    p.set_defaults(handler=_cmd_demo)
    return parser


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Console:
    """Info messages (stderr) unless quiet; results (stdout) always."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def result(self, message: str = "") -> None:
        print(message, flush=True)


def _existing_file(path: str | os.PathLike[str] | None, what: str) -> Path:
    if path is None:
        raise CLIError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if p.is_dir():
        raise CLIError(f"{what} is a directory, expected a file: {p}")
    return p


def _existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if not p.is_dir():
        raise CLIError(f"{what} is not a directory: {p}")
    return p


def _quiet_libraries(quiet: bool) -> None:
    """Silence Lightning's and scvi-tools' info chatter under ``--quiet``.

    Imports Lightning first: it sets its own logger levels when imported.
    """
    import logging
    import warnings

    # library noise that says nothing about the run
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    if not quiet:
        return
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
        for child in list(logging.root.manager.loggerDict):
            if child.startswith(name + "."):
                logging.getLogger(child).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*weights_only.* was not set.*")


def _read_h5ad(path: Path, backed: bool = False) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"cannot read {path} as an .h5ad file: {_one_line(exc)}") from exc


def _write_h5ad_atomic(adata: Any, path: Path) -> Path:
    """Write ``adata`` to ``path`` through a temporary file in the same directory."""
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def _drop_scvi_bookkeeping(adata: Any) -> None:
    """Remove the registry columns/keys scvi-tools adds (``_scvi_labels``, ``_scvi_uuid``...)."""
    drop = [c for c in adata.obs.columns if str(c).startswith("_scvi")]
    if drop:
        adata.obs = adata.obs.drop(columns=drop)
    for key in [k for k in adata.uns if str(k).startswith("_scvi")]:
        del adata.uns[key]


def _obs_only(obs: Any, obsm: dict[str, Any], uns: dict[str, Any] | None = None) -> Any:
    """An AnnData with obs and obsm but no count matrix (``X`` is None, no var)."""
    import anndata as ad

    obs = obs.drop(columns=[c for c in obs.columns if str(c).startswith("_scvi")])
    out = ad.AnnData(obs=obs.copy(), obsm=obsm)
    if uns:
        out.uns.update(uns)
    return out


def _require_columns(adata: Any, **columns: str | None) -> None:
    for what, key in columns.items():
        if key is not None and key not in adata.obs.columns:
            shown = list(map(str, adata.obs.columns))
            more = f" ... ({len(shown)} columns)" if len(shown) > 20 else ""
            raise CLIError(
                f"{what.replace('_', ' ')} column {key!r} not in adata.obs; "
                f"columns: {shown[:20]}{more}"
            )


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if len(shape) != 1 else f"({shape[0]},)"


def _mb(nbytes: int) -> float:
    return nbytes / 1e6


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _skip_groups(names: Sequence[str]) -> list[tuple[str, int]]:
    """Group skipped names as ``moment1.*`` (count) where a prefix repeats."""
    groups: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0] + ".*" if "." in name else name
        groups[head] = groups.get(head, 0) + 1
    return list(groups.items())


def _cmd_inspect(args: argparse.Namespace, con: _Console) -> int:
    path = _existing_file(args.checkpoint, "checkpoint")
    from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint
    from cellfm_sc.io.mapping import detect_variant, infer_config, split_state

    try:
        state = read_mindspore_checkpoint(path)
    except CheckpointError as exc:
        raise CLIError(f"not a readable MindSpore checkpoint: {exc}") from exc
    model, skipped, prefix = split_state(state)
    variant = detect_variant(model)
    descriptions = {
        "A": "public MindSpore CellFM (zero_emb, value and cellwise decoders)",
        "A'": "CellFM annotation Backbone (no zero_emb, no decoders)",
        "B": "CellFM with ST tokens (public PyTorch port's checkpoints)",
    }
    if "gene_emb" not in model or not any(k.startswith("encoder.") for k in model):
        shown = ", ".join(list(model)[:5])
        raise CLIError(
            f"{path} is a MindSpore checkpoint but not a CellFM one: no gene_emb / encoder.* "
            f"parameters (first names: {shown})"
        )
    dims = int(model["gene_emb"].shape[1])
    heads_known = args.num_heads is not None or dims == 1536
    heads = args.num_heads if args.num_heads is not None else (48 if dims == 1536 else 1)
    try:
        config, rows = infer_config(model, num_heads=heads)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc

    # names in file order, MindSpore spelling
    model_src = [k for k in state if k not in set(skipped)]
    params = []
    for name in model_src:
        arr = state[name]
        params.append(
            {
                "name": name,
                "dtype": str(arr.dtype),
                "shape": [int(s) for s in arr.shape],
                "mb": _mb(int(arr.nbytes)),
            }
        )
    skipped_bytes = sum(int(state[k].nbytes) for k in skipped)
    n_values = sum(int(state[k].size) for k in model_src)
    facts: dict[str, Any] = {
        "file": str(path),
        "file_mb": _mb(path.stat().st_size),
        "variant": variant,
        "variant_description": descriptions[variant],
        "config": {
            "enc_dims": config.enc_dims,
            "n_layers": config.n_layers,
            "num_heads": config.num_heads if heads_known else None,
            "head_dim": config.head_dim if heads_known else None,
            "value_bins": config.value_bins,
            "zero_emb": config.zero_emb,
            "decoders": config.decoders,
            "zero_logit": config.zero_logit,
            "st_tokens": config.st_tokens,
        },
        "gene_emb_rows": rows,
        "vocabulary_size_max": rows - 1,
        "wrapper_prefix": prefix,
        "n_parameters": len(params),
        "n_values": n_values,
        "parameters_mb": _mb(sum(int(state[k].nbytes) for k in model_src)),
        "parameters": params,
        "skipped": list(skipped),
        "skipped_mb": _mb(skipped_bytes),
    }
    if args.json:
        con.result(json.dumps(facts, indent=2))
        return 0

    c = facts["config"]
    heads_txt = (
        f"{c['num_heads']} (head dim {c['head_dim']})"
        + ("" if args.num_heads is not None else ", assumed for a released 1536-wide model")
        if heads_known
        else "unknown: pass --num-heads (cannot be read from the shapes)"
    )
    lines = [
        f"file:        {path} ({facts['file_mb']:.2f} MB)",
        f"variant:     {variant}: {descriptions[variant]}",
        "config:",
        f"  enc_dims   {c['enc_dims']}",
        f"  n_layers   {c['n_layers']}",
        f"  num_heads  {heads_txt}",
        f"  value_bins {c['value_bins']}",
        f"  zero_emb {c['zero_emb']}, decoders {c['decoders']}, zero_logit {c['zero_logit']}, "
        f"ST tokens {c['st_tokens']}",
        f"gene_emb:    {rows} rows x {c['enc_dims']} (a vocabulary of up to {rows - 1} genes; "
        "fine-tuning replaces this table with one for your genes)",
    ]
    if prefix:
        lines.append(f"wrapper prefix stripped on load: {prefix!r}")
    con.result("\n".join(lines))
    con.result()
    width = max([len(p["name"]) for p in params] + [4])
    shapes = [_fmt_shape(p["shape"]) for p in params]
    swidth = max([len(s) for s in shapes] + [5])
    con.result(f"{'name':<{width}}  {'dtype':<8}  {'shape':<{swidth}}  {'MB':>9}")
    con.result(f"{'-' * width}  {'-' * 8}  {'-' * swidth}  {'-' * 9}")
    for p, shape in zip(params, shapes):
        con.result(f"{p['name']:<{width}}  {p['dtype']:<8}  {shape:<{swidth}}  {p['mb']:>9.3f}")
    con.result(f"{len(params)} parameters, {n_values:,} values, {facts['parameters_mb']:.2f} MB")
    con.result()
    if skipped:
        groups = ", ".join(f"{g} ({n})" if n > 1 else g for g, n in _skip_groups(skipped))
        con.result(
            f"a load would skip {len(skipped)} optimizer/bookkeeping entries "
            f"({facts['skipped_mb']:.2f} MB): {groups}"
        )
    else:
        con.result("a load would skip 0 entries (no optimizer state or bookkeeping)")
    return 0


# --------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------


def _load_config_file(path: Path, command: str) -> dict[str, Any]:
    text_suffix = path.suffix.lower()
    try:
        if text_suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise CLIError(
                        "reading a TOML --config on Python 3.10 needs tomli: pip install tomli"
                    ) from None
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif text_suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise CLIError("reading a YAML --config needs PyYAML: pip install pyyaml") from None
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        elif text_suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise CLIError(f"--config must be a .toml, .yaml/.yml or .json file, got {path.name}")
    except CLIError:
        raise
    except Exception as exc:  # parse errors of any of the three formats
        raise CLIError(f"cannot parse --config {path}: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a table of options, got {type(data).__name__}")
    if isinstance(data.get(command), dict):
        data = data[command]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, Any]:
    """Merge a ``--config`` file under the flags given; return the file's values."""
    sub = _subparser(parser, args.command)
    path = _existing_file(args.config, "--config file")
    values = _load_config_file(path, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise CLIError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(actions)}")
    given = _dests_given(sub, argv)
    for key, value in values.items():
        action = actions[key]
        value = _convert_config_value(action, key, value, path)
        if key not in given:
            setattr(args, key, value)
    return values


def _convert_config_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    where = f"--config {path}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if key == "label_order" and isinstance(value, list):
        value = ",".join(map(str, value))
    if key == "devices" and isinstance(value, list):
        value = ",".join(map(str, value))
    if action.type is not None:
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where}: {value!r} is not one of {list(action.choices)}")
    return value


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _dests_given(sub: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options that appear on the command line (positionals included)."""
    given: set[str] = set()
    flags = {}
    for action in sub._actions:
        for opt in action.option_strings:
            flags[opt] = action.dest
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name in flags:
            given.add(flags[name])
        elif name.startswith("--"):
            # unique prefix abbreviations, as argparse accepts them
            hits = {d for f, d in flags.items() if f.startswith(name)}
            if len(hits) == 1:
                given |= hits
    return given


# --------------------------------------------------------------------------------------------
# finetune / demo
# --------------------------------------------------------------------------------------------


def _newest_checkpoint(out_dir: Path) -> Path | None:
    found = []
    for p in out_dir.glob("checkpoint_epoch_*.pth"):
        m = re.fullmatch(r"checkpoint_epoch_(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _validate_finetune(opts: dict[str, Any], need_data: bool = True) -> None:
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
    if opts.get("split_json") and opts.get("split_key"):
        raise CLIError("give either --split-json or --split-key, not both")
    if opts.get("checkpoint") is None and opts.get("preset") is None:
        raise CLIError(
            "pass --checkpoint CKPT (a pretrained CellFM) or --preset "
            f"{{{','.join(PRESETS)}}} (a randomly initialised model)"
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
            _existing_file(opts[key], what)
    if need_data:
        _existing_file(opts["data"], "data file")


def _check_checkpoint(path: str) -> None:
    """Fail early, with a usage error, on a file that is not a MindSpore checkpoint."""
    from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint

    try:
        read_mindspore_checkpoint(path)
    except CheckpointError as exc:
        raise CLIError(f"--checkpoint is not a readable MindSpore checkpoint: {exc}") from exc


def _split_from_options(opts: dict[str, Any], adata: Any) -> Any:
    from cellfm_sc.data import split_from_json, split_from_obs

    if opts.get("split_json"):
        try:
            return split_from_json(opts["split_json"], adata)
        except json.JSONDecodeError as exc:
            raise CLIError(f"split file {opts['split_json']} is not JSON: {exc}") from exc
        except (ValueError, KeyError) as exc:
            raise CLIError(f"split file {opts['split_json']}: {_msg(exc)}") from exc
    if opts.get("split_key"):
        try:
            return split_from_obs(adata, opts["split_key"], donor_key=opts.get("donor_key"))
        except (ValueError, KeyError) as exc:
            raise CLIError(_msg(exc)) from exc
    return None


def _finetune(opts: dict[str, Any], con: _Console, adata: Any = None, demo: bool = False) -> int:
    """The finetune path shared by ``finetune`` and ``demo``; returns the exit status."""
    started = time.perf_counter()
    out = Path(opts["output_dir"]).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {out} exists and is not a directory")
    resume_from = None
    if opts.get("resume"):
        resume_from = _newest_checkpoint(out) if out.is_dir() else None
        if resume_from is None:
            raise CLIError(f"--resume: no checkpoint_epoch_*.pth in {out} to continue from")
    elif out.is_dir() and _newest_checkpoint(out) is not None:
        print(
            f"{PROG}: warning: {out} already holds checkpoint_epoch_*.pth files of an earlier "
            "run; this run overwrites those of the epochs it reaches (use --resume to continue "
            "that run instead, or another --output-dir)",
            file=sys.stderr,
        )
    if opts.get("checkpoint"):
        _check_checkpoint(opts["checkpoint"])

    _quiet_libraries(bool(opts.get("quiet")))
    if adata is None:
        con.info(f"reading {opts['data']}" + (" (backed)" if opts.get("backed") else ""))
        adata = _read_h5ad(Path(opts["data"]), backed=bool(opts.get("backed")))
    _require_columns(
        adata,
        labels=opts["labels_key"],
        donor=opts.get("donor_key"),
        split=opts.get("split_key"),
    )
    split = _split_from_options(opts, adata)

    from cellfm_sc.report import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    resolved = {k: opts.get(k) for k in _FINETUNE_KEYS if k in opts}
    resolved.update(
        {
            "command": "demo" if demo else "finetune",
            "config": opts.get("config"),
            "cellfm_sc_version": __version__,
            "resume_from": str(resume_from) if resume_from else None,
        }
    )
    write_json_atomic(out / "config_resolved.json", resolved)

    import torch

    from cellfm_sc.model import CellFMClassifier, write_report

    con.info(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes; labels obs[{opts['labels_key']!r}]"
        + (f"; donors obs[{opts['donor_key']!r}]" if opts.get("donor_key") else "")
    )
    try:
        CellFMClassifier.setup_anndata(
            adata,
            labels_key=opts["labels_key"],
            donor_key=opts.get("donor_key"),
            layer=opts.get("layer"),
            gene_symbols=opts.get("gene_symbols"),
            label_order=opts.get("label_order"),
        )
        model = CellFMClassifier(
            adata,
            checkpoint=opts.get("checkpoint"),
            vocabulary_file=opts.get("vocabulary"),
            num_heads=opts.get("num_heads"),
            preset=opts.get("preset"),
            embedding_init=opts.get("embedding_init", "random"),
            trainable=opts.get("trainable", "encoder+head"),
            max_tokens=opts.get("max_tokens", 2048),
            seed=opts.get("seed", 0),
            hgnc_table=opts.get("hgnc_table"),
        )
    except (ValueError, KeyError) as exc:
        raise CLIError(_msg(exc)) from exc
    con.info(str(getattr(model, "summary", "")))

    patience = opts.get("patience", 3)
    model.train(
        max_epochs=opts["epochs"],
        batch_size=opts.get("batch_size", 16),
        lr=opts.get("lr", 1e-4),
        weight_decay=opts.get("weight_decay", 1e-5),
        validation_size=opts.get("validation_size", 0.1),
        test_size=opts.get("test_size", 0.2),
        split=split,
        early_stopping=patience > 0,
        patience=max(patience, 1),
        check_val_every_n_steps=opts.get("eval_every_steps"),
        precision=opts.get("precision"),
        accelerator=opts.get("accelerator", "auto"),
        devices=opts.get("devices", "auto"),
        strategy=opts.get("strategy"),
        num_workers=opts.get("num_workers", 0),
        gradient_checkpointing=bool(opts.get("gradient_checkpointing")),
        checkpoint_dir=str(out),
        resume_from=str(resume_from) if resume_from else None,
        enable_progress_bar=not opts.get("quiet"),
        **({"num_nodes": opts["num_nodes"]} if opts.get("num_nodes", 1) > 1 else {}),
    )
    if model.global_rank_ != 0:
        return 0  # under DDP only the first process evaluates and writes the outputs

    from cellfm_sc.report import atomic_path

    # the model holds the best weights after training (restored by early stopping)
    with atomic_path(out / "best_model.pth") as tmp:
        torch.save(
            {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
            tmp,
        )

    n_test = len(model.test_indices)
    n_val = len(model.validation_indices)
    if n_test:
        where, indices = f"test split ({n_test:,} cells)", "test"
    elif n_val:
        where, indices = f"validation split ({n_val:,} cells; no test split)", "validation"
    else:
        where, indices = "training cells (no held-out cells: optimistic)", model.train_indices
        con.info("warning: nothing was held out; the report scores the training cells")
    con.info(f"evaluating on the {where}")
    result = model.evaluate(indices=indices)
    files = dict(write_report(model, result, out))
    model.save(str(out / "model"), overwrite=True)
    files["model"] = out / "model"
    files["best_model"] = out / "best_model.pth"
    files["config_resolved"] = out / "config_resolved.json"

    if opts.get("write_split_h5ad"):
        key = "cellfm"
        model.annotate(adata, key_added=key, batch_size=max(opts.get("batch_size", 16), 64))
        emb = adata.obsm["X_cellfm"]
        for name, idx in (
            ("train", model.train_indices),
            ("validation", model.validation_indices),
            ("test", model.test_indices),
        ):
            if len(idx) == 0:
                continue
            part = _obs_only(
                adata.obs.iloc[idx],
                {
                    "X_cellfm": emb[idx],
                    f"{key}_probabilities": adata.obsm[f"{key}_probabilities"][idx],
                },
                {key: adata.uns.get(key, {})},
            )
            files[f"{name}_h5ad"] = _write_h5ad_atomic(part, out / f"{name}.h5ad")

    elapsed = time.perf_counter() - started
    _summary(con, result, files, where, elapsed, out)
    return 0


def _summary(
    con: _Console, result: Any, files: dict[str, Path], where: str, elapsed: float, out: Path
) -> None:
    con.result()
    con.result(f"done in {elapsed:.0f} s; evaluated on the {where}")
    con.result(str(result))
    con.result()
    con.result(f"output directory: {out}")
    order = (
        ("model", "saved model (CellFMClassifier.load)"),
        ("best_model", "best weights (state dict)"),
        ("training_results", "metrics and run facts"),
        ("predictions", "per-cell predictions"),
        ("donor_predictions", "per-donor predictions"),
        ("confusion_matrix", "confusion matrix"),
        ("training_curves", "training curves"),
        ("umap", "UMAP of X_cellfm"),
        ("config_resolved", "options used"),
        ("train_h5ad", "train cells: obs + X_cellfm"),
        ("validation_h5ad", "validation cells: obs + X_cellfm"),
        ("test_h5ad", "test cells: obs + X_cellfm"),
    )
    for key, what in order:
        if key in files:
            con.result(f"  {Path(files[key]).name + ('/' if key == 'model' else ''):<26} {what}")
    n_ckpt = len(list(out.glob("checkpoint_epoch_*.pth")))
    if n_ckpt:
        con.result(f"  {'checkpoint_epoch_*.pth':<26} {n_ckpt} per-epoch checkpoint(s)")


def _cmd_finetune(args: argparse.Namespace, con: _Console) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    _validate_finetune(opts)
    return _finetune(opts, con)


def _cmd_demo(args: argparse.Namespace, con: _Console) -> int:
    import warnings

    from cellfm_sc import datasets

    opts = dict(DEMO_DEFAULTS)
    opts.update(
        epochs=args.epochs,
        output_dir=args.output_dir,
        labels_key="celltype",
        quiet=args.quiet,
        debug=args.debug,
        data=str(datasets.pbmc3k_path()),
    )
    con.result(
        "cellfm-sc demo: NO pretrained CellFM weights are used. A small 'tiny' model (64 dims, "
        "2 retention layers) is randomly initialised and fine-tuned on the shipped PBMC 3k "
        "subset (1,200 cells, 8 cell types; 10x Genomics, CC BY 4.0), offline. "
        f"{opts['epochs']} epoch(s), max {opts['max_tokens']} genes per cell, 1 CPU thread."
    )
    warnings.filterwarnings("ignore", message="no checkpoint given")  # said above, plainly
    import torch

    # one intra-op thread: as fast as two for this tiny model, bit-reproducible, and not
    # slowed down by spinning threads when the machine is shared
    torch.set_num_threads(1)
    adata = datasets.pbmc3k()
    status = _finetune(opts, con, adata=adata, demo=True)
    report = Path(opts["output_dir"]) / "training_results.json"
    with open(report, encoding="utf-8") as fh:
        acc = json.load(fh)["cell_metrics"]["accuracy"]
    con.result()
    con.result(f"demo accuracy (test cells): {acc:.3f}")
    con.result(f"report: {report.resolve()}")
    return status


# --------------------------------------------------------------------------------------------
# predict / embed
# --------------------------------------------------------------------------------------------


def _load_for_inference(args: argparse.Namespace, con: _Console) -> tuple[Any, Any, Path]:
    model_dir = _existing_dir(args.model_dir, "model directory")
    data = _existing_file(args.data, "data file")
    output = Path(args.output).expanduser()
    if output.suffix != ".h5ad":
        raise CLIError(f"--output must end in .h5ad, got {output}")
    _quiet_libraries(args.quiet)
    con.info(f"reading {data}")
    adata = _read_h5ad(data, backed=args.backed)
    from cellfm_sc.model import CellFMClassifier

    con.info(f"loading the model from {model_dir}")
    try:
        model = CellFMClassifier.load(str(model_dir), adata=adata)
    except FileNotFoundError as exc:
        raise CLIError(f"{model_dir} is not a saved cellfm-sc model: {_msg(exc)}") from exc
    except (ValueError, KeyError) as exc:
        raise CLIError(_msg(exc)) from exc
    if args.layer is not None:
        if args.layer not in adata.layers:
            raise CLIError(
                f"--layer {args.layer!r} not in adata.layers; layers: {list(adata.layers)}"
            )
        model.layer = args.layer
    return model, adata, output


def _cmd_predict(args: argparse.Namespace, con: _Console) -> int:
    model, adata, output = _load_for_inference(args, con)
    k = args.key_added
    model.annotate(adata, key_added=k, batch_size=args.batch_size, device=args.device)
    _drop_scvi_bookkeeping(adata)
    if args.backed:  # never copy the counts of a backed file
        keys = (f"{k}_probabilities", f"X_{k}")
        _write_h5ad_atomic(
            _obs_only(adata.obs, {key: adata.obsm[key] for key in keys}, {k: adata.uns[k]}),
            output,
        )
    else:
        _write_h5ad_atomic(adata, output)
    counts = adata.obs[f"{k}_prediction"].value_counts()
    con.result(f"annotated {adata.n_obs:,} cells -> {output}")
    con.result(
        f"  obs['{k}_prediction'], obs['{k}_confidence'], obsm['{k}_probabilities'], obsm['X_{k}']"
    )
    con.result("  predicted: " + ", ".join(f"{lab} {n:,}" for lab, n in counts.items() if n > 0))
    return 0


def _cmd_embed(args: argparse.Namespace, con: _Console) -> int:
    model, adata, output = _load_for_inference(args, con)
    emb = model.get_latent_representation(adata, batch_size=args.batch_size, device=args.device)
    out = _obs_only(adata.obs, {"X_cellfm": emb})
    _write_h5ad_atomic(out, output)
    con.result(f"embedded {adata.n_obs:,} cells -> {output}: obsm['X_cellfm'] {emb.shape}")
    return 0


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _msg(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return _one_line(exc.args[0])
    return _one_line(str(exc)) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cellfm-sc`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Parameters
    ----------
    argv
        Command-line arguments without the program name.

    Returns
    -------
    int
        0 on success, 2 for usage and data errors (one ``cellfm-sc: error:`` line on
        stderr), 1 for unexpected failures, 130 when interrupted.

    Examples
    --------
    >>> main(["inspect", "model.ckpt", "--num-heads", "8"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    con = _Console(quiet=getattr(args, "quiet", False))
    debug = getattr(args, "debug", False)
    handler: Callable[[argparse.Namespace, _Console], int] = args.handler
    try:
        if getattr(args, "config", None):
            _apply_config(parser, args, argv)
            con.quiet = bool(getattr(args, "quiet", False))
            debug = bool(getattr(args, "debug", False))
        return handler(args, con)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KeyError) as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_msg(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        if "out of memory" in str(exc).lower():
            hint += "; lower --batch-size or --max-tokens, or use --precision bf16-mixed"
        print(f"{PROG}: error: {type(exc).__name__}: {_msg(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
