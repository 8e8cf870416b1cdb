"""Tokenisation throughput (cells/s, one process) on pbmc3k and a SEA-AD-like matrix.

Run: ``python benchmarks/bench_tokenize.py [--cells 4000]``. Reports two numbers per data set:
``tokenize`` (rows already in memory as CSR: normalise + Gumbel top-k + pad) and ``batches``
(the full in-process loader: row reads, per-batch count check, tokenisation). Batch size 16,
``max_tokens=2048``, evaluation draws (training draws cost the same).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellfm_sc.data import batches, tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def sea_ad_like(
    n_cells: int, n_genes: int = 36_601, per_cell: int = 3_000, seed: int = 0
) -> sp.csr_matrix:
    """Synthetic snRNA-seq-like counts: ~``per_cell`` expressed genes per cell, heavy-tailed."""
    rng = np.random.default_rng(seed)
    nnz_per = rng.integers(int(per_cell * 0.7), int(per_cell * 1.3), size=n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz_per)])
    popularity = rng.dirichlet(np.full(n_genes, 0.3))
    indices = np.empty(indptr[-1], dtype=np.int32)
    for i in range(n_cells):  # benchmark setup only
        indices[indptr[i] : indptr[i + 1]] = np.sort(
            rng.choice(n_genes, size=nnz_per[i], replace=False, p=popularity)
        )
    data = (
        1 + rng.geometric(0.45, size=indices.size) - 1 + rng.poisson(0.2, size=indices.size)
    ).astype(np.float32)
    data = np.maximum(data, 1)
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def bench(name: str, adata: ad.AnnData, repeats: int = 3) -> dict[str, float]:
    x = adata.X
    n = adata.n_obs
    bs = 16
    blocks = [x[i : i + bs] for i in range(0, n, bs)]
    best_tok = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for i, blk in enumerate(blocks):
            tokenize(blk, np.arange(i * bs, i * bs + blk.shape[0]), max_tokens=2048)
        best_tok = min(best_tok, time.perf_counter() - t)
    best_all = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _b in batches(adata, batch_size=bs, max_tokens=2048, check=False):
            pass
        best_all = min(best_all, time.perf_counter() - t)
    nnz = x.nnz / n
    res = {"tokenize": n / best_tok, "batches": n / best_all}
    print(
        f"{name}: {n} cells, {adata.n_vars} genes, {nnz:.0f} nonzero/cell: "
        f"tokenize {res['tokenize']:,.0f} cells/s, batches {res['batches']:,.0f} cells/s"
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=4000, help="cells of the SEA-AD-like matrix")
    args = p.parse_args()
    print(f"cpu cores: {os.cpu_count()}; batch 16; max_tokens 2048; best of 3")
    pbmc = ad.read_h5ad(SHARED / "data" / "pbmc3k_raw.h5ad")
    bench("pbmc3k", pbmc)
    t = time.perf_counter()
    x = sea_ad_like(args.cells)
    print(f"(synthetic matrix built in {time.perf_counter() - t:.1f} s)")
    bench("SEA-AD-like", ad.AnnData(x))


if __name__ == "__main__":
    main()
