"""The ``cellfm-sc`` command line: one module per command, shared helpers in ``_console``,
``_args`` and ``_files``.

Subcommands
-----------
``inspect``
    What a MindSpore CellFM checkpoint holds: variant, configuration, parameters, and the
    optimizer/bookkeeping entries a load would skip.
``finetune``
    Fine-tune CellFM on an ``.h5ad`` file and write the model, checkpoints, predictions,
    metrics and plots into an output directory.
``pretrain``
    Pretrain CellFM (masked values) on unlabelled ``.h5ad`` files, from scratch or continued
    from a checkpoint, and export a MindSpore checkpoint + vocabulary to fine-tune from.
``predict``
    Annotate an ``.h5ad`` file with a fine-tuned model (predictions, confidence, class
    probabilities and the cell embedding).
``embed``
    Only the cell embedding ``obsm["X_cellfm"]`` of an ``.h5ad`` file.
``demo``
    The whole fine-tuning path, offline, on the shipped PBMC 3k subset with a small randomly
    initialised model.

Usage and data errors (a missing column, counts that are not counts, a corrupt checkpoint,
an unwritable output folder, ...) print one line starting with ``cellfm-sc: error:`` on
stderr, worded in flags (``--layer counts``), and exit with status 2; unexpected failures
exit with status 1 (``--debug`` shows the traceback). Progress and information go to stderr,
results to stdout. This package imports nothing heavy at import time (no torch, anndata,
scanpy, scvi-tools, Lightning), so ``cellfm-sc --help`` answers at once.

Examples
--------
.. code-block:: bash

    cellfm-sc inspect CellFM_80M_weight.ckpt
    cellfm-sc finetune sea_ad.h5ad --labels-key ADNC --donor-key "Donor ID" \\
        --label-order "Not AD,Low,Intermediate,High" \\
        --checkpoint CellFM_80M_weight.ckpt --vocabulary expand_gene_info.csv \\
        --output-dir runs/adnc
    cellfm-sc pretrain atlas.h5ad lung.h5ad --gene-symbols lung.h5ad=gene_names \\
        --preset small --epochs 5 --output-dir runs/pretrain
    cellfm-sc predict runs/adnc/model query.h5ad --output query_annotated.h5ad
    cellfm-sc demo
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from cellfm_sc import __version__
from cellfm_sc.cli import demo, finetune, inspect, predict, pretrain
from cellfm_sc.cli._args import add_command
from cellfm_sc.cli._config import apply_config
from cellfm_sc.cli._console import (
    PROG,
    CLIError,
    Console,
    Parser,
    data_errors,
    message_of,
    warnings_as_lines,
)

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``cellfm-sc`` argument parser (also used to generate the CLI reference).

    Returns
    -------
    argparse.ArgumentParser
        With subcommands ``inspect``, ``finetune``, ``pretrain``, ``predict``, ``embed`` and
        ``demo``.

    Examples
    --------
    >>> args = build_parser().parse_args(["inspect", "model.ckpt", "--num-heads", "8"])
    >>> args.command, args.num_heads
    ('inspect', 8)
    """
    parser = Parser(
        prog=PROG,
        description="Fine-tune the CellFM single-cell foundation model on an AnnData (.h5ad).",
        epilog="Run 'cellfm-sc COMMAND --help' for the options of a command. "
        "Documentation: https://cellfm-sc.readthedocs.io",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in (
        inspect.COMMAND,
        finetune.COMMAND,
        pretrain.COMMAND,
        predict.PREDICT,
        predict.EMBED,
        demo.COMMAND,
    ):
        add_command(sub, command)
    return parser


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
    con = Console(quiet=getattr(args, "quiet", False))
    warnings_as_lines()
    debug = getattr(args, "debug", False)
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        if getattr(args, "config", None):
            apply_config(parser, args, argv)
            con.quiet = bool(getattr(args, "quiet", False))
            debug = bool(getattr(args, "debug", False))
        return handler(args, con)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, data_errors()):
            print(f"{PROG}: error: {message_of(exc)}", file=sys.stderr)
            return 2
        hint = "" if debug else " (rerun with --debug for the traceback)"
        if "out of memory" in str(exc).lower():
            hint += "; lower --batch-size or --max-tokens, or use --precision bf16-mixed"
        print(f"{PROG}: error: {type(exc).__name__}: {message_of(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
