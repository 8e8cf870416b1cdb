"""What every ``cellfm-sc`` command shares: argument types, the parser's voice, the console,
errors worded as flags, reading/writing files, and the output-directory transaction.

Imports nothing heavy (no torch, anndata, scvi-tools, Lightning) at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cellfm_sc._constants import LIBRARY_NOISE, PRECISIONS

PROG = "cellfm-sc"


class CLIError(Exception):
    """A usage or data error: reported as one ``cellfm-sc: error:`` line, exit status 2."""


# --------------------------------------------------------------------------------------------
# argument types (argparse turns their ArgumentTypeError into a usage error)
# --------------------------------------------------------------------------------------------


def number_type(cast: type, minimum: float, strict: bool, what: str):
    """An argparse ``type=``: ``cast(text)`` that is finite and above (or at) ``minimum``."""

    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = value > minimum if strict else value >= minimum
        if not ok or value in (float("inf"), float("-inf")) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = number_type(int, 0, True, "a positive integer")
non_negative_int = number_type(int, 0, False, "an integer >= 0")
positive_float = number_type(float, 0, True, "a positive number")
non_negative_float = number_type(float, 0, False, "a number >= 0")


def fraction_type(text: str) -> float:
    """A number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def keep_checkpoints_type(text: str) -> int:
    """``-1`` (keep every epoch's checkpoint) or an integer >= 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"expected -1 (all) or an integer >= 1, got {text!r}")
    return value


keep_checkpoints_type.__name__ = "-1 or an integer >= 1"


def lr_type(text: str) -> float | str:
    """``auto`` or a positive number."""
    if str(text).strip() == "auto":
        return "auto"
    return positive_float(text)


def split_size(text: str) -> float | int:
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


def devices_type(text: str) -> int | str | list[int]:
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


def device_type(text: str) -> str | None:
    """``auto`` (None) or a torch device string."""
    text = str(text).strip()
    if text == "auto":
        return None
    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def label_order_type(text: str) -> list[str]:
    labels = [t.strip() for t in str(text).split(",")]
    if len(labels) < 2 or any(not t for t in labels):
        raise argparse.ArgumentTypeError(
            f"expected at least two comma-separated labels, lowest first, got {text!r}"
        )
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"labels repeat in {text!r}")
    return labels


# --------------------------------------------------------------------------------------------
# the parser's voice
# --------------------------------------------------------------------------------------------


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``cellfm-sc: error: ...``, status 2."""

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


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The ``checkpoint_epoch_N.pth`` of ``out_dir`` with the highest ``N``, or None."""
    from cellfm_sc._checkpoints import epoch_checkpoints

    found = epoch_checkpoints(out_dir)
    return found[-1][1] if found else None


def checkpoints_line(out: Path) -> str | None:
    """The summary's line on the epoch checkpoints left in ``out`` (None when there are none).

    Examples
    --------
    >>> checkpoints_line(Path("no_such_folder")) is None
    True
    """
    from cellfm_sc._checkpoints import epoch_checkpoints

    epochs = [n for n, _ in epoch_checkpoints(out)] if out.is_dir() else []
    if not epochs:
        return None
    shown = ", ".join(map(str, epochs[:8])) + (" ..." if len(epochs) > 8 else "")
    return f"  {'checkpoint_epoch_*.pth':<26} epoch(s) {shown} (--resume; --keep-checkpoints)"


def resume_checkpoint(out: Path) -> Path:
    """``--resume``: the newest epoch checkpoint in ``out``, checked before any work.

    Raises
    ------
    CLIError
        No checkpoint, or one that is empty, truncated, corrupt or not an epoch checkpoint.
    """
    from cellfm_sc.io import CheckpointError
    from cellfm_sc.model._core import check_resume_file

    path = newest_checkpoint(out) if out.is_dir() else None
    if path is None:
        raise CLIError(f"--resume: no checkpoint_epoch_*.pth in {out} to continue from")
    try:
        check_resume_file(path)
    except CheckpointError as exc:
        raise CLIError(
            f"{exc}; delete it to resume from the epoch before, or start without --resume"
        ) from exc
    return path


def add_hardware_args(p: argparse.ArgumentParser, *, num_nodes: bool) -> None:
    """The "hardware" option group every training command shares."""
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
        type=devices_type,
        default="auto",
        help="'auto', a number of devices (4) or device indices (0,1); several GPUs use DDP",
    )
    if num_nodes:
        hw.add_argument(
            "--num-nodes",
            metavar="N",
            type=positive_int,
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
        help="numeric precision (default: bf16-mixed on GPUs that support it, else 32)",
    )
    hw.add_argument(
        "--num-workers",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="data-loader worker processes",
    )
    hw.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layer activations in the backward pass (much less GPU memory, "
        "e.g. for the 800M preset)",
    )


def add_keep_checkpoints(group: Any) -> None:
    """``--keep-checkpoints N`` (the output group of every training command)."""
    group.add_argument(
        "--keep-checkpoints",
        metavar="N",
        type=keep_checkpoints_type,
        default=1,
        help="per-epoch checkpoint_epoch_*.pth files kept in the output directory: the newest "
        "N (what --resume continues from) plus the best epoch's; -1 keeps every epoch's",
    )


def add_diagnostics(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars and no info messages (warnings and errors are still shown)",
    )
    group.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars also when stderr is not a terminal (a log file); on a "
        "terminal they are shown unless --quiet",
    )
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")


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


#: exceptions that are the user's data or arguments (exit status 2)
def data_errors() -> tuple[type[BaseException], ...]:
    from cellfm_sc._errors import UntrainedModelError

    out: list[type[BaseException]] = [
        CLIError,
        UntrainedModelError,  # a saved model that was never trained
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        KeyError,
        FloatingPointError,
    ]
    return tuple(out)


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


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def existing_file(path: str | os.PathLike[str] | None, what: str) -> Path:
    if path is None:
        raise CLIError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if p.is_dir():
        raise CLIError(f"{what} is a directory, expected a file: {p}")
    return p


def existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if not p.is_dir():
        raise CLIError(f"{what} is not a directory: {p}")
    return p


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Prove that ``path`` (an existing folder, or one that can be created) takes files.

    Creates nothing: a missing folder is checked through its nearest existing parent, so a
    run refused later leaves nothing behind.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"{what} {p} exists and is not a directory")
    if p.is_dir():
        try:
            probe = p / f".cellfm_write_test.{os.getpid()}.{uuid.uuid4().hex[:6]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CLIError(f"{what} {p} is not writable: {exc.strerror or exc}") from exc
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {p} cannot be created: {parent} is not writable")
    return p


def writable_parent(path: str | os.PathLike[str], what: str) -> Path:
    """An output file whose folder exists (or can be made) and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{what} {p} is a directory, expected a file name")
    writable_dir(p.parent if str(p.parent) else Path("."), f"the folder of {what}")
    return p


