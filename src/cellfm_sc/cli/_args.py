"""Argument types (argparse turns their ``ArgumentTypeError`` into a usage error) and the
option groups several commands share."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from cellfm_sc._constants import EMBEDDING_INITS, LR_SCHEDULES, PRECISIONS, PRESET_NAMES


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


def auto_fraction_type(text: str) -> float | str:
    """``auto`` or a number in [0, 1]."""
    if str(text).strip() == "auto":
        return "auto"
    return fraction_type(text)


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


#: the options several commands share, as ``add_argument`` keywords where the commands agree
#: (a command adds its own help and default where they differ; :func:`add_shared`)
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "--checkpoint": {"metavar": "CKPT"},
    "--vocabulary": {"metavar": "CSV"},
    "--num-heads": {"metavar": "N", "type": positive_int},
    "--preset": {"choices": PRESET_NAMES},
    "--embedding-init": {"choices": EMBEDDING_INITS},
    "--max-tokens": {
        "metavar": "N",
        "type": positive_int,
        "default": 2048,
        "help": "expressed genes per cell fed to the model (sampled when a cell has more)",
    },
    "--epochs": {"metavar": "N", "type": positive_int},
    "--batch-size": {"metavar": "N", "type": positive_int, "help": "cells per batch"},
    "--lr": {"type": lr_type, "default": "auto"},
    "--lr-schedule": {"choices": LR_SCHEDULES, "default": "warmup_cosine"},
    "--weight-decay": {"metavar": "WD", "type": non_negative_float, "default": 1e-5},
    "--patience": {"metavar": "N", "type": non_negative_int, "default": 3},
    "--seed": {"metavar": "N", "type": int, "default": 0},
    "--resume": {
        "action": "store_true",
        "help": "continue from the newest checkpoint_epoch_*.pth in --output-dir",
    },
    "--num-workers": {"metavar": "N", "type": non_negative_int, "default": 0},
    "--keep-checkpoints": {
        "metavar": "N",
        "type": keep_checkpoints_type,
        "default": 1,
        "help": "per-epoch checkpoint_epoch_*.pth files kept in the output directory: the "
        "newest N (what --resume continues from) plus the best epoch's; -1 keeps every epoch's",
    },
}


def add_shared(group: Any, flag: str, **kwargs: Any) -> None:
    """Add ``flag`` to ``group`` as :data:`SHARED_OPTIONS` declares it, under the command's
    own keywords ``kwargs`` (its help, its default)."""
    group.add_argument(flag, **{**SHARED_OPTIONS[flag], **kwargs})


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
        help="Lightning strategy, e.g. ddp (default: Lightning's choice)",
    )
    hw.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="numeric precision (default: bf16-mixed on GPUs that support it, else 32)",
    )
    add_shared(hw, "--num-workers", help="data-loader worker processes")
    hw.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layer activations in the backward pass (much less GPU memory, "
        "e.g. for the 800M preset)",
    )


class Command(NamedTuple):
    """A subcommand: its name, one-line help and description, ``add_options(parser)`` that
    declares its arguments, and ``run(args, console)`` that runs it."""

    name: str
    help: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], int]


def add_command(sub: Any, command: Command) -> argparse.ArgumentParser:
    """The parser of ``command``: its arguments, then the output and diagnostics group every
    command has."""
    p = sub.add_parser(command.name, help=command.help, description=command.description)
    command.add_options(p)
    group = p.add_argument_group("output and diagnostics")
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
    p.set_defaults(handler=command.run)
    return p
