"""The ``finetune`` command line's option groups (data, split, model, output, training)."""

from __future__ import annotations

import argparse

from cellfm_sc._constants import FINETUNE_RECIPES, MONITORS, TRAINABLE_POLICIES
from cellfm_sc.cli._args import (
    add_hardware_args,
    add_shared,
    auto_fraction_type,
    label_order_type,
    positive_int,
    split_size,
)


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    """Every option of ``finetune`` but ``DATA.h5ad``, ``--config`` and the diagnostics."""
    _add_data_options(p)
    _add_split_options(p)
    _add_model_options(p)
    _add_output_options(p)
    add_training_options(p)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--labels-key", metavar="COLUMN", help="obs column to predict (required)")
    data.add_argument(
        "--donor-key",
        metavar="COLUMN",
        help="obs column of donors: donor-level split and metrics (QWK for ordinal labels)",
    )
    data.add_argument(
        "--label-order",
        type=label_order_type,
        metavar="A,B,C",
        help="comma-separated labels, lowest first: makes the labels ordinal "
        "(e.g. 'Not AD,Low,Intermediate,High')",
    )
    data.add_argument("--layer", help="adata.layers key holding raw counts (default: X)")
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
        help="var column of gene symbols when var_names are not symbols",
    )
    data.add_argument(
        "--backed",
        action="store_true",
        help="open DATA.h5ad backed (read rows from disk; for files larger than memory)",
    )


def _add_split_options(p: argparse.ArgumentParser) -> None:
    split = p.add_argument_group("split")
    split.add_argument(
        "--split-json",
        metavar="FILE",
        help="split file with train_indices / test_indices (and val_indices)",
    )
    split.add_argument(
        "--split-key",
        metavar="COLUMN",
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


def _add_model_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    add_shared(
        model,
        "--checkpoint",
        help="pretrained MindSpore CellFM checkpoint (e.g. CellFM_80M_weight.ckpt)",
    )
    add_shared(
        model,
        "--vocabulary",
        help="the checkpoint's gene vocabulary (CellFM's expand_gene_info.csv)",
    )
    model.add_argument(
        "--hgnc-table",
        metavar="FILE",
        help="HGNC table for alias / previous-symbol gene mapping",
    )
    add_shared(
        model,
        "--num-heads",
        help="retention heads of the checkpoint (48 assumed for the released models)",
    )
    add_shared(model, "--preset", help="model size without a checkpoint (randomly initialised)")
    add_shared(
        model,
        "--embedding-init",
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
        "lp-ft+llrd, frozen-rows (transferred gene rows frozen), shrink-perturb (from weights "
        "halfway between the pretrained and a fresh trunk)",
    )
    add_shared(model, "--max-tokens")
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


def _add_output_options(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "-o", metavar="OUT", help="output directory (required)")
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
    add_shared(out, "--keep-checkpoints")


def add_training_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Options shared by ``finetune`` (all) and ``demo`` (the number of epochs)."""
    train = p.add_argument_group("training")
    add_shared(train, "--epochs", default=5 if demo else 20, help="maximum epochs")
    if demo:
        return
    add_shared(train, "--batch-size", default=16)
    add_shared(
        train,
        "--lr",
        help="learning rate (AdamW); auto: 1e-3 for a random trunk, for a pretrained one 1e-4 "
        "at the released width (1536) and 1e-3 for narrower trunks",
    )
    add_shared(
        train,
        "--lr-schedule",
        help="warmup_cosine: linear warm-up over 5%% of the steps, then cosine to 0; step: "
        "x0.95 per epoch (the original scripts)",
    )
    add_shared(train, "--weight-decay", help="AdamW weight decay")
    train.add_argument(
        "--eval-every-steps",
        type=positive_int,
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
    add_shared(
        train,
        "--patience",
        help="early stopping: evaluations without improvement (0 turns early stopping off)",
    )
    train.add_argument(
        "--class-weights",
        choices=("none", "balanced", "balanced_donors"),
        default="none",
        help="balanced: classes weigh the same; balanced_donors: donors weigh the same",
    )
    train.add_argument(
        "--depth-augmentation",
        metavar="P",
        type=auto_fraction_type,
        default="auto",
        help="chance that a training cell is shown thinned to a random 25-100%% of its "
        "counts each epoch; auto: 1 after a --checkpoint, 0 without (--level cell)",
    )
    add_shared(train, "--seed", help="seed of splits, init and sampling")
    add_shared(train, "--resume")
    add_hardware_args(p, num_nodes=True)
