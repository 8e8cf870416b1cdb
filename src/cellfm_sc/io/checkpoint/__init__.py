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

The reader (``_reader``) is hand-written (the format needs four field numbers and two wire types),
memory-maps the file and copies every tensor once into a freshly allocated array, giving
the already copied pages of the mapping back to the kernel as it goes, so peak memory
stays close to one copy of the file.
"""

from cellfm_sc.io.checkpoint._format import DEFAULT_SLICE_BYTES, CheckpointError
from cellfm_sc.io.checkpoint._reader import read_mindspore_checkpoint
from cellfm_sc.io.checkpoint._writer import write_mindspore_checkpoint

__all__ = [
    "DEFAULT_SLICE_BYTES",
    "CheckpointError",
    "read_mindspore_checkpoint",
    "write_mindspore_checkpoint",
]
