"""MindSpore checkpoint input/output without MindSpore.

:func:`read_mindspore_checkpoint` and :func:`write_mindspore_checkpoint` handle the ``.ckpt``
protobuf format (see :mod:`cellfm_sc.io.checkpoint`); :class:`CheckpointError` is raised for
files that cannot be read. :mod:`cellfm_sc.io.mapping` maps MindSpore parameter names onto
the torch trunk and recognises the checkpoint variant.
"""

from cellfm_sc.io.checkpoint import (
    CheckpointError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)
from cellfm_sc.io.mapping import (
    LoadReport,
    detect_variant,
    infer_config,
    load_trunk_state,
    split_state,
    trunk_from_mindspore,
)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "detect_variant",
    "infer_config",
    "load_trunk_state",
    "read_mindspore_checkpoint",
    "split_state",
    "trunk_from_mindspore",
    "write_mindspore_checkpoint",
]
