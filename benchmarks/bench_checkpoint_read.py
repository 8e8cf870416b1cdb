"""Benchmark: read speed and peak memory of :func:`cellfm_sc.io.read_mindspore_checkpoint`.

Writes an 80M-CellFM-shaped checkpoint (35 float32 tensors, ~343 MB: ``gene_emb``
(27856, 1536), two retention layers of 1536 x 1536 projections, value encoder, decoders)
with our writer into a temporary directory, then reads it in fresh subprocesses and reports

* read speed in MB/s (file bytes / wall time of the call),
* peak RSS above the child's baseline (``/proc/self/status`` VmHWM after the read minus
  VmRSS before it, with the high-water mark reset through ``/proc/self/clear_refs``;
  ``ru_maxrss`` delta where that is unavailable), as MB and as a multiple of the file size.

Each configuration runs twice: "warm" (the file is in the page cache, as right after
writing it) and "cold" (the file's pages dropped from the cache first with
``posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no privileges). Run::

    python benchmarks/bench_checkpoint_read.py [--repeats 3] [--crc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellfm_sc.io import write_mindspore_checkpoint

D = 1536
N_LAYERS = 2
GENE_ROWS = 27856

_CHILD = r"""
import json, os, resource, sys, time
from cellfm_sc.io import read_mindspore_checkpoint

path, cold = sys.argv[1], sys.argv[2] == "1"

def status(key):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

if cold and hasattr(os, "posix_fadvise"):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

method = "VmHWM-VmRSS"
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the VmHWM high-water mark to the current RSS
except OSError:
    method = "ru_maxrss"
base_rss = status("VmRSS:")
base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
out = read_mindspore_checkpoint(path)
dt = time.perf_counter() - t0
if method == "VmHWM-VmRSS" and base_rss is not None:
    peak = status("VmHWM:") - base_rss
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_max
print(json.dumps({
    "seconds": dt,
    "peak_bytes": peak,
    "n_tensors": len(out),
    "array_bytes": sum(a.nbytes for a in out.values()),
    "method": method,
}))
"""


def cellfm_80m_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of CellFM 80M (variant A, no add_zero), in checkpoint order."""
    shapes: dict[str, tuple[int, ...]] = {
        "gene_emb": (GENE_ROWS, D),
        "cls_token": (1, 1, D),
        "zero_emb": (1, 1, D),
        "value_enc.mask_emb": (1, 1, D),
        "value_enc.value_enc.a": (1, 1),
        "value_enc.value_enc.w1.weight": (256, 1),
        "value_enc.value_enc.w3.weight": (256, 256),
        "value_enc.value_enc.table.weight": (D, 256),
    }
    for i in range(N_LAYERS):
        for proj in ("q", "k", "v", "u", "o"):
            shapes[f"encoder.{i}.attn.{proj}_proj.weight"] = (D, D)
        for proj in ("u", "v", "o"):
            shapes[f"encoder.{i}.ffn.{proj}_proj.weight"] = (D, D)
        for norm in ("post_norm1", "post_norm2"):
            shapes[f"encoder.{i}.{norm}.gamma"] = (D,)
            shapes[f"encoder.{i}.{norm}.beta"] = (D,)
    shapes["value_dec.w1.weight"] = (D, D)
    shapes["value_dec.w2.weight"] = (1, D)
    shapes["cellwise_dec.map.weight"] = (D, D)
    return shapes


def write_checkpoint(path: Path, *, crc: bool) -> float:
    """Write random float32 tensors of the 80M shapes; return seconds taken."""
    rng = np.random.default_rng(0)
    tensors = {
        name: rng.standard_normal(shape, dtype=np.float32)
        for name, shape in cellfm_80m_shapes().items()
    }
    t0 = time.perf_counter()
    write_mindspore_checkpoint(path, tensors, crc=crc)
    return time.perf_counter() - t0


def read_in_child(path: Path, *, cold: bool) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), "1" if cold else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="reads per configuration")
    parser.add_argument("--crc", action="store_true", help="write and verify a crc trailer")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cellfm80m_like.ckpt"
        wt = write_checkpoint(path, crc=args.crc)
        size = path.stat().st_size
        mb = size / 1e6
        print(f"file: {mb:.1f} MB ({len(cellfm_80m_shapes())} float32 tensors, crc={args.crc})")
        print(f"write: {wt:.2f} s = {mb / wt:.0f} MB/s")
        print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}")
        for cold in (False, True):
            label = "cold" if cold else "warm"
            for r in range(args.repeats):
                res = read_in_child(path, cold=cold)
                assert res["array_bytes"] >= 0.99 * size
                print(
                    f"read {label} #{r + 1}: {res['seconds']:.3f} s = "
                    f"{mb / res['seconds']:.0f} MB/s; peak RSS above baseline "
                    f"{res['peak_bytes'] / 1e6:.1f} MB = {res['peak_bytes'] / size:.3f} x file "
                    f"[{res['method']}]"
                )


if __name__ == "__main__":
    main()
