"""Read and write MindSpore ``.ckpt`` files without MindSpore or protobuf.

A MindSpore checkpoint is a stream of protobuf records (proto2 wire format)::

    message Checkpoint  { repeated Value value = 1; }
    message Value       { string tag = 1; TensorProto tensor = 2; }
    message TensorProto { repeated int64 dims = 1; string tensor_type = 2;
                          bytes tensor_content = 3; }

so the file is a sequence of ``0x0a <varint length> <Value>`` records, one per tensor
(or several consecutive records with the same tag when MindSpore sliced a large tensor:
every slice repeats the full ``dims`` and carries the next piece of ``tensor_content``).
``tensor_content`` is the raw little-endian, C-order data. ``dims`` is written unpacked
(one ``0x08 <varint>`` per dimension); a scalar has no ``dims`` at all. A file saved with
``crc_check=True`` ends with a 17-byte trailer ``b"crc_num"`` + the CRC32 of all preceding
bytes as a 10-byte big-endian unsigned integer.

The parser here is hand-written (the format needs four field numbers and two wire types),
memory-maps the file and copies every tensor once into a freshly allocated array, giving
the already copied pages of the mapping back to the kernel as it goes, so peak memory
stays close to one copy of the file.
"""

from __future__ import annotations

import mmap
import os
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellfm_sc._atomic import atomic_path

__all__ = ["CheckpointError", "read_mindspore_checkpoint", "write_mindspore_checkpoint"]

#: tensor_type string -> little-endian numpy dtype (BFloat16 and "str" are handled apart).
_TYPE_TO_DTYPE: dict[str, np.dtype] = {
    "Float16": np.dtype("<f2"),
    "Float32": np.dtype("<f4"),
    "Float64": np.dtype("<f8"),
    "Int8": np.dtype("i1"),
    "Int16": np.dtype("<i2"),
    "Int32": np.dtype("<i4"),
    "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"),
    "UInt16": np.dtype("<u2"),
    "UInt32": np.dtype("<u4"),
    "UInt64": np.dtype("<u8"),
    # spelling used by older MindSpore releases
    "Uint8": np.dtype("u1"),
    "Uint16": np.dtype("<u2"),
    "Uint32": np.dtype("<u4"),
    "Uint64": np.dtype("<u8"),
    "Bool": np.dtype("?"),
}
_BF16 = "BFloat16"
_STR = "str"

#: numpy dtype (native-order-insensitive key: kind + itemsize) -> tensor_type written.
_DTYPE_TO_TYPE: dict[tuple[str, int], str] = {
    ("f", 2): "Float16",
    ("f", 4): "Float32",
    ("f", 8): "Float64",
    ("i", 1): "Int8",
    ("i", 2): "Int16",
    ("i", 4): "Int32",
    ("i", 8): "Int64",
    ("u", 1): "UInt8",
    ("u", 2): "UInt16",
    ("u", 4): "UInt32",
    ("u", 8): "UInt64",
    ("b", 1): "Bool",
}

