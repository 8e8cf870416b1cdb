"""Sanity check of loaded weights: no NaN/inf, no implausibly large value.

One home for the check that every loader in :mod:`cellfm_sc.io` runs on the tensors it
reads (MindSpore ``.ckpt`` model entries, our own torch files). A flipped byte in a weight
file, or a file that is not a weight file at all, typically shows up as values like
``8e37`` or NaN; without this check they would only surface as NaN losses later.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from cellfm_sc.io.checkpoint import CheckpointError

__all__ = ["DEFAULT_MAX_ABS", "check_values"]

#: Default bound on ``|value|`` of a loaded weight. Trained CellFM weights are O(1); Adam
#: moments and LayerNorm parameters stay far below this.
DEFAULT_MAX_ABS = 1e6


def _checked(value: Any) -> bool:
    """Whether ``value`` is a non-empty floating array/tensor (the only kind checked)."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f" and value.size > 0
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.numel() > 0
    return False


def _to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """numpy view (a copy for half/bfloat16 or device tensors), for the error message only."""
    if isinstance(value, np.ndarray):
        return value
    t = value.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def check_values(
    name: str,
    value: Any,
    *,
    max_abs: float | None = DEFAULT_MAX_ABS,
    path: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse a floating array/tensor holding NaN/inf or a value with ``|value| > max_abs``.

    Cost: two reductions (``min`` and ``max``) over the data, no temporary array; the
    offending position is only searched for when the check fails. Non-floating values
    (integer counters, strings) are not checked.

    Parameters
    ----------
    name
        The name to report (the tensor's name in the file).
    value
        numpy array or torch tensor, any shape.
    max_abs
        Bound on ``|value|``; ``None`` checks finiteness only.
    path
        The file it came from, for the message.

    Raises
    ------
    CheckpointError
        Naming the tensor, the offending value and its index.
    """
    if max_abs is not None and not max_abs > 0:
        raise ValueError(f"max_abs must be positive or None, got {max_abs!r}")
    if not _checked(value):
        return
    lo, hi = float(value.min()), float(value.max())
    if math.isfinite(lo) and math.isfinite(hi):
        if max_abs is None or max(-lo, hi) <= max_abs:
            return
        arr = _to_numpy(value)
        flat = int(np.argmax(arr) if hi >= -lo else np.argmin(arr))
        where = np.unravel_index(flat, arr.shape) if arr.ndim else ()
        bad = hi if hi >= -lo else lo
        raise CheckpointError(
            f"{name} holds {bad:.3g} (|value| > max_abs={max_abs:g}) at index "
            f"{tuple(int(i) for i in where)}; the file is corrupt or not a weight file; "
            "pass max_abs=... (or None) to allow larger values",
            path,
        )
    arr = _to_numpy(value)
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    flat = int(np.argmin(finite.reshape(-1)))
    where = np.unravel_index(flat, arr.shape) if arr.ndim else ()
    raise CheckpointError(
        f"{name} holds {n_bad} non-finite value(s) (first: {arr.reshape(-1)[flat]} at index "
        f"{tuple(int(i) for i in where)}); the file is corrupt or not a weight file",
        path,
    )
