"""Full streaming count check on a large backed ``.h5ad``: seconds and peak RSS.

Run: ``python benchmarks/bench_count_check.py [--cells 200000] [--nnz 1400] [--keep PATH]``.

A synthetic SEA-AD-like file (36,601 genes, CSR float32; ``--nnz 1400`` draws give about 1,500
distinct expressed genes per cell) is written chunk by chunk with h5py
(``bench_backed_memory.write_h5ad``: never built in memory). A fresh subprocess then opens it
backed and runs ``check_counts(adata, full=True, forbid_empty=True)``: one pass over every
stored value (negative / NaN / inf / non-integer) and every cell (no counts). Reported: wall
time, values/s, and peak RSS (``VmHWM``) against the RSS after imports. The pass runs twice:
"warm" (the file just written, in the page cache) and "cold" (its pages dropped first with
``posix_fadvise(POSIX_FADV_DONTNEED)``). The sample check (the default set-up check) is timed
for comparison.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backed_memory import status_mb, write_h5ad  # the one synthetic writer


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(path: str, cold: bool) -> None:
    """Child process: full check (and the sample check); prints a JSON line."""
    import anndata as ad
    import torch  # noqa: F401  (imported before the baseline, as the data path's users do)

    from cellfm_sc.data import check_counts

    base = status_mb("VmRSS")
    adata = ad.read_h5ad(path, backed="r")
    opened = status_mb("VmRSS")
    t = time.perf_counter()
    check_counts(adata)
    t_sample = time.perf_counter() - t
    if cold:
        drop_cache(path)
    t = time.perf_counter()
    summary = check_counts(adata, full=True, forbid_empty=True)
    t_full = time.perf_counter() - t
    print(
        json.dumps(
            {
                "cells": summary.n_cells,
                "values": summary.n_values,
                "empty": int(summary.empty.size),
                "full_s": t_full,
                "sample_s": t_sample,
                "rss_after_imports_mb": base,
                "rss_after_open_mb": opened,
                "peak_rss_mb": status_mb("VmHWM"),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--nnz", type=int, default=1400, help="draws per cell (distinct ~ 0.96x)")
    p.add_argument("--keep", help="write (or reuse) the file here instead of a temp dir")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        run(args.run, args.cold)
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / f"seaad_like_{args.cells}.h5ad"
        if not path.exists():
            t = time.perf_counter()
            write_h5ad(path, args.cells, args.nnz)
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
        size = path.stat().st_size / 2**30
        for cold in (False, True):
            cmd = [sys.executable, __file__, "--run", str(path)] + (["--cold"] if cold else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{'cold' if cold else 'warm'}: {r['cells']:,} cells, {r['values']:,} values "
                f"({r['values'] / r['cells']:,.0f}/cell), file {size:.2f} GiB: full check "
                f"{r['full_s']:.1f} s ({r['values'] / r['full_s'] / 1e6:,.0f} M values/s, "
                f"{r['cells'] / r['full_s']:,.0f} cells/s); sample check {r['sample_s']:.2f} s; "
                f"peak RSS {r['peak_rss_mb']:.0f} MiB (after imports "
                f"{r['rss_after_imports_mb']:.0f}, after opening {r['rss_after_open_mb']:.0f})",
                flush=True,
            )
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