_CRC_MAGIC = b"crc_num"
_CRC_TRAILER_LEN = len(_CRC_MAGIC) + 10
#: MindSpore's encrypted checkpoints are written as blocks that start with this int32.
_ENC_MAGIC = 0x7F3A5ED8
#: MindSpore slices tensors larger than this (SLICE_SIZE = 512 * 1024 KB) into several records.
DEFAULT_SLICE_BYTES = 512 * 1024 * 1024
#: bytes copied (or checksummed) before the mapped pages are handed back to the kernel.
_STEP = 4 * 1024 * 1024
_PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A file that is not a readable MindSpore checkpoint.

    Raised for empty, truncated, corrupted (CRC mismatch, malformed protobuf, tensor data
    whose length disagrees with its shape, unknown tensor type), encrypted or foreign files.
    The message names the problem, the byte offset where it was found and the path.

    Also raised for a readable file whose content is unusable: a weight holding NaN/inf or
    an implausibly large value (see ``max_abs`` of the loaders), a torch file that cannot be
    unpickled with ``weights_only=True``.

    Parameters
    ----------
    problem
        What is wrong, as a sentence fragment.
    path
        The file concerned (``None`` for an in-memory state).
    offset
        Byte offset in the file where the problem was found, if it has one.
    """

    def __init__(
        self,
        problem: str,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ):
        self.problem = problem
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        where = f" at byte offset {offset}" if offset is not None else ""
        head = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{head}{problem}{where}.")


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


@dataclass
class _Record:
    """One ``Checkpoint.value`` record: where its tensor bytes are, and what they are."""

    offset: int  # first byte of the record (its 0x0a key)
    tag: str
    dims: list[int]
    tensor_type: str
    content_offset: int
    content_length: int


class _Parser:
    """Protobuf wire-format reading over a buffer, with errors that carry offsets."""

    def __init__(self, buf: Any, path: str | os.PathLike[str]):
        self.buf = buf
        self.path = path

    def error(self, problem: str, offset: int | None) -> CheckpointError:
        return CheckpointError(problem, self.path, offset)

    def varint(self, pos: int, end: int, what: str) -> tuple[int, int]:
        """Decode a base-128 varint at ``pos``; return ``(value, next_pos)``."""
        start = pos
        result = 0
        shift = 0
        buf = self.buf
        while True:
            if pos >= end:
                raise self.error(f"truncated data: the varint ({what}) runs past its end", start)
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift >= 70:
                raise self.error(f"bad varint ({what}): longer than 10 bytes", start)

    def fields(self, start: int, end: int, what: str) -> Iterator[tuple[int, int, int, int, int]]:
        """Iterate the fields of a message occupying ``[start, end)``.

        Yields ``(field_number, wire_type, value, length, field_offset)``: ``value`` is the
        integer for wire type 0 and the payload offset for wire types 1, 2 and 5; ``length``
        is the payload length (0 for wire type 0).
        """
        pos = start
        while pos < end:
            field_offset = pos
            key, pos = self.varint(pos, end, f"field key in {what}")
            field, wire = key >> 3, key & 7
            if field == 0:
                raise self.error(f"corrupted data: field number 0 in {what}", field_offset)
            length = 0
            if wire == 0:
                value, pos = self.varint(pos, end, f"field {field} of {what}")
            elif wire == 2:
                length, payload = self.varint(pos, end, f"length of field {field} of {what}")
                if payload + length > end:
                    raise self.error(
                        f"truncated data: field {field} of {what} declares {length} bytes "
                        f"but only {end - payload} remain",
                        field_offset,
                    )
                value, pos = payload, payload + length
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                if pos + size > end:
                    raise self.error(
                        f"truncated data: fixed-size field {field} of {what} runs past its end",
                        field_offset,
                    )
                value, length, pos = pos, size, pos + size
            else:
                raise self.error(
                    f"corrupted data: unknown or unsupported protobuf wire type {wire} "
                    f"(field {field}) in {what}",
                    field_offset,
                )
            yield field, wire, value, length, field_offset

    def text(self, offset: int, length: int, what: str) -> str:
        try:
            return bytes(self.buf[offset : offset + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"corrupted data: {what} is not valid UTF-8", offset) from None

    def record(self, start: int, end: int, record_offset: int) -> _Record:
        """Parse one ``Checkpoint.Value`` message occupying ``[start, end)``."""
        tag: str | None = None
        tensor: tuple[int, int] | None = None
        for field, wire, value, length, foff in self.fields(start, end, "a Checkpoint.Value"):
            if field in (1, 2) and wire != 2:
                raise self.error(
                    f"corrupted data: Checkpoint.Value field {field} has wire type {wire}, "
                    "expected 2 (length-delimited)",
                    foff,
                )
            if field == 1:
                tag = self.text(value, length, "a parameter name")
            elif field == 2:
                tensor = (value, length)
            elif field == 3:
                raise self.error(
                    "unsupported entry: a MapTensor record (Checkpoint.Value field 3)", foff
                )
            # other fields: unknown to this reader, skipped as protobuf allows
        if tag is None:
            raise self.error("corrupted data: a Checkpoint.Value record has no tag", record_offset)
        if tensor is None:
            raise self.error(f"corrupted data: the record for {tag!r} has no tensor", record_offset)
        dims: list[int] = []
        tensor_type: str | None = None
        content = (tensor[0], 0)  # absent tensor_content = empty bytes
        t_start, t_end = tensor[0], tensor[0] + tensor[1]
        fields = self.fields(t_start, t_end, f"the tensor of {tag!r}")
        for field, wire, value, length, foff in fields:
            if field == 1 and wire == 0:
                dims.append(value)
            elif field == 1 and wire == 2:  # packed dims
                pos, pend = value, value + length
                while pos < pend:
                    dim, pos = self.varint(pos, pend, f"packed dims of {tag!r}")
                    dims.append(dim)
            elif field in (2, 3) and wire == 2:
                if field == 2:
                    tensor_type = self.text(value, length, f"the tensor_type of {tag!r}")
                else:
                    content = (value, length)
            elif field in (1, 2, 3):
                raise self.error(
                    f"corrupted data: TensorProto field {field} of {tag!r} has wire type {wire}",
                    foff,
                )
        for i, dim in enumerate(dims):
            if dim >= 1 << 63:  # int64 two's complement
                raise self.error(
                    f"corrupted data: dimension {i} of {tag!r} is negative ({dim - (1 << 64)})",
                    t_start,
                )
        if tensor_type is None:
            raise self.error(f"corrupted data: the tensor of {tag!r} has no tensor_type", t_start)
        return _Record(record_offset, tag, dims, tensor_type, content[0], content[1])


def _describe_foreign(head: bytes) -> str:
    """A guess at what a file that is not a checkpoint is, from its first bytes."""
    if len(head) >= 4 and _ENC_MAGIC in (
        int.from_bytes(head[:4], "little"),
        int.from_bytes(head[:4], "big"),
    ):
        return "the file is encrypted (MindSpore enc_key); decrypt it with MindSpore first"
    if head.startswith(b"PK\x03\x04"):
        return "the file is a zip archive (for example a PyTorch .pt/.pth file), not a checkpoint"
    if head[:1] == b"\x80":
        return "the file looks like a Python pickle, not a MindSpore checkpoint"
    if head.startswith(b"\x89HDF"):
        return "the file is HDF5, not a MindSpore checkpoint"
    return (
        f"not a MindSpore checkpoint: the first byte is 0x{head[0]:02x}, not 0x0a (the start of "
        "a Checkpoint.value record); the file may be encrypted, compressed or of another format"
    )


def _release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Hand mapped pages covering ``[offset, offset + length)`` back to the kernel.

    The mapping is read-only and file-backed, so this only drops the pages from this
    process (they are re-read from the page cache if touched again); it keeps the resident
    set from growing to file size + copies.
    """
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = (offset // _PAGE) * _PAGE
    stop = offset + length
    if stop > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):  # pragma: no cover - platform dependent
            pass


