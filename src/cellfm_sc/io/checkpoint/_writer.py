"""Writing a MindSpore ``.ckpt`` (the encoding ``mindspore.save_checkpoint`` produces)."""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellfm_sc._atomic import atomic_path
from cellfm_sc.io.checkpoint._format import (
    BF16,
    CRC_MAGIC,
    DEFAULT_SLICE_BYTES,
    DTYPE_TO_TYPE,
    STR,
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _as_payload(name: str, value: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    """Convert one value to ``(tensor_type, shape, contiguous uint8 data)``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            bits = t.view(torch.int16).numpy().view("<u2")
            return BF16, tuple(t.shape), bits.reshape(-1).view(np.uint8)
        try:
            value = t.numpy()
        except TypeError as err:
            raise TypeError(f"{name!r}: torch dtype {t.dtype} cannot be written") from err
    if isinstance(value, str) or (
        isinstance(value, np.ndarray | np.generic) and np.asarray(value).dtype.kind == "U"
    ):
        arr = np.asarray(value)
        if arr.ndim != 0:
            raise TypeError(f"{name!r}: only scalar strings can be written, got shape {arr.shape}")
        data = np.frombuffer(str(arr.item()).encode("utf-8"), dtype=np.uint8)
        return STR, (), data
    if isinstance(value, bool):
        arr = np.asarray(value, dtype=np.bool_)
    elif isinstance(value, int):
        arr = np.asarray(value, dtype=np.int64)
    elif isinstance(value, float):
        arr = np.asarray(value, dtype=np.float64)
    else:
        arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        ttype = BF16
        arr = arr.view("<u2")
    else:
        ttype = DTYPE_TO_TYPE.get((arr.dtype.kind, arr.dtype.itemsize), "")
        if not ttype:
            raise TypeError(
                f"{name!r}: dtype {arr.dtype} has no MindSpore checkpoint type "
                f"(supported: {sorted(set(DTYPE_TO_TYPE.values()) | {BF16, STR})})"
            )
    shape = arr.shape  # before ascontiguousarray, which turns 0-d into 1-d
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    return ttype, shape, arr.reshape(-1).view(np.uint8)


class _CrcWriter:
    """File writer that keeps the running CRC32 of everything written."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.crc = 0

    def write(self, data: bytes | memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.fh.write(data)


def _write_records(
    out: _CrcWriter,
    tag: bytes,
    ttype: str,
    shape: tuple[int, ...],
    data: np.ndarray,
    slice_bytes: int,
) -> None:
    head_tensor = b"".join(b"\x08" + _varint(d) for d in shape)
    type_bytes = ttype.encode("ascii")
    head_tensor += b"\x12" + _varint(len(type_bytes)) + type_bytes
    nbytes = data.size
    starts = range(0, nbytes, slice_bytes) if nbytes > slice_bytes else [0]
    view = memoryview(data)
    for start in starts:
        chunk = view[start : min(nbytes, start + slice_bytes)] if nbytes > slice_bytes else view
        n = len(chunk)
        tensor_len = len(head_tensor) + 1 + len(_varint(n)) + n
        value_head = b"\x0a" + _varint(len(tag)) + tag + b"\x12" + _varint(tensor_len)
        value_len = len(value_head) + tensor_len
        out.write(b"\x0a" + _varint(value_len) + value_head + head_tensor + b"\x1a" + _varint(n))
        out.write(chunk)


def write_mindspore_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    *,
    crc: bool = False,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
) -> None:
    """Write arrays to a MindSpore ``.ckpt`` file that MindSpore can load.

    The encoding is the one ``mindspore.save_checkpoint`` (2.x) produces: one record per
    tensor in mapping order, unpacked ``dims`` (none for a scalar), then ``tensor_type``,
    then ``tensor_content``; float32 weights are reproduced byte for byte.

    Parameters
    ----------
    path
        Destination. Written atomically: a temporary file in the same directory is filled,
        flushed and then renamed over ``path``.
    tensors
        Parameter name -> value. Values may be numpy arrays (or numpy scalars), torch
        tensors (moved to CPU; ``torch.bfloat16`` is written as ``BFloat16``), Python
        ``bool`` (``Bool``), ``int`` (``Int64``), ``float`` (``Float64``) or ``str``
        (a ``"str"`` entry). numpy ``bfloat16`` from ``ml_dtypes`` is written as ``BFloat16``.
    crc
        Append the ``b"crc_num"`` + 10-byte big-endian CRC32 trailer that
        ``save_checkpoint(..., crc_check=True)`` writes.
    slice_bytes
        Tensors larger than this many bytes are written as consecutive records of at most
        ``slice_bytes`` bytes each (MindSpore's ``SLICE_SIZE``, 512 MiB by default).

    Raises
    ------
    TypeError
        If a name is not a string or a value has a dtype with no checkpoint type
        (complex, object, ...).
    ValueError
        If ``slice_bytes`` is not positive.
    """
    if slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes}")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        out = _CrcWriter(fh)
        for name, value in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be str, got {name!r}")
            ttype, shape, data = _as_payload(name, value)
            _write_records(out, name.encode("utf-8"), ttype, shape, data, slice_bytes)
        if crc:
            fh.write(CRC_MAGIC + out.crc.to_bytes(10, "big"))
        fh.flush()
        os.fsync(fh.fileno())
