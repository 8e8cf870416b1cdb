"""What the reader and the writer share: the tensor types, the trailer, the error."""

from __future__ import annotations

import os

import numpy as np

#: tensor_type string -> little-endian numpy dtype (BFloat16 and "str" are handled apart).
TYPE_TO_DTYPE: dict[str, np.dtype] = {
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
BF16 = "BFloat16"
STR = "str"

#: numpy dtype (native-order-insensitive key: kind + itemsize) -> tensor_type written (the
#: inverse of :data:`TYPE_TO_DTYPE`, in today's spelling).
DTYPE_TO_TYPE: dict[tuple[str, int], str] = {
    (d.kind, d.itemsize): t for t, d in TYPE_TO_DTYPE.items() if not t.startswith("Uint")
}

CRC_MAGIC = b"crc_num"
CRC_TRAILER_LEN = len(CRC_MAGIC) + 10
#: MindSpore's encrypted checkpoints are written as blocks that start with this int32.
ENC_MAGIC = 0x7F3A5ED8
#: MindSpore slices tensors larger than this (SLICE_SIZE = 512 * 1024 KB) into several records.
DEFAULT_SLICE_BYTES = 512 * 1024 * 1024
#: bytes copied (or checksummed) before the mapped pages are handed back to the kernel.


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
