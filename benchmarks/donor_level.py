"""Donor-level learning on a semi-synthetic donor task: donor model vs two anchors.

The task (built from public cells, ``../shared/data/pbmc3k_raw.h5ad``): ``--donors``
pseudo-donors of ``--cells-per-donor`` cells (default 40 x 150, drawn with replacement with a
Dirichlet cell-type composition of ``--composition-alpha`` and binomial thinning; 0 deals the
2,700 cells out instead, about 67 per donor); donor ``d``
has stage ``d % 4`` (0 < 1 < 2 < 3). A "disease" program of ``--program-genes`` genes
(moderately expressed genes drawn at random) is raised in a fraction of the donor's cells of
one type (default CD14 monocytes, 18% of the cells) that grows with the stage
(``--fractions``, +- ``--jitter`` per donor): each affected cell gets
``Poisson(strength * (1 + 2 * mean count of the gene) * library size / median library size)``
extra counts of every program gene. So the label belongs to the donor and is visible in a
minority of one cell type's cells, as ADNC in SEA-AD.

Five donor splits (folds stratified by stage: fold ``i`` tests, fold ``i + 1`` validates,
the rest train) compare:

* ``donor``: :class:`~cellfm_sc.CellFMDonorClassifier` (bags, gated attention, ordinal
  loss), model selection on the validation donors' QWK;
* ``cell``: :class:`~cellfm_sc.CellFMClassifier` on cells with their donor's label, donors
  scored by the mean of their cells' probabilities (model selection on validation donor QWK);
* ``pseudobulk``: per-donor summed counts -> CPM -> log1p -> logistic regression (``C``
  chosen on the validation donors from 0.01-10, refit on train + validation donors).

Reported: test-donor QWK per split, pooled over the five splits' test donors (every donor is
tested once) with a 95% bootstrap interval over donors, and wall time.

Run: ``python benchmarks/donor_level.py --markdown`` (about 16 min on 2 busy CPU cores, most of it
the cell method);
``--quick`` for a smoke run (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pbmc3k_raw.h5ad"
STAGES = ["0", "1", "2", "3"]


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


def make_donor_task(
    adata: ad.AnnData,
    *,
    n_donors: int = 40,
    cells_per_donor: int | None = 150,
    composition_alpha: float = 20.0,
    thinning: float = 0.9,
    cell_type: str = "CD14 Monocytes",
    celltype_key: str = "celltype",
    n_program: int = 30,
    fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6),
    jitter: float = 0.1,
    strength: float = 2.0,
    seed: int = 0,
) -> tuple[ad.AnnData, np.ndarray]:
    """A pseudo-donor task; returns ``(task AnnData, program gene columns)``.

    With ``cells_per_donor`` each donor draws that many cells (with replacement) from the
    source, with its own cell-type composition (``Dirichlet(composition_alpha * source
    proportions)``: donors differ in composition as real donors do) and its own binomial
    thinning of the counts (each count kept with probability ``thinning``, so no two copies of
    a source cell are identical). Without it the source cells are dealt to the donors (each
    used once). Donor ``d`` has stage ``d % len(fractions)``; a fraction ``fractions[stage]``
    (+- ``jitter``) of its ``cell_type`` cells gets the program.

    ``task.obs``: ``donor``, ``stage`` (``"0"`` .. ``"3"``), ``celltype``, ``affected``;
    ``X``: raw counts (CSR float32).
    """
    rng = np.random.default_rng(seed)
    source = sp.csr_matrix(adata.X, dtype=np.float32)
    types_all = adata.obs[celltype_key].astype(str).to_numpy()
    kinds, type_code = np.unique(types_all, return_inverse=True)
    if cells_per_donor is None:
        rows = rng.permutation(source.shape[0])
        donor_of = np.empty(rows.size, dtype=np.int64)
        for d, chunk in enumerate(np.array_split(np.arange(rows.size), n_donors)):
            donor_of[chunk] = d
        x = source[rows]
    else:
        share = np.bincount(type_code) / type_code.size
        members = [np.flatnonzero(type_code == k) for k in range(kinds.size)]
        picks = []
        for _ in range(n_donors):
            p = rng.dirichlet(composition_alpha * share)
            counts = rng.multinomial(cells_per_donor, p)
            picks.append(
                np.concatenate([rng.choice(members[k], c) for k, c in enumerate(counts) if c])
            )
        rows = np.concatenate(picks)
        donor_of = np.repeat(np.arange(n_donors), [p.size for p in picks])
        x = source[rows].tocsr()
        x.data = rng.binomial(x.data.astype(np.int64), thinning).astype(np.float32)
        x.eliminate_zeros()
    n = x.shape[0]
    types = types_all[rows]
    n_stages = len(fractions)
    stage_of_donor = np.arange(n_donors) % n_stages
    detected = np.asarray((source > 0).mean(axis=0)).ravel()
    candidates = np.flatnonzero((detected > 0.02) & (detected < 0.3))
    program = np.sort(rng.choice(candidates, n_program, replace=False))
    target = np.flatnonzero(types == cell_type)
    affected = np.zeros(n, dtype=bool)
    for d in range(n_donors):
        s = stage_of_donor[d]
        if s == 0:
            continue
        mine = target[donor_of[target] == d]
        f = float(np.clip(fractions[s] + rng.uniform(-jitter, jitter), 0.0, 1.0))
        affected[rng.choice(mine, round(f * mine.size), replace=False)] = True
    hit = np.flatnonzero(affected)
    lib = np.asarray(x.sum(axis=1)).ravel()
    mean = np.asarray(source[:, program].mean(axis=0)).ravel()
    lam = strength * (1.0 + 2.0 * mean)[None, :] * (lib[hit] / np.median(lib))[:, None]
    extra = rng.poisson(lam).astype(np.float32)
    add = sp.csr_matrix(
        (extra.ravel(), (np.repeat(hit, n_program), np.tile(program, hit.size))), shape=x.shape
    )
    x = (x + add).tocsr()
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"D{d:02d}" for d in donor_of]),
            "stage": pd.Categorical(
                [STAGES[s] for s in stage_of_donor[donor_of]], categories=STAGES, ordered=True
            ),
            "celltype": types,
            "affected": affected,
        },
        index=[f"{adata.obs_names[r]}-{i}" for i, r in enumerate(rows)],
    )
    return ad.AnnData(X=x, obs=obs, var=adata.var.copy()), program


def donor_folds(task: ad.AnnData, k: int = 5, seed: int = 0) -> pd.Series:
    """Fold of each donor, stratified by stage (the library's ``stratified_donor_folds``)."""
    from cellfm_sc.model._donor_eval import stratified_donor_folds

    stage = task.obs.groupby("donor", observed=True)["stage"].first()
    return pd.Series(
        stratified_donor_folds(stage.astype(str).to_numpy(), k, seed), index=stage.index
    )


def split_column(task: ad.AnnData, folds: pd.Series, i: int, k: int) -> np.ndarray:
    """``train`` / ``validation`` / ``test`` per cell for split ``i``."""
    f = folds.reindex(task.obs["donor"].astype(str)).to_numpy()
    out = np.full(task.n_obs, "train", dtype=object)
    out[f == (i + 1) % k] = "validation"
    out[f == i] = "test"
    return out


# --------------------------------------------------------------------------------------------
# methods: each returns a DataFrame of test donors (true, predicted codes)
# --------------------------------------------------------------------------------------------


def run_pseudobulk(task: ad.AnnData, split: np.ndarray) -> pd.DataFrame:
    from sklearn.linear_model import LogisticRegression

    from cellfm_sc.metrics import quadratic_weighted_kappa

    donors = task.obs["donor"].astype(str).to_numpy()
    names, codes = np.unique(donors, return_inverse=True)
    summed = sp.csr_matrix(
        (np.ones(task.n_obs), (codes, np.arange(task.n_obs))), shape=(names.size, task.n_obs)
    ) @ sp.csr_matrix(task.X)
    summed = np.asarray(summed.todense(), dtype=np.float64)
    x = np.log1p(summed / summed.sum(axis=1, keepdims=True) * 1e6)
    stage = task.obs.groupby("donor", observed=True)["stage"].first()
    y = stage.cat.codes.reindex(names).to_numpy()
    part = pd.Series(split, index=donors).groupby(level=0).first().reindex(names).to_numpy()
    tr, va, te = part == "train", part == "validation", part == "test"
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        lr = LogisticRegression(C=c, max_iter=5000).fit(x[tr], y[tr])
        q = quadratic_weighted_kappa(y[va], lr.predict(x[va]), n_classes=len(STAGES))
        q = -1.0 if not np.isfinite(q) else q
        if best is None or q > best[0]:
            best = (q, c)
    fit_on = tr | va
    lr = LogisticRegression(C=best[1], max_iter=5000).fit(x[fit_on], y[fit_on])
    return pd.DataFrame({"true": y[te], "predicted": lr.predict(x[te])}, index=names[te])


def run_cell(task: ad.AnnData, split: np.ndarray, args: argparse.Namespace) -> pd.DataFrame:
    from cellfm_sc import CellFMClassifier
    from cellfm_sc.data import split_from_obs

    task = task.copy()
    task.obs["split"] = split
    CellFMClassifier.setup_anndata(task, labels_key="stage", donor_key="donor", label_order=STAGES)
    model = CellFMClassifier(task, preset=args.preset, max_tokens=args.max_tokens, seed=args.seed)
    model.train(
        max_epochs=args.epochs,
        split=split_from_obs(task, "split", donor_key="donor"),
        enable_progress_bar=False,
        logger=False,
    )
    table = model.evaluate().donor_table
    return pd.DataFrame(
        {"true": table["true"].cat.codes, "predicted": table["predicted"].cat.codes}
    )


def run_donor(
    task: ad.AnnData, split: np.ndarray, args: argparse.Namespace
) -> tuple[pd.DataFrame, Any]:
    from cellfm_sc import CellFMDonorClassifier
    from cellfm_sc.data import split_from_obs

    task = task.copy()
    task.obs["split"] = split
    CellFMDonorClassifier.setup_anndata(
        task, labels_key="stage", donor_key="donor", label_order=STAGES
    )
    model = CellFMDonorClassifier(
        task,
        preset=args.preset,
        max_tokens=args.max_tokens,
        trainable=args.trainable,
        bag_size=args.bag_size,
        pooling=args.pooling,
        seed=args.seed,
    )
    model.train(
        max_epochs=args.epochs,
        split=split_from_obs(task, "split", donor_key="donor"),
        lr=args.lr,
        batch_size=args.bags_per_step,
        cell_loss_weight=args.cell_loss_weight,
        enable_progress_bar=False,
        logger=False,
    )
    table = model.evaluate(n_bootstrap=0).donor_table
    if args.verbose:
        cols = [
            c
            for c in ("epoch", "train_loss", "validation_donor_loss", "validation_donor_qwk")
            if c in model.history
        ]
        print(model.history[cols].round(3).to_string(), file=sys.stderr)
        print(table.round(2).to_string(), file=sys.stderr)
    out = pd.DataFrame({"true": table["true"].cat.codes, "predicted": table["predicted"].cat.codes})
    return out, model


def run_donor_cv(task: ad.AnnData, args: argparse.Namespace, k: int) -> list[pd.DataFrame]:
    """All ``k`` splits of a frozen-trunk donor model through ``cross_validate`` (the same
    stratified folds as :func:`donor_folds`; the cell embeddings are computed once)."""
    from cellfm_sc import CellFMDonorClassifier

    task = task.copy()
    CellFMDonorClassifier.setup_anndata(
        task, labels_key="stage", donor_key="donor", label_order=STAGES
    )
    model = CellFMDonorClassifier(
        task,
        preset=args.preset,
        max_tokens=args.max_tokens,
        trainable="head",
        bag_size=args.bag_size,
        pooling=args.pooling,
        seed=args.seed,
    )
    cv = model.cross_validate(
        k=k,
        n_bootstrap=0,
        max_epochs=args.epochs,
        lr=args.lr,
        batch_size=args.bags_per_step,
        cell_loss_weight=args.cell_loss_weight,
        enable_progress_bar=False,
        logger=False,
    )
    if args.verbose:
        print(cv.per_fold.round(3).to_string(), file=sys.stderr)
    table = cv.donor_table
    return [
        pd.DataFrame(
            {
                "true": table.loc[table["fold"] == i, "true"].cat.codes,
                "predicted": table.loc[table["fold"] == i, "predicted"].cat.codes,
            }
        )
        for i in range(k)
    ]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def summarise(tables: list[pd.DataFrame], seed: int) -> dict[str, Any]:
    from cellfm_sc.metrics import quadratic_weighted_kappa
    from cellfm_sc.model._donor_eval import bootstrap_intervals

    per = [
        float(quadratic_weighted_kappa(t["true"], t["predicted"], n_classes=len(STAGES)))
        for t in tables
    ]
    pooled = pd.concat(tables)
    t, p = pooled["true"].to_numpy(), pooled["predicted"].to_numpy()
    ci = bootstrap_intervals(t, p, len(STAGES), True, 2000, 0.95, seed)
    return {
        "per_split_qwk": per,
        "mean_split_qwk": float(np.mean(per)),
        "pooled_qwk": float(quadratic_weighted_kappa(t, p, n_classes=len(STAGES))),
        "pooled_qwk_ci95": ci["qwk"],
        "pooled_accuracy": float((t == p).mean()),
        "pooled_mae": float(np.abs(t - p).mean()),
        "n_donors": int(t.size),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--methods", default="pseudobulk,cell,donor")
    p.add_argument("--donors", type=int, default=40)
    p.add_argument("--cells-per-donor", type=int, default=150, help="0: deal the cells out")
    p.add_argument("--composition-alpha", type=float, default=20.0)
    p.add_argument("--splits", default="0,1,2,3,4", help="which of the 5 splits to run")
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--fractions", default="0,0.2,0.4,0.6")
    p.add_argument("--jitter", type=float, default=0.1)
    p.add_argument("--program-genes", type=int, default=30)
    p.add_argument("--cell-type", default="CD14 Monocytes")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--trainable", default="auto")
    p.add_argument("--bag-size", type=int, default=128)
    p.add_argument("--pooling", default="gated_attention")
    p.add_argument("--bags-per-step", type=int, default=1)
    p.add_argument("--lr", default="auto")
    p.add_argument("--cell-loss-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="print the donor model's history")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if args.lr != "auto":
        args.lr = float(args.lr)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    source = ad.read_h5ad(args.data)
    if args.quick:
        keep = np.random.default_rng(0).choice(source.n_obs, 480, replace=False)
        source = source[np.sort(keep)].copy()
        args.donors, args.epochs, args.max_tokens = 12, 2, 32
        args.cells_per_donor = 20
        args.splits = "0"
    task, program = make_donor_task(
        source,
        n_donors=args.donors,
        cells_per_donor=args.cells_per_donor or None,
        composition_alpha=args.composition_alpha,
        cell_type=args.cell_type,
        n_program=args.program_genes,
        fractions=tuple(float(f) for f in args.fractions.split(",")),
        jitter=args.jitter,
        strength=args.strength,
        seed=args.seed,
    )
    k = 5
    folds = donor_folds(task, k, args.seed)
    methods = [m for m in args.methods.split(",") if m]
    splits = [int(s) for s in args.splits.split(",")]
    tables: dict[str, list[pd.DataFrame]] = {m: [] for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    frozen_cv = None
    if "donor" in methods and args.trainable == "head" and splits == list(range(k)):
        t0 = time.perf_counter()
        frozen_cv = run_donor_cv(task, args, k)
        seconds["donor"] = time.perf_counter() - t0
        print(f"donor (frozen trunk, {k} splits): {seconds['donor']:.0f} s", file=sys.stderr)
    for i in splits:
        split = split_column(task, folds, i, k)
        for m in methods:
            if m == "donor" and frozen_cv is not None:
                tables[m].append(frozen_cv[i])
                continue
            t0 = time.perf_counter()
            if m == "pseudobulk":
                table = run_pseudobulk(task, split)
            elif m == "cell":
                table = run_cell(task, split, args)
            elif m == "donor":
                table, _ = run_donor(task, split, args)
            else:
                raise SystemExit(f"unknown method {m!r}")
            seconds[m] += time.perf_counter() - t0
            tables[m].append(table)
            from cellfm_sc.metrics import quadratic_weighted_kappa

            q = quadratic_weighted_kappa(table["true"], table["predicted"], n_classes=4)
            print(f"split {i} {m:<10} QWK {q:.3f} ({seconds[m]:.0f} s so far)", file=sys.stderr)
    result = {
        "task": {
            "source": os.path.basename(args.data),
            "cells": int(task.n_obs),
            "donors": int(args.donors),
            "affected_cells": int(task.obs["affected"].sum()),
            "cell_type": args.cell_type,
            "program_genes": int(program.size),
            "strength": args.strength,
            "fractions": args.fractions,
            "jitter": args.jitter,
        },
        "settings": {
            k_: v for k_, v in vars(args).items() if k_ not in ("json", "markdown", "data", "quick")
        },
        "splits": splits,
        "methods": {
            m: {**summarise(tables[m], args.seed), "wall_s": round(seconds[m], 1)} for m in methods
        },
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        print("| method | QWK per split | mean | pooled QWK [95% CI] | accuracy | MAE | wall |")
        print("|---|---|---|---|---|---|---|")
        for m, r in result["methods"].items():
            per = ", ".join(f"{q:.2f}" for q in r["per_split_qwk"])
            lo, hi = r["pooled_qwk_ci95"]
            print(
                f"| {m} | {per} | {r['mean_split_qwk']:.2f} | {r['pooled_qwk']:.2f} "
                f"[{lo:.2f}, {hi:.2f}] | {r['pooled_accuracy']:.2f} | {r['pooled_mae']:.2f} "
                f"| {r['wall_s']:.0f} s |"
            )
    else:
        print(json.dumps(result["methods"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
