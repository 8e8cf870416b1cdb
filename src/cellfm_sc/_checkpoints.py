"""The per-epoch checkpoint files' names (``checkpoint_epoch_{n}.pth``, as the original
scripts'): one home for the training core, which writes and prunes them, and the command
line, which finds the newest for ``--resume``. Imports nothing heavy."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["epoch_checkpoint_name", "epoch_checkpoints"]

_NAME = re.compile(r"checkpoint_epoch_(\d+)\.pth")


def epoch_checkpoint_name(epoch: int) -> str:
    """``checkpoint_epoch_{epoch}.pth`` (epochs count from 1).

    Examples
    --------
    >>> epoch_checkpoint_name(3)
    'checkpoint_epoch_3.pth'
    """
    return f"checkpoint_epoch_{int(epoch)}.pth"


def epoch_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``[(n, path)]`` of the ``checkpoint_epoch_{n}.pth`` files in ``folder``, by epoch."""
    found = []
    for path in Path(folder).glob("checkpoint_epoch_*.pth"):
        m = _NAME.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)