def _copy_into(
    mm: mmap.mmap, view: memoryview, dst: memoryview, dst_offset: int, src: int, n: int
) -> None:
    """Copy ``n`` bytes from the mapping at ``src`` into ``dst`` at ``dst_offset``."""
    done = 0
    while done < n:
        k = min(_STEP, n - done)
        dst[dst_offset + done : dst_offset + done + k] = view[src + done : src + done + k]
        _release(mm, src + done, k)
        done += k


def _check_crc(mm: mmap.mmap, view: memoryview, size: int, parser: _Parser) -> int:
    """Verify and strip a ``crc_num`` trailer; return where the protobuf stream ends."""
    if size < _CRC_TRAILER_LEN or view[size - _CRC_TRAILER_LEN : size - 10] != _CRC_MAGIC:
        return size
    data_end = size - _CRC_TRAILER_LEN
    stored = int.from_bytes(view[size - 10 : size], "big")
    if stored >= 1 << 32:
        raise parser.error("corrupted CRC trailer: the stored value does not fit a CRC32", data_end)
    crc = 0
    for off in range(0, data_end, _STEP):
        k = min(_STEP, data_end - off)
        crc = zlib.crc32(view[off : off + k], crc)
        _release(mm, off, k)
    if crc != stored:
        raise parser.error(
            f"CRC mismatch, the file is corrupted: the trailer stores CRC32 {stored:#010x} "
            f"but the preceding {data_end} bytes have {crc:#010x}; the trailer is",
            data_end,
        )
    return data_end


