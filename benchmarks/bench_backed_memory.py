"""Peak RSS of one training epoch over synthetic backed ``.h5ad`` files of 50k and 200k cells.

Run: ``python benchmarks/bench_backed_memory.py [--cells 50000 200000] [--nnz 1000]``.

Each file (36,601 genes, about ``--nnz`` expressed genes per cell, float32 counts, CSR) is
written chunk by chunk with h5py in a temporary directory; then a fresh subprocess opens it
backed and runs one shuffled training epoch through ``make_dataloader`` (count check, empty-cell
check from ``indptr``, chunked shuffle, row reads, tokenisation, batch 32, ``max_tokens`` 2048),
and reports its peak RSS (``VmHWM`` from ``/proc/self/status``; Linux only) and the RSS after imports, before the data path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_GENES = 36_601


def write_h5ad(path: Path, n_cells: int, nnz: int, seed: int = 0, chunk: int = 2000) -> None:
    """Write an AnnData-readable ``.h5ad`` with a CSR ``X`` without holding it in memory."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        ad.io.write_elem(f, "obs", pd.DataFrame(index=[f"cell{i:07d}" for i in range(n_cells)]))
        ad.io.write_elem(f, "var", pd.DataFrame(index=[f"gene{j:05d}" for j in range(N_GENES)]))
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, N_GENES])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=(1 << 16,))
        indices = g.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=(1 << 16,)
        )
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        total = 0
        for start in range(0, n_cells, chunk):
            b = min(chunk, n_cells - start)
            k = int(nnz * 1.1)
            pos = np.sort(rng.integers(0, N_GENES, size=(b, k)), axis=1)
            keep = np.ones_like(pos, dtype=bool)
            keep[:, 1:] = np.diff(pos, axis=1) != 0
            counts = keep.sum(1)
            idx = pos[keep].astype(np.int32)
            vals = (rng.geometric(0.5, size=idx.size)).astype(np.float32)
            data.resize((total + idx.size,))
            indices.resize((total + idx.size,))
            data[total:] = vals
            indices[total:] = idx
            indptr[start + 1 : start + b + 1] = total + np.cumsum(counts)
            total += idx.size
        g.create_dataset("indptr", data=indptr)
        for name in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            ad.io.write_elem(f, name, {})


def status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_epoch(path: str) -> None:
    """Child process: one training epoch over the backed file; prints a JSON line."""
    import anndata as ad
    import torch  # noqa: F401  (imported before the baseline so it is not counted as data path)

    from cellfm_sc.data import make_dataloader

    base = status_mb("VmRSS")
    t = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    dl = make_dataloader(adata, batch_size=32, train=True, shuffle=True, seed=0)
    dl.sampler.set_epoch(0)
    n_cells = n_tokens = 0
    for batch in dl:
        n_cells += len(batch)
        n_tokens += int(batch.n_tokens.sum())
    elapsed = time.perf_counter() - t
    # VmHWM (this process image's peak RSS); ru_maxrss would carry over the parent's RSS at
    # fork time across exec on Linux
    peak = status_mb("VmHWM")
    print(
        json.dumps(
            {
                "cells": n_cells,
                "tokens_per_cell": n_tokens / n_cells,
                "seconds": elapsed,
                "rss_after_imports_mb": base,
                "peak_rss_mb": peak,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--nnz", type=int, default=1000, help="expressed genes per cell (about)")
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        run_epoch(args.run)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cells:
            path = Path(tmp) / f"synthetic_{n}.h5ad"
            t = time.perf_counter()
            write_h5ad(path, n, args.nnz)
            size = path.stat().st_size / 2**20
            print(
                f"wrote {n} cells ({size:.0f} MiB) in {time.perf_counter() - t:.0f} s", flush=True
            )
            out = subprocess.run(
                [sys.executable, __file__, "--run", str(path)],
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{n} cells: one epoch {res['seconds']:.0f} s "
                f"({res['cells'] / res['seconds']:,.0f} cells/s, {res['tokens_per_cell']:.0f} tokens/cell), "
                f"peak RSS {res['peak_rss_mb']:.0f} MiB (after imports {res['rss_after_imports_mb']:.0f} MiB)",
                flush=True,
            )
            path.unlink()


if __name__ == "__main__":
    main()
