"""Length bucketing: padding waste, tokens per batch and training-step throughput, with and without.

Run: ``python benchmarks/bench_bucketing.py [--markdown] [--train-cells 512] [--rounds 2]``.

1. Padding waste (padded token slots / real tokens) and tokens per batch of one shuffled
   training epoch (``batches(..., train=True, shuffle=True)``, ``max_tokens=2048``) with and
   without ``bucket=True`` (default ``bucket_size`` = 32 batches), on
   ``../shared/data/pbmc3k_raw.h5ad`` and on a synthetic SEA-AD-like matrix (36,601 genes,
   about 3,000 expressed genes per cell with a broad spread, see :func:`seaad_like`).
2. A sweep of ``bucket_size`` (in batches) from the per-cell lengths alone (the sampler's
   batches and ``min(nnz, max_tokens)``), to show where the default sits.
3. Training-step throughput (cells/s) of a 192-dim, 6-head, 2-layer trunk
   (``CellFMConfig(enc_dims=192, num_heads=6, n_layers=2)``, batch 8, AdamW, cross-entropy of a
   linear head on cls) on real PBMC cells, plain and bucketed batches of the same cells,
   interleaved round by round in one process (the steps are timed; the batches are built
   before).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO.parent / "shared" / "data" / "pbmc3k_raw.h5ad"
MAX_TOKENS = 2048


def seaad_like(n_cells: int, seed: int = 0, n_genes: int = 36_601) -> sp.csr_matrix:
    """CSR counts with a broad spread of expressed genes per cell, about 3,000 on average.

    A mixture like an snRNA-seq cortex atlas: 40% glia-like nuclei (log-normal, median 1,500)
    and 60% neuron-like nuclei (median 4,000), both with sigma 0.4; clipped to [200, 12,000].
    """
    rng = np.random.default_rng(seed)
    median = np.where(rng.random(n_cells) < 0.4, 1500.0, 4000.0)
    nnz = np.clip(rng.lognormal(np.log(median), 0.4), 200, 12_000).astype(np.int64)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(nnz, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int32)
    for i in range(n_cells):  # distinct sorted genes per cell
        indices[indptr[i] : indptr[i + 1]] = np.sort(
            rng.choice(n_genes, size=nnz[i], replace=False)
        )
    data = rng.geometric(0.4, size=indices.size).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def padding_stats(batch_list) -> dict[str, float]:
    slots = sum(b.valid.numel() for b in batch_list)
    real = sum(int(b.n_tokens.sum()) for b in batch_list)
    return {
        "waste": (slots - real) / real,
        "slots_per_batch": slots / len(batch_list),
        "real_per_batch": real / len(batch_list),
        "batches": len(batch_list),
    }


def epoch_stats(adata, batch_size: int, bucket: bool) -> dict[str, float]:
    from cellfm_sc.data import batches

    t = time.perf_counter()
    got = list(
        batches(
            adata,
            batch_size,
            max_tokens=MAX_TOKENS,
            train=True,
            shuffle=True,
            seed=0,
            bucket=bucket,
        )
    )
    out = padding_stats(got)
    out["data_cells_per_s"] = adata.n_obs / (time.perf_counter() - t)
    return out


def sweep(lengths: np.ndarray, batch_size: int, factors: list[int | None]) -> dict[str, float]:
    """Waste of a shuffled epoch for bucket windows of ``factor`` batches (None: no bucketing)."""
    from cellfm_sc.data import CellBatchSampler

    idx = np.arange(lengths.size)
    out = {}
    for f in factors:
        s = CellBatchSampler(
            idx,
            batch_size,
            shuffle=True,
            lengths=None if f is None else lengths,
            bucket_size=None if f is None else f * batch_size,
        )
        slots = sum(b.size * int(lengths[b].max()) for b in s)
        out["off" if f is None else str(f)] = (slots - lengths.sum()) / lengths.sum()
    return out


def train_throughput(adata, n_cells: int, rounds: int, seed: int = 0) -> dict[str, float]:
    import torch

    from cellfm_sc.data import batches
    from cellfm_sc.nn import CellFMConfig, CellFMTrunk

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    labels = rng.integers(0, 8, size=adata.n_obs)
    sets = {}
    for bucket in (False, True):
        sets["bucketed" if bucket else "plain"] = list(
            batches(
                adata,
                8,
                max_tokens=MAX_TOKENS,
                train=True,
                shuffle=True,
                seed=seed,
                indices=idx,
                labels=labels,
                bucket=bucket,
            )
        )
    cfg = CellFMConfig(enc_dims=192, num_heads=6, n_layers=2)
    trunk = CellFMTrunk(cfg, n_genes=adata.n_vars)
    head = torch.nn.Linear(cfg.enc_dims, 8)
    params = list(trunk.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    trunk.train()

    def step(b) -> None:
        out = trunk(b.values, b.gene_ids, b.valid)
        loss = torch.nn.functional.cross_entropy(head(out.cls), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(sets["plain"][0])  # warm-up
    times = {k: [] for k in sets}
    for _ in range(rounds):  # interleaved, so machine load hits both alike
        for name, bl in sets.items():
            t = time.perf_counter()
            for b in bl:
                step(b)
            times[name].append(time.perf_counter() - t)
    res: dict[str, float] = {"cells": float(idx.size)}
    for name, bl in sets.items():
        best = min(times[name])
        res[f"{name}_cells_per_s"] = idx.size / best
        res[f"{name}_s_per_epoch"] = best
        res[f"{name}_waste"] = padding_stats(bl)["waste"]
        res[f"{name}_slots_per_batch"] = padding_stats(bl)["slots_per_batch"]
    res["speedup"] = res["bucketed_cells_per_s"] / res["plain_cells_per_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--seaad-cells", type=int, default=4000)
    p.add_argument("--train-cells", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--pbmc", default=str(PBMC))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import anndata as ad
    import torch

    pbmc = ad.read_h5ad(args.pbmc)
    seaad = ad.AnnData(seaad_like(args.seaad_cells))
    seaad.obs_names = [f"c{i}" for i in range(seaad.n_obs)]
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    }
    table = []
    for name, adata in (("pbmc3k", pbmc), ("SEA-AD-like", seaad)):
        nnz = np.diff(adata.X.indptr)
        lengths = np.minimum(nnz, MAX_TOKENS)
        for bs in args.batch_sizes:
            plain = epoch_stats(adata, bs, bucket=False)
            buck = epoch_stats(adata, bs, bucket=True)
            sw = sweep(lengths, bs, [None, 1, 2, 4, 8, 16, 32, 64, 128])
            row = {
                "data": name,
                "cells": adata.n_obs,
                "median_nnz": float(np.median(nnz)),
                "batch_size": bs,
                "plain": plain,
                "bucketed": buck,
                "sweep": sw,
            }
            table.append(row)
            print(json.dumps(row), flush=True)
    results["padding"] = table
    tr = train_throughput(pbmc, args.train_cells, args.rounds)
    results["train"] = tr
    print(json.dumps(tr), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        print(f"\nMachine: {results['machine']}\n")
        print(
            "| data | batch | waste plain | waste bucketed | slots/batch plain | "
            "slots/batch bucketed | real tokens/batch |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in table:
            a, b = r["plain"], r["bucketed"]
            print(
                f"| {r['data']} ({r['cells']:,} cells, median {r['median_nnz']:,.0f} genes) "
                f"| {r['batch_size']} | {a['waste']:.2f} | {b['waste']:.3f} "
                f"| {a['slots_per_batch']:,.0f} | {b['slots_per_batch']:,.0f} "
                f"| {a['real_per_batch']:,.0f} |"
            )
        keys = list(table[0]["sweep"])
        print("\n| data | batch | " + " | ".join(f"window {k}" for k in keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for r in table:
            cells = " | ".join(f"{r['sweep'][k]:.3f}" for k in keys)
            print(f"| {r['data']} | {r['batch_size']} | {cells} |")
        print(
            f"\nTraining steps, {tr['cells']:.0f} PBMC cells, batch 8: plain "
            f"{tr['plain_cells_per_s']:.1f} cells/s (waste {tr['plain_waste']:.2f}, "
            f"{tr['plain_slots_per_batch']:,.0f} slots/batch), bucketed "
            f"{tr['bucketed_cells_per_s']:.1f} cells/s (waste {tr['bucketed_waste']:.3f}, "
            f"{tr['bucketed_slots_per_batch']:,.0f} slots/batch): x{tr['speedup']:.2f}"
        )


if __name__ == "__main__":
    main()
