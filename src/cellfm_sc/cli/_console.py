"""The command line's voice: the program name, the usage error, one-line messages worded
as flags, help formatting, the console and what libraries may print.

The base of the CLI helpers (``_args`` and ``_files`` import it); imports nothing heavy at
import time.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NoReturn

from cellfm_sc._constants import LIBRARY_NOISE

PROG = "cellfm-sc"


class CLIError(Exception):
    """A usage or data error: reported as one ``cellfm-sc: error:`` line, exit status 2."""


# --------------------------------------------------------------------------------------------
# the parser's voice
# --------------------------------------------------------------------------------------------


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``cellfm-sc: error: ...``, status 2, and
    whose help is laid out by :class:`Formatter` (unless ``formatter_class`` says otherwise)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {one_line(message)}{hint}\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
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
        # identity, not ==: a default of 0 (== False) is a real default and is shown
        unset = action.default is None or action.default is False
        if unset or action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        return super()._get_help_string(action)


# --------------------------------------------------------------------------------------------
# errors in the command line's words
# --------------------------------------------------------------------------------------------

#: library keyword -> command-line flag (the Python API's errors name keywords)
KEYWORD_FLAGS = {
    "labels_key": "--labels-key",
    "donor_key": "--donor-key",
    "label_order": "--label-order",
    "layer": "--layer",
    "use_raw": "--use-raw",
    "gene_symbols": "--gene-symbols",
    "split_key": "--split-key",
    "num_heads": "--num-heads",
    "preset": "--preset",
    "checkpoint": "--checkpoint",
    "vocabulary_file": "--vocabulary",
    "hgnc_table": "--hgnc-table",
    "embedding_init": "--embedding-init",
    "trainable": "--trainable",
    "max_tokens": "--max-tokens",
    "batch_size": "--batch-size",
    "max_epochs": "--epochs",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "patience": "--patience",
    "validation_size": "--validation-size",
    "test_size": "--test-size",
    "precision": "--precision",
    "num_workers": "--num-workers",
    "resume_from": "--resume",
    "min_gene_coverage": "--min-gene-coverage",
    "max_abs": "--max-abs",
    "bag_size": "--bag-size",
    "mask_ratio": "--mask-ratio",
    "accelerator": "--accelerator",
    "devices": "--devices",
    "device": "--device",
}
#: flags that have a ``--no-`` form (``keyword=False`` rewords to it)
NEGATABLE_FLAGS = frozenset({"--use-raw"})
_KEYWORD_RE = re.compile(
    r"\b(" + "|".join(map(re.escape, KEYWORD_FLAGS)) + r")=('(?:[^']*)'|\"(?:[^\"]*)\"|[^\s,;:)]+)"
)


def in_flags(message: str) -> str:
    """Reword the Python API's ``keyword=value`` into the command line's ``--flag value``.

    Examples
    --------
    >>> print(in_flags('counts look log-normalised; pass layer="counts" or use_raw=True'))
    counts look log-normalised; pass --layer counts or --use-raw
    >>> in_flags("set use_raw=True")
    'set --use-raw'
    >>> in_flags("or use_raw=False for adata.X")
    'or --no-use-raw for adata.X'
    """

    def swap(m: re.Match[str]) -> str:
        flag, value = KEYWORD_FLAGS[m.group(1)], m.group(2)
        if value in ("True", "False", "None"):
            if value == "True":
                return flag
            return f"--no-{flag[2:]}" if flag in NEGATABLE_FLAGS else f"no {flag}"
        if value[:1] in "'\"":
            value = value[1:-1]
            if not value or re.search(r"\s", value):
                value = f'"{value}"'
        return f"{flag} {value}"

    return _KEYWORD_RE.sub(swap, message)


def message_of(exc: BaseException) -> str:
    """One line: the exception's message (a KeyError's without quotes), in flags."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return in_flags(one_line(text))


def data_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's data or arguments (exit status 2)."""
    from cellfm_sc._errors import UntrainedModelError

    return (
        CLIError,
        UntrainedModelError,  # a saved model that was never trained
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        KeyError,
        FloatingPointError,
    )


# --------------------------------------------------------------------------------------------
# console
# --------------------------------------------------------------------------------------------


class Console:
    """Info messages and progress on stderr (unless quiet); results on stdout, always."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)

    def result(self, message: str = "") -> None:
        print(message, flush=True)


def show_progress(opts: Any) -> bool:
    """Whether progress bars are drawn: never with ``--quiet``; with ``--progress``, or
    when stderr is a terminal (a log file gets no bars: they are thousands of ``\\r`` lines).

    ``opts`` is the parsed arguments (a Namespace) or their dict.
    """
    get = opts.get if isinstance(opts, dict) else lambda k: getattr(opts, k, None)
    if get("quiet"):
        return False
    if get("progress"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def warnings_as_lines() -> None:
    """Show each distinct warning once, as one ``cellfm-sc: warning: ...`` line on stderr
    (no source line, no Python file path)."""
    import warnings

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = (
            message_of(message)
            if isinstance(message, BaseException)
            else in_flags(one_line(message))
        )
        if text in seen:
            return
        seen.add(text)
        print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def quiet_libraries(quiet: bool) -> None:
    """Silence what a command-line user cannot act on; under ``--quiet`` all info chatter.

    Imports Lightning first: it sets its own logger levels when imported.
    """
    import logging
    import warnings

    # library noise that says nothing about the run
    for pattern in (
        *LIBRARY_NOISE,
        ".*no checkpoint given.*",  # the command line says it in its own words
    ):
        warnings.filterwarnings("ignore", message=pattern)
    import lightning.pytorch  # noqa: F401

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "scvi")
    level = logging.WARNING
    for name in names:
        if not quiet and name.startswith("lightning"):
            continue
        logging.getLogger(name).setLevel(level)
        for child in list(logging.root.manager.loggerDict):
            if child.startswith(name + "."):
                logging.getLogger(child).setLevel(level)