def read_h5ad(path: Path, backed: bool = False) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"cannot read {path} as an .h5ad file: {one_line(exc)}") from exc


def drop_scvi_bookkeeping(adata: Any) -> None:
    """Remove the registry columns/keys scvi-tools adds (``_scvi_labels``, ``_scvi_uuid``...)."""
    drop = [c for c in adata.obs.columns if str(c).startswith("_scvi")]
    if drop:
        adata.obs = adata.obs.drop(columns=drop)
    for key in [k for k in adata.uns if str(k).startswith("_scvi")]:
        del adata.uns[key]


def obs_only(obs: Any, obsm: dict[str, Any], uns: dict[str, Any] | None = None) -> Any:
    """An AnnData with obs and obsm but no count matrix (``X`` is None, no var)."""
    import anndata as ad

    obs = obs.drop(columns=[c for c in obs.columns if str(c).startswith("_scvi")])
    out = ad.AnnData(obs=obs.copy(), obsm=obsm)
    if uns:
        out.uns.update(uns)
    return out


def write_split_h5ads(
    adata: Any, model: Any, work: Path, obsm_keys: Sequence[str], uns_key: str
) -> dict[str, Path]:
    """``train.h5ad`` / ``validation.h5ad`` / ``test.h5ad`` in ``work``: each split's ``obs``
    with the ``obsm`` entries ``obsm_keys`` and ``uns[uns_key]``, no count matrix."""
    from cellfm_sc._atomic import write_h5ad_atomic

    files = {}
    for name, idx in (
        ("train", model.train_indices),
        ("validation", model.validation_indices),
        ("test", model.test_indices),
    ):
        if len(idx) == 0:
            continue
        part = obs_only(
            adata.obs.iloc[idx],
            {k: adata.obsm[k][idx] for k in obsm_keys},
            {uns_key: adata.uns.get(uns_key, {})},
        )
        files[f"{name}_h5ad"] = write_h5ad_atomic(part, work / f"{name}.h5ad")
    return files


# --------------------------------------------------------------------------------------------
# the output directory of a run
# --------------------------------------------------------------------------------------------


class RunDirectory:
    """A run's outputs appear in ``out`` whole, or not at all.

    Files are written into a temporary folder inside ``out`` (:attr:`work`) and moved into
    place when the run succeeds. When it fails, the temporary folder is removed and
    ``out/run.log`` says what failed. Completed ``checkpoint_epoch_N.pth`` files (each
    written atomically) are written straight into ``out`` so that ``--resume`` can continue
    a failed run.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.work = out / f".cellfm_run.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.started = time.time()

    @contextlib.contextmanager
    def transaction(self, argv: Sequence[str]) -> Iterator[RunDirectory]:
        from cellfm_sc._atomic import atomic_write, default_mode

        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir()
        try:
            yield self
        except BaseException as exc:
            shutil.rmtree(self.work, ignore_errors=True)
            lines = [
                f"{PROG} {' '.join(argv)}",
                f"failed after {time.time() - self.started:.0f} s: {type(exc).__name__}: "
                f"{message_of(exc)}",
                "",
                "".join(traceback.format_exception(exc)),
            ]
            with contextlib.suppress(OSError):
                atomic_write(self.out / "run.log", "\n".join(lines))
            raise
        for item in sorted(self.work.iterdir()):
            target = self.out / item.name
            if item.is_dir():
                os.chmod(item, default_mode(directory=True))
                if target.exists():
                    shutil.rmtree(target)
            os.replace(item, target)
        self.work.rmdir()
        with contextlib.suppress(OSError):
            (self.out / "run.log").unlink()
