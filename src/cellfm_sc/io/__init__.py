"""MindSpore checkpoint input/output without MindSpore.

:func:`read_mindspore_checkpoint` and :func:`write_mindspore_checkpoint` handle the ``.ckpt``
protobuf format (see ``cellfm_sc.io.checkpoint``); :class:`CheckpointError` is raised for
files that cannot be read or hold unusable values. ``cellfm_sc.io.mapping`` maps MindSpore
parameter names onto the torch trunk, recognises the checkpoint variant and infers the
trunk's config; ``cellfm_sc.io.trunk`` builds the trunk from a checkpoint
(:func:`trunk_from_mindspore`) and exports one as a variant-A checkpoint
(:func:`save_trunk_mindspore`).
:func:`load_torch_file` is the one place our own torch files (``model.pt``,
``best_model.pth``, ``checkpoint_epoch_N.pth``) are loaded.
"""

from cellfm_sc.io.checkpoint import (
    CheckpointError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)
from cellfm_sc.io.mapping import (
    LoadReport,
    check_state_values,
    detect_variant,
    infer_config,
    load_trunk_state,
    split_state,
)
from cellfm_sc.io.torchfile import load_torch_file
from cellfm_sc.io.trunk import save_trunk_mindspore, trunk_from_mindspore

__all__ = [
    "CheckpointError",
    "LoadReport",
    "check_state_values",
    "detect_variant",
    "infer_config",
    "load_torch_file",
    "load_trunk_state",
    "read_mindspore_checkpoint",
    "save_trunk_mindspore",
    "split_state",
    "trunk_from_mindspore",
    "write_mindspore_checkpoint",
]