def _parse_stream(parser: _Parser, end: int) -> list[_Record]:
    """Parse every top-level ``Checkpoint.value`` record in ``[0, end)``."""
    buf = parser.buf
    records: list[_Record] = []
    pos = 0
    while pos < end:
        rec_offset = pos
        if buf[pos] != 0x0A:
            if bytes(buf[pos : pos + len(_CRC_MAGIC)]) == _CRC_MAGIC:
                raise parser.error(
                    "truncated or malformed CRC trailer: b'crc_num' must be followed by "
                    f"exactly 10 bytes, found {end - pos - len(_CRC_MAGIC)}",
                    pos,
                )
            if pos == 0:
                raise parser.error(_describe_foreign(bytes(buf[:8])), 0)
            raise parser.error(
                f"corrupted data: expected a Checkpoint.value record (byte 0x0a), "
                f"found 0x{buf[pos]:02x}",
                pos,
            )
        length, body = parser.varint(pos + 1, end, "record length")
        if body + length > end:
            raise parser.error(
                f"truncated file: the record declares {length} bytes but only {end - body} remain",
                rec_offset,
            )
        records.append(parser.record(body, body + length, rec_offset))
        pos = body + length
    return records


def _group(records: list[_Record], parser: _Parser) -> list[list[_Record]]:
    """Join consecutive records with the same tag (slices of one tensor)."""
    groups: list[list[_Record]] = []
    seen: set[str] = set()
    for rec in records:
        if groups and groups[-1][0].tag == rec.tag:
            first = groups[-1][0]
            if rec.dims != first.dims or rec.tensor_type != first.tensor_type:
                raise parser.error(
                    f"corrupted data: slice of {rec.tag!r} has dims {rec.dims} / type "
                    f"{rec.tensor_type!r} but its first slice has {first.dims} / "
                    f"{first.tensor_type!r}",
                    rec.offset,
                )
            groups[-1].append(rec)
            continue
        if rec.tag in seen:
            raise parser.error(
                f"corrupted data: parameter {rec.tag!r} appears twice (not as consecutive slices)",
                rec.offset,
            )
        seen.add(rec.tag)
        groups.append([rec])
    return groups


def _materialise(
    group: list[_Record], mm: mmap.mmap, view: memoryview, parser: _Parser
) -> np.ndarray:
    """Copy one (possibly sliced) tensor out of the mapping into an owned array."""
    first = group[0]
    tag, ttype = first.tag, first.tensor_type
    total = sum(r.content_length for r in group)
    if ttype == _STR:
        raw = b"".join(
            bytes(view[r.content_offset : r.content_offset + r.content_length]) for r in group
        )
        return np.array(_utf8(raw, tag, parser, first.offset))
    if ttype == _BF16:
        dtype = np.dtype("<u2")
    elif ttype in _TYPE_TO_DTYPE:
        dtype = _TYPE_TO_DTYPE[ttype]
    else:
        raise parser.error(f"unknown tensor type {ttype!r} for {tag!r}", first.offset)
    shape = tuple(first.dims)
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if shape == (0,) and total == dtype.itemsize:
        shape, expected = (), dtype.itemsize  # legacy MindSpore scalar written as dims [0]
    if total != expected:
        raise parser.error(
            f"corrupted data: {tag!r} has {total} bytes of tensor_content but shape "
            f"{shape} of {ttype} needs {expected}",
            first.offset,
        )
    out = np.empty(shape, dtype=dtype)
    if expected:
        dst = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        for rec in group:
            _copy_into(mm, view, dst, filled, rec.content_offset, rec.content_length)
            filled += rec.content_length
        dst.release()
    if ttype == "Bool":  # any non-zero byte is True; keep numpy bools 0/1
        as_bytes = out.view(np.uint8)
        np.minimum(as_bytes, 1, out=as_bytes)
    if ttype == _BF16:
        wide = out.astype("<u4")
        del out
        wide <<= 16
        return wide.view("<f4")
    return out


