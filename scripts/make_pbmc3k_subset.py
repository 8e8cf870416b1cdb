"""Regenerate ``src/cellfm_sc/_data/pbmc3k_subset.h5ad``, the demo dataset shipped with cellfm-sc.

Source: 10x Genomics "3k PBMCs from a Healthy Donor" (PBMC 3k), Chromium v1, released by
10x Genomics under the Creative Commons Attribution 4.0 licence (CC BY 4.0), with the cell-type
labels distributed with it; here read from ``../shared/data/pbmc3k_raw.h5ad`` (2,700 cells x
16,634 genes, raw counts, ``obs["celltype"]``, ``var["gene_ids"]``).

The subset: 1,200 cells drawn with a fixed seed, stratified by cell type (each type keeps its
share of the cells, at least 30 cells or all of them when it has fewer), in the original cell
order; genes detected in at least one chosen cell, in the original gene order. Raw counts stay
a float32 CSR matrix of integer values. Written with gzip compression.

Usage::

    python scripts/make_pbmc3k_subset.py [--source ../shared/data/pbmc3k_raw.h5ad]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "pbmc3k_raw.h5ad"
TARGET = ROOT / "src" / "cellfm_sc" / "_data" / "pbmc3k_subset.h5ad"
N_CELLS = 1200
MIN_PER_TYPE = 30
SEED = 0


def choose_cells(labels: np.ndarray, n_cells: int, seed: int) -> np.ndarray:
    """Sorted row positions of a stratified sample of ``n_cells`` cells."""
    rng = np.random.default_rng(seed)
    types, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(np.round(counts * n_cells / labels.size), MIN_PER_TYPE)
    quota = np.minimum(quota, counts).astype(int)
    # give or take cells from the largest types until the total is exact
    order = np.argsort(-counts)
    i = 0
    while quota.sum() != n_cells:
        t = order[i % order.size]
        step = 1 if quota.sum() < n_cells else -1
        if MIN_PER_TYPE <= quota[t] + step <= counts[t]:
            quota[t] += step
        i += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == t), size=q, replace=False) for t, q in zip(types, quota)
    ]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()

    full = ad.read_h5ad(args.source)
    labels = full.obs["celltype"].astype(str).to_numpy()
    rows = choose_cells(labels, N_CELLS, SEED)
    sub = full[rows].copy()
    x = sp.csr_matrix(sub.X, dtype=np.float32)
    detected = np.asarray((x > 0).sum(axis=0)).ravel() > 0
    x = x[:, detected]
    x.sort_indices()
    out = ad.AnnData(
        X=x,
        obs=sub.obs[["celltype"]].copy(),
        var=sub.var.loc[detected, ["gene_ids"]].copy(),
    )
    out.obs["celltype"] = out.obs["celltype"].astype("category")
    out.uns["dataset"] = {
        "name": "pbmc3k_subset",
        "source": "10x Genomics PBMC 3k (3k PBMCs from a Healthy Donor)",
        "license": "CC BY 4.0",
        "subset": f"{N_CELLS} cells stratified by celltype (seed {SEED}), genes detected in them",
        "script": "scripts/make_pbmc3k_subset.py",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(args.output, compression="gzip")
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {out.n_obs} cells x {out.n_vars} genes, {size / 1e6:.2f} MB")
    print(out.obs["celltype"].value_counts().to_string())


if __name__ == "__main__":
    main()
