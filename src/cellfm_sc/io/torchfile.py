"""Loading our own torch files (``model.pt``, ``best_model.pth``, ``checkpoint_epoch_N.pth``).

One home for ``torch.load`` of the files this package writes: always
``map_location="cpu", weights_only=True`` (never arbitrary unpickling),
every failure turned into one :class:`~cellfm_sc.io.CheckpointError` line that names the
file and what is wrong, and every floating tensor in the result checked for NaN/inf and
implausible magnitudes.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellfm_sc.io._values import DEFAULT_MAX_ABS, check_values
from cellfm_sc.io.checkpoint import CheckpointError

__all__ = ["load_torch_file"]

_ZIP_MAGIC = b"PK\x03\x04"
_HEAD_BYTES = 64


def _describe_head(head: bytes) -> str | None:
    """What a file that torch cannot read probably is, from its first bytes (or None)."""
    if head.startswith(b"\x0a") and b"\x12" in head[:_HEAD_BYTES]:
        return (
            "it looks like a MindSpore .ckpt (protobuf records), not a torch file; MindSpore "
            "checkpoints are read with cellfm_sc.io.read_mindspore_checkpoint / checkpoint="
        )
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file (for example an .h5ad), not a torch file"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        first = text.splitlines()[0][:40] if text.strip() else text[:40]
        return f"it is a text file (it starts with {first!r}), not a torch file"
    return None


def _weights_only_reason(err: BaseException) -> str:
    """The useful part of torch's long weights_only refusal (the global it would import)."""
    msg = str(err)
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    detail = f" (it refers to {m.group(1)})" if m else ""
    return (
        f"it holds a pickle that needs arbitrary code to load{detail}, which weights_only=True "
        "refuses; only files holding tensors and plain Python containers/values are read"
    )


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every tensor/array in nested dicts/lists/tuples, with its key path (``a/b/0/c``)."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}/{i}" if path else str(i))


def load_torch_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    max_abs: float | None = DEFAULT_MAX_ABS,
) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    For the files this package writes: ``model.pt`` (:meth:`CellFMClassifier.save <cellfm_sc.model.CellFMClassifier.save>`),
    ``best_model.pth`` (a state dict) and Lightning's resumable ``checkpoint_epoch_N.pth``.

    Every floating tensor found in the result, recursively through dicts, lists and tuples
    (a state dict, Lightning's ``state_dict`` and ``optimizer_states``), must be finite and
    within ``max_abs``. 0-d tensors are not checked: they are counters and scores (Adam's
    ``step``, an early-stopping ``best_score`` that is ``inf`` before the first validation),
    not weights.

    Parameters
    ----------
    path
        The file.
    what
        What the file is meant to be, for messages (``"resume checkpoint"``,
        ``"saved model"``, ...).
    max_abs
        Bound on ``|value|`` of a weight (default ``1e6``); ``None`` checks finiteness only.

    Returns
    -------
    dict
        The loaded object (tensors on the CPU).

    Raises
    ------
    CheckpointError
        One line naming the file and the problem: empty file, truncated or corrupted file,
        a text (or other non-torch) file, a pickle that needs arbitrary code, a top level
        that is not a dict, or a tensor with NaN/inf or ``|value| > max_abs`` (named by its
        key path, e.g. ``state_dict/module.trunk.gene_emb``).
    FileNotFoundError, IsADirectoryError, PermissionError
        If the file cannot be opened.

    Examples
    --------
    >>> state = load_torch_file("run/checkpoint_epoch_3.pth", what="resume checkpoint")
    ... # doctest: +SKIP
    """
    path = Path(path)
    with open(path, "rb") as fh:  # OSError (missing file, directory, permission) as is
        head = fh.read(_HEAD_BYTES)
    if not head:
        raise CheckpointError(f"cannot read this {what}: the file is empty", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() and head.startswith((_ZIP_MAGIC, b"\x80")):
            reason = _weights_only_reason(err)
            raise CheckpointError(f"cannot read this {what}: {reason}", path) from None
        reason = _describe_head(head) or f"it is not a torch file (unpickling failed: {err})"
        raise CheckpointError(f"cannot read this {what}: {reason}", path) from None
    except Exception as err:  # torch.load fails in many ways on a damaged file
        reason = _describe_head(head) if not head.startswith(_ZIP_MAGIC) else None
        if reason is None:
            text = str(err).strip()
            first = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
            reason = (
                f"the file is truncated or corrupted (torch: {first[:160]})"
                if head.startswith((_ZIP_MAGIC, b"\x80"))
                else f"it is not a torch file ({type(err).__name__}: {first[:160]})"
            )
        raise CheckpointError(f"cannot read this {what}: {reason}", path) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"cannot use this {what}: it holds a {type(obj).__name__}, expected a dict "
            "(a state dict or a checkpoint)",
            path,
        )
    for key, tensor in _walk(obj, ""):
        if tensor.ndim > 0:
            check_values(key, tensor, max_abs=max_abs, path=path)
    return obj