def _utf8(raw: bytes, tag: str, parser: _Parser, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise parser.error(
            f"corrupted data: the string value of {tag!r} is not UTF-8", offset
        ) from None


def read_mindspore_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a MindSpore ``.ckpt`` file into numpy arrays, without MindSpore.

    Parameters
    ----------
    path
        The checkpoint file (as written by ``mindspore.save_checkpoint`` or
        :func:`write_mindspore_checkpoint`), with or without a ``crc_num`` trailer.

    Returns
    -------
    dict[str, numpy.ndarray]
        Parameter name -> array, in file order. Every array owns its (writable) memory.
        dtypes map as ``Float16/32/64 -> float16/32/64``, ``Int8..Int64 -> int8..int64``,
        ``UInt8..UInt64`` (also spelled ``Uint8..``) ``-> uint8..uint64``, ``Bool -> bool``;
        ``BFloat16`` is returned as **float32** (exact, numpy has no bfloat16). A tensor with
        no ``dims`` is a 0-d array; ``dims == [0]`` with one element of data (an older
        MindSpore scalar convention) is read as 0-d too. A ``"str"`` entry (a string in
        MindSpore's ``append_dict``) is returned as a 0-d numpy unicode array; use
        ``str(arr)`` or ``arr.item()`` for the Python string.

    Raises
    ------
    CheckpointError
        If the file is empty, truncated, corrupted (CRC mismatch, malformed protobuf, data
        length not matching the shape, unknown tensor type), encrypted or not a checkpoint.
        The message says which problem, at which byte offset, in which file.
    FileNotFoundError, PermissionError
        If the file cannot be opened.

    Notes
    -----
    The file is memory-mapped; each tensor is copied once into a new array and the mapped
    pages already copied are released, so peak memory is about one copy of the file.
    Slices of one tensor (consecutive records with the same tag) are concatenated.
    A ``crc_num`` trailer is verified before any tensor is decoded.

    Examples
    --------
    >>> params = read_mindspore_checkpoint("CellFM_80M_weight.ckpt")  # doctest: +SKIP
    >>> params["gene_emb"].shape  # doctest: +SKIP
    (27856, 1536)
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise CheckpointError("empty file: a checkpoint holds at least one record", path, 0)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            parser = _Parser(view, path)
            end = _check_crc(mm, view, size, parser)
            if end == 0:
                raise CheckpointError(
                    "empty checkpoint: no records before the CRC trailer", path, 0
                )
            groups = _group(_parse_stream(parser, end), parser)
            out = {group[0].tag: _materialise(group, mm, view, parser) for group in groups}
        finally:
            view.release()
    finally:
        mm.close()
    return out


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


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
            return _BF16, tuple(t.shape), bits.reshape(-1).view(np.uint8)
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
        return _STR, (), data
    if isinstance(value, bool):
        arr = np.asarray(value, dtype=np.bool_)
    elif isinstance(value, int):
        arr = np.asarray(value, dtype=np.int64)
    elif isinstance(value, float):
        arr = np.asarray(value, dtype=np.float64)
    else:
        arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        ttype = _BF16
        arr = arr.view("<u2")
    else:
        ttype = _DTYPE_TO_TYPE.get((arr.dtype.kind, arr.dtype.itemsize), "")
        if not ttype:
            raise TypeError(
                f"{name!r}: dtype {arr.dtype} has no MindSpore checkpoint type "
                f"(supported: {sorted(set(_DTYPE_TO_TYPE.values()) | {_BF16, _STR})})"
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
            fh.write(_CRC_MAGIC + out.crc.to_bytes(10, "big"))
        fh.flush()
        os.fsync(fh.fileno())
