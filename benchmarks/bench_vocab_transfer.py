"""Benchmark: map a 36,601-gene dataset onto CellFM's vocabulary and build a transfer table.

Dataset genes: all 27,855 CellFM symbols shuffled (1,000 of them lower-cased, so the
case-insensitive rule has work) plus 8,746 names CellFM does not know. Pretrained table: a random
``(27856, 1536)`` float32 array (the 80M model's ``gene_emb`` shape). Each step is timed with
``time.perf_counter`` (best of ``--repeat`` runs).

Usage::

    python benchmarks/bench_vocab_transfer.py [--vocab ../shared/cellfm/expand_gene_info.csv]
        [--repeat 3] [--markdown]

``--markdown`` also prints a section for ``benchmarks/RESULTS.md``; append it in one go::

    python benchmarks/bench_vocab_transfer.py --markdown | sed -n '/^## vocab/,$p' > /tmp/s.md
    cat /tmp/s.md >> benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellfm_sc.vocab import GeneVocab, build_gene_embedding, map_genes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = ROOT.parent / "shared" / "cellfm" / "expand_gene_info.csv"
N_DATASET = 36_601
DIM = 1536


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--markdown", action="store_true", help="also print a section for benchmarks/RESULTS.md"
    )
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    t_load, pre = _best(lambda: GeneVocab.from_cellfm_file(args.vocab), args.repeat)
    syms = [str(s) for s in rng.permutation(pre.names)]
    syms[:1000] = [s.lower() for s in syms[:1000]]
    n_unknown = N_DATASET - len(syms)
    unknown = [f"RP11-{k}O{k % 97}.{k % 13 + 1}" for k in range(n_unknown)]
    names = syms + unknown
    order = rng.permutation(len(names))
    names = [names[k] for k in order]
    pretrained = rng.standard_normal((pre.padded_size, DIM), dtype=np.float32)

    t_vocab, vocab = _best(lambda: GeneVocab.from_var_names(names), args.repeat)
    t_map, mapping = _best(lambda: map_genes(vocab, pre), args.repeat)
    t_table, table = _best(
        lambda: build_gene_embedding(vocab, pretrained, mapping, init="transfer", seed=0),
        args.repeat,
    )
    total = t_load + t_vocab + t_map + t_table
    assert tuple(table.shape) == (36_608, DIM) and table.dtype == torch.float32
    rows = np.flatnonzero(mapping.pretrained_ids) + 1
    assert np.array_equal(table.numpy()[rows], pretrained[mapping.pretrained_ids[rows - 1]])

    lines = [
        f"- load CellFM vocabulary ({pre.n_genes:,} genes): {t_load * 1e3:.1f} ms",
        f"- GeneVocab.from_var_names ({vocab.n_genes:,} genes): {t_vocab * 1e3:.1f} ms",
        f"- map_genes: {t_map * 1e3:.1f} ms ({mapping.n_mapped:,} of {mapping.n_dataset:,} "
        f"mapped: exact {mapping.counts['exact']:,}, case-insensitive {mapping.counts['case']:,}; "
        f"unmapped {mapping.counts['unmapped']:,})",
        f"- build_gene_embedding transfer {tuple(table.shape)} from {pretrained.shape}: "
        f"{t_table * 1e3:.1f} ms",
        f"- total: {total:.2f} s (target < 5 s)",
    ]
    print("\n".join(lines))
    if args.markdown:
        machine = (
            f"{os.cpu_count()} cores, 24 GiB RAM, no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__} (torch threads {torch.get_num_threads()})"
        )
        section = "\n".join(
            [
                "",
                "## vocab: gene mapping + transfer embedding table (`bench_vocab_transfer.py`)",
                "",
                f"What: map {N_DATASET:,} dataset genes (all {pre.n_genes:,} CellFM symbols "
                f"shuffled, 1,000 lower-cased, plus {n_unknown:,} unknown names) onto CellFM's "
                f"`expand_gene_info.csv`, then build a `(36608, {DIM})` float32 transfer table "
                f"from a random `({pre.padded_size}, {DIM})` pretrained table.",
                f"How: `python benchmarks/bench_vocab_transfer.py --markdown`, best of "
                f"{args.repeat} runs per step (`time.perf_counter`).",
                f"Machine: {machine}.",
                "",
                *lines,
                "",
            ]
        )
        print(section)


if __name__ == "__main__":
    main()
