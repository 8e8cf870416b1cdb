"""Reading a MindSpore ``.ckpt``: a memory-mapped, hand-written protobuf parser.

Every tensor is copied once into a freshly allocated array, and the copied pages of the
mapping are handed back to the kernel as it goes, so peak memory stays close to one copy of
the file. The format is described in :mod:`cellfm_sc.io.checkpoint`.
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellfm_sc.io.checkpoint._format import (
    BF16,
    CRC_MAGIC,
    CRC_TRAILER_LEN,
    ENC_MAGIC,
    STR,
    TYPE_TO_DTYPE,
    CheckpointError,
)

#: bytes copied (or checksummed) before the mapped pages are handed back to the kernel.
_STEP = 4 * 1024 * 1024
_PAGE = mmap.PAGESIZE


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
    if len(head) >= 4 and ENC_MAGIC in (
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
    if size < CRC_TRAILER_LEN or view[size - CRC_TRAILER_LEN : size - 10] != CRC_MAGIC:
        return size
    data_end = size - CRC_TRAILER_LEN
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
            if bytes(buf[pos : pos + len(CRC_MAGIC)]) == CRC_MAGIC:
                raise parser.error(
                    "truncated or malformed CRC trailer: b'crc_num' must be followed by "
                    f"exactly 10 bytes, found {end - pos - len(CRC_MAGIC)}",
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
    if ttype == STR:
        raw = b"".join(
            bytes(view[r.content_offset : r.content_offset + r.content_length]) for r in group
        )
        return np.array(_utf8(raw, tag, parser, first.offset))
    if ttype == BF16:
        dtype = np.dtype("<u2")
    elif ttype in TYPE_TO_DTYPE:
        dtype = TYPE_TO_DTYPE[ttype]
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
    if ttype == BF16:
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
