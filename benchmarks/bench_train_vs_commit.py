"""Public ``train()`` and ``get_latent_representation()`` throughput: this tree vs an older commit.

Run (the older commit installed into its own virtualenv first)::

    git worktree add /work/old_c0a8a24 c0a8a24
    python3 -m venv /work/old_c0a8a24/.venv
    /work/old_c0a8a24/.venv/bin/pip install -c /work/old_c0a8a24/constraints-cpu.txt \
        -e /work/old_c0a8a24
    python benchmarks/bench_train_vs_commit.py --old-python /work/old_c0a8a24/.venv/bin/python \
        --old-src /work/old_c0a8a24/src --rounds 3 --markdown

What: ``CellFMClassifier.setup_anndata(adata, labels_key="celltype")``,
``CellFMClassifier(adata, preset=CellFMConfig(enc_dims=192, num_heads=6, n_layers=2))``,
``model.train(max_epochs=1, batch_size=8, test_size=0.1)`` with every other argument at each
tree's own default (``test_size`` is fixed so both trees train on the same 480 cells: the
old default held no test cells out), then ``model.get_latent_representation()`` (default
batch size) on the same 600 real PBMC cells (``../shared/data/pbmc3k_raw.h5ad``, a fixed
random subset). Every measurement is a
fresh subprocess (so no tree warms the other's caches), the two trees alternate round by
round (machine load from other work hits both alike), both run with the same number of torch
threads (``--threads``, default 1). Train cells/s = training cells x epochs run / wall time
of the whole ``train()`` call (data module, Lightning set-up, validation, callbacks
included: what a user waits for). Inference cells/s = cells / wall time of
``get_latent_representation()``. Each is also given per CPU second of the process
(``time.process_time``; one torch thread, no loader workers): on a machine shared with other
work, wall time swings with the load, CPU time much less. The medians over the rounds and
their ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO.parent / "shared" / "data" / "pbmc3k_raw.h5ad"


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process: train once, embed once; prints one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import anndata as ad

    import cellfm_sc
    from cellfm_sc import CellFMClassifier
    from cellfm_sc.nn import CellFMConfig

    full = ad.read_h5ad(args.pbmc)
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(full.n_obs, size=args.cells, replace=False))
    adata = full[idx].copy()  # the benchmark's own small copy, as a user would hold it
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    torch.manual_seed(args.seed)
    cfg = CellFMConfig(enc_dims=args.dims, num_heads=args.heads, n_layers=args.layers)
    model = CellFMClassifier(adata, preset=cfg)
    kwargs = {"max_epochs": 1, "batch_size": args.batch_size}
    if args.test_size >= 0:
        kwargs["test_size"] = args.test_size
    if args.precision:
        kwargs["precision"] = args.precision
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t, c = time.perf_counter(), time.process_time()
    model.train(**kwargs)
    train_s, train_cpu = time.perf_counter() - t, time.process_time() - c
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    n_train = len(model.split.train)
    epochs = len(model.history)
    t, c = time.perf_counter(), time.process_time()
    emb = model.get_latent_representation()
    infer_s, infer_cpu = time.perf_counter() - t, time.process_time() - c
    assert emb.shape == (adata.n_obs, args.dims) and np.isfinite(emb).all()
    print(
        json.dumps(
            {
                "tree": os.path.dirname(os.path.dirname(cellfm_sc.__file__)),
                "train_cells": n_train,
                "epochs": epochs,
                "train_s": train_s,
                "train_cells_per_s": n_train * epochs / train_s,
                "train_cpu_s": train_cpu,
                "train_cells_per_cpu_s": n_train * epochs / train_cpu,
                "infer_s": infer_s,
                "infer_cells_per_s": adata.n_obs / infer_s,
                "infer_cpu_s": infer_cpu,
                "infer_cells_per_cpu_s": adata.n_obs / infer_cpu,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def run_one(python: str, src: str, args: argparse.Namespace, precision: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = src
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [python, __file__, "--worker", "--pbmc", args.pbmc, "--cells", str(args.cells)]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--dims", str(args.dims), "--heads", str(args.heads), "--layers", str(args.layers)]
    cmd += ["--batch-size", str(args.batch_size)]
    cmd += ["--test-size", str(args.test_size)]
    if precision:
        cmd += ["--precision", precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} on {src} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--old-python", default="/work/old_c0a8a24/.venv/bin/python")
    p.add_argument("--old-src", default="/work/old_c0a8a24/src")
    p.add_argument("--new-python", default=sys.executable)
    p.add_argument("--new-src", default=str(REPO / "src"))
    p.add_argument("--old-name", default="c0a8a24")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cells", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dims", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--test-size",
        type=float,
        default=0.1,
        help="test_size= passed to both trees (default 0.1: both train on the same 480 "
        "cells; a negative value leaves each tree's own default)",
    )
    p.add_argument(
        "--new-precision",
        default=None,
        help="train(precision=...) for this tree only (default: its own default, as for the "
        "old tree), e.g. bf16-mixed to measure the mixed-precision path",
    )
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)  # worker
    p.add_argument("--pbmc", default=str(PBMC))
    p.add_argument("--json", help="write all rounds here")
    p.add_argument("--profile", help="with --worker: cProfile stats of train() to this file")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    trees = {"old": (args.old_python, args.old_src), "new": (args.new_python, args.new_src)}
    rows: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")  # alternate who goes first
        for name in order:
            res = run_one(*trees[name], args, args.new_precision if name == "new" else None)
            rows[name].append(res)
            print(json.dumps({"round": r, "which": name, **res}), flush=True)
    med = {
        name: {
            k: statistics.median(x[k] for x in rs)
            for k in (
                "train_cells_per_s",
                "infer_cells_per_s",
                "train_s",
                "infer_s",
                "train_cells_per_cpu_s",
                "infer_cells_per_cpu_s",
            )
        }
        for name, rs in rows.items()
    }
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible, torch threads "
        f"{args.threads}",
        "old": args.old_name,
        "median": med,
        "train_ratio": med["new"]["train_cells_per_s"] / med["old"]["train_cells_per_s"],
        "infer_ratio": med["new"]["infer_cells_per_s"] / med["old"]["infer_cells_per_s"],
        "train_ratio_cpu": med["new"]["train_cells_per_cpu_s"]
        / med["old"]["train_cells_per_cpu_s"],
        "infer_ratio_cpu": med["new"]["infer_cells_per_cpu_s"]
        / med["old"]["infer_cells_per_cpu_s"],
        "train_cells": {k: rs[0]["train_cells"] for k, rs in rows.items()},
        "new_precision": args.new_precision or "default",
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rows}, indent=1))
    if args.markdown:
        print(f"\n{summary['machine']}; {args.rounds} interleaved rounds, medians\n")
        print(
            "| tree | train cells | train cells/s | train() s | inference cells/s "
            "| train cells/CPU-s | inference cells/CPU-s |"
        )
        print("|---|---|---|---|---|---|---|")
        new_label = f"this tree, {args.new_precision}" if args.new_precision else "this tree"
        for name, label in (("old", args.old_name), ("new", new_label)):
            m = med[name]
            print(
                f"| {label} | {summary['train_cells'][name]} | {m['train_cells_per_s']:.1f} "
                f"| {m['train_s']:.1f} | {m['infer_cells_per_s']:.1f} "
                f"| {m['train_cells_per_cpu_s']:.1f} | {m['infer_cells_per_cpu_s']:.1f} |"
            )
        print(
            f"| ratio | | x{summary['train_ratio']:.2f} | | x{summary['infer_ratio']:.2f} "
            f"| x{summary['train_ratio_cpu']:.2f} | x{summary['infer_ratio_cpu']:.2f} |"
        )


if __name__ == "__main__":
    main()
