# ruff: noqa: RUF100  (keeps the commented-out mapping import below as written)
"""MindSpore checkpoint input/output without MindSpore.

:func:`read_mindspore_checkpoint` and :func:`write_mindspore_checkpoint` handle the ``.ckpt``
protobuf format (see :mod:`cellfm_sc.io.checkpoint`); :class:`CheckpointError` is raised for
files that cannot be read.
"""

from cellfm_sc.io.checkpoint import (
    CheckpointError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)

# from cellfm_sc.io.mapping import *  # noqa

__all__ = ["CheckpointError", "read_mindspore_checkpoint", "write_mindspore_checkpoint"]
