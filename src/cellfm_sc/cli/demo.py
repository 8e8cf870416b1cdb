"""``cellfm-sc demo``: the whole finetune path, offline, on the shipped PBMC 3k subset."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cellfm_sc.cli._args import Command
from cellfm_sc.cli._console import Console
from cellfm_sc.cli.finetune import add_training_options, finetune, print_summary

__all__ = ["COMMAND", "DEMO_DEFAULTS", "REPRODUCIBLE_CPU", "pin_cpu_kernels", "run"]

#: what makes the demo's numbers the same on every x86-64 CPU (Intel or AMD, with or without
#: AVX2 / AVX-512): PyTorch's own kernels in their generic build (not the AVX2 / AVX-512 ones,
#: whose sums round differently) and MKL's conditional numerical reproducibility in its mode
#: for every x86 CPU. Unpinned, three settings of one machine gave test accuracy 0.9375 /
#: 0.9375 / 0.9417 (macro-F1 0.932 / 0.941 / 0.947): a tiny model trained from scratch
#: follows its rounding. Costs about 2x in training time. Set before torch is imported.
REPRODUCIBLE_CPU: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
}

#: settings of ``cellfm-sc demo`` (2 CPU cores: one to three minutes)
DEMO_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "embedding_init": "random",
    "trainable": "auto",
    "epochs": 5,
    "batch_size": 16,
    "lr": "auto",
    "max_tokens": 512,
    "validation_size": 0.1,
    "test_size": 0.2,
    "early_stopping": "auto",
    "patience": 3,
    "seed": 0,
}


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output-dir",
        "-o",
        metavar="DIR",
        default="cellfm_demo",
        help="output directory",
    )
    add_training_options(p, demo=True)


def pin_cpu_kernels() -> bool:
    """Set :data:`REPRODUCIBLE_CPU` (values the user set win) before torch is imported.

    Returns
    -------
    bool
        False when torch is already imported in this process: the settings cannot act then.
    """
    if "torch" in sys.modules:
        return False
    for key, value in REPRODUCIBLE_CPU.items():
        os.environ.setdefault(key, value)
    return True


def run(args: argparse.Namespace, con: Console) -> int:
    if not pin_cpu_kernels():
        con.warn(
            "torch was imported before the demo started, so its CPU kernels could not be "
            "pinned: the figures may differ from docs/demo_output.txt in the last digits "
            "(run the demo as the cellfm-sc command)"
        )
    from cellfm_sc import datasets

    opts = dict(DEMO_DEFAULTS)
    opts.update(
        epochs=args.epochs,
        output_dir=args.output_dir,
        labels_key="celltype",
        quiet=args.quiet,
        progress=args.progress,
        debug=args.debug,
        data=str(datasets.pbmc3k_path()),
    )
    con.result(
        "cellfm-sc demo: NO pretrained CellFM weights are used. A small 'tiny' model (64 dims, "
        "2 retention layers) is randomly initialised and fine-tuned on the shipped PBMC 3k "
        "subset (1,200 cells, 8 cell types; 10x Genomics, CC BY 4.0), offline. "
        f"{opts['epochs']} epoch(s), max {opts['max_tokens']} genes per cell, 1 CPU thread, "
        "CPU kernels pinned (the same figures on every x86-64 CPU)."
    )
    import torch

    # one intra-op thread: as fast as two for this tiny model, bit-reproducible, and not
    # slowed down by spinning threads when the machine is shared; deterministic algorithms
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    facts = finetune(opts, con, adata=datasets.pbmc3k(), demo=True)
    out = Path(opts["output_dir"])
    print_summary(con, facts, out)
    report = out / "training_results.json"
    con.result()
    con.result(f"demo accuracy (test cells): {facts['result'].cell_metrics['accuracy']:.3f}")
    con.result(f"report: {report.resolve()}")
    return 0


COMMAND = Command(
    "demo",
    "fine-tune a small random model on the shipped PBMC 3k subset (offline)",
    "Run the whole finetune path offline on the shipped PBMC 3k subset "
    "(1,200 cells, 8 cell types; 10x Genomics, CC BY 4.0) with the 'tiny' preset "
    "(64 dims, 2 layers), randomly initialised: no pretrained CellFM weights are used. "
    "Takes one to three minutes on 2 CPU cores; the figures are the same on every x86-64 "
    "CPU (one thread, deterministic algorithms, pinned CPU kernels). Writes into "
    "./cellfm_demo unless --output-dir says otherwise.",
    _add_options,
    run,
)
