"""Donor-level learning on semi-synthetic donor tasks: donor model vs two anchors.

The tasks are built from public cells. Donors: ``--donors`` pseudo-donors (default 40) of
``--cells-per-donor`` cells (150) drawn with replacement from ``../shared/data/pbmc3k_raw.h5ad``
with a Dirichlet cell-type composition (``--composition-alpha`` 100: donors differ in
composition) and binomial thinning (0.9). Donor ``d`` has stage ``d % 4`` (0 < 1 < 2 < 3).
The "disease" state is a **measured** program: the ``--program-genes`` (50) genes that differ
most between blood and tumour-infiltrating T cells of ``../shared/data/wu2020_200_raw.h5ad``
(Wu et al. 2020), with their measured fold changes (``--shift`` 1: as measured; median
change about 6-fold, mostly up: heat-shock and immediate-early genes, RGS1, CCL4, LAG3 ...).
A stage-dependent fraction of one cell type's cells moves into that state (``make_donor_task``:
up genes get Poisson counts so the type's mean moves by the measured ratio, down genes are
thinned):

* ``--task strong``: CD4 T cells (43% of the cells), fractions 0 / 15 / 30 / 45% (+- 5%):
  about 10% of all cells affected, pseudo-bulk strong;
* ``--task minority``: CD8 T cells (12% of the cells), fractions 0 / 13 / 27 / 40%: about 2%
  of all cells affected (at most 5% in a donor), pseudo-bulk fades.

Five donor splits (folds stratified by stage: fold ``i`` tests, fold ``i + 1`` validates,
the rest train) compare, with the library's defaults:

* ``donor``: :class:`~cellfm_sc.CellFMDonorClassifier` (``preset="tiny"``, random trunk:
  ``cell_view="auto"`` = the expression view), model selection on the validation donors;
* ``cell``: :class:`~cellfm_sc.CellFMClassifier` on cells with their donor's label, donors
  scored by the mean of their cells' probabilities (``--cell-epochs`` 10);
* ``pseudobulk``: :func:`cellfm_sc.baselines.pseudobulk_baseline` (per-donor summed counts ->
  CPM -> log1p, genes with mean CPM >= 10 or 100 and ``C`` chosen on the validation donors, refit on
  train + validation): what ``evaluate()`` reports beside the models.

``--variant NAME:key=value,...`` adds donor-model variants (constructor or ``train``
settings) side by side. Reported: test-donor QWK per split, pooled over the five splits'
test donors (every donor is tested once) with a 95% bootstrap interval over donors, and wall
time.

Run: ``python benchmarks/donor_level.py --task strong --markdown --json
benchmarks/results/donor_level_strong.json`` (and ``--task minority``); about 20-30 min
each on 2 busy CPU cores, most of it the cell classifier. ``--quick`` for a smoke run (tests).
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
REFERENCE = ROOT.parent / "shared" / "data" / "wu2020_200_raw.h5ad"
STAGES = ["0", "1", "2", "3"]


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------

#: the two default tasks (``--task``): the "disease" program in CD4 T cells (43% of the cells;
#: up to 45% of them) or in CD8 T cells (12% of the cells; up to 40% of them, <= 5% of all)
TASKS: dict[str, dict[str, Any]] = {
    "strong": {"cell_type": "CD4 T", "fractions": (0.0, 0.15, 0.30, 0.45)},
    "minority": {"cell_type": "CD8 T", "fractions": (0.0, 0.133, 0.267, 0.40)},
}


def _cp10k(x: Any) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float64)
    lib = np.asarray(x.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1.0)) @ x)


def measured_program(
    reference: ad.AnnData,
    key: str,
    before: str,
    after: str,
    *,
    n_genes: int = 50,
    min_detected: float = 0.25,
    pseudocount: float = 0.5,
    genes: Any = None,
) -> pd.Series:
    """The ``n_genes`` genes that differ most between two real populations, with their
    measured log2 fold changes ``after`` vs ``before``.

    Fold changes are of the mean counts per 10k (``log2((m_after + pc) / (m_before + pc))``);
    only genes detected in at least ``min_detected`` of the cells of either population (and
    among ``genes``, when given) are candidates. Returns the log2 fold changes indexed by gene.
    """
    x = sp.csr_matrix(reference.X, dtype=np.float64)
    norm = _cp10k(x)
    group = reference.obs[key].astype(str).to_numpy()
    a, b = group == before, group == after
    mean_a, mean_b = (np.asarray(norm[m].mean(axis=0)).ravel() for m in (a, b))
    det_a, det_b = (np.asarray((x[m] > 0).mean(axis=0)).ravel() for m in (a, b))
    lfc = np.log2((mean_b + pseudocount) / (mean_a + pseudocount))
    ok = np.maximum(det_a, det_b) >= min_detected
    if genes is not None:
        ok &= np.isin(np.asarray(reference.var_names), np.asarray(genes))
    order = np.argsort(-np.abs(lfc) * ok, kind="stable")[:n_genes]
    return pd.Series(lfc[order], index=np.asarray(reference.var_names)[order], name="log2fc")


def make_donor_task(
    adata: ad.AnnData,
    program: pd.Series,
    *,
    n_donors: int = 40,
    cells_per_donor: int = 150,
    composition_alpha: float = 100.0,
    thinning: float = 0.9,
    cell_type: str = "CD4 T",
    celltype_key: str = "celltype",
    fractions: tuple[float, ...] = (0.0, 0.15, 0.30, 0.45),
    jitter: float = 0.05,
    shift: float = 1.0,
    pseudocount: float = 0.5,
    seed: int = 0,
) -> tuple[ad.AnnData, np.ndarray, np.ndarray]:
    """A pseudo-donor task; returns ``(task AnnData, program gene columns, fold changes)``.

    Each donor draws ``cells_per_donor`` cells (with replacement) from ``adata`` with its own
    cell-type composition (``Dirichlet(composition_alpha * source proportions)``: donors differ
    in composition as real donors do) and a binomial thinning of the counts (each count kept
    with probability ``thinning``, so no two copies of a source cell are identical). Donor
    ``d`` has stage ``d % len(fractions)``; a fraction ``fractions[stage]`` (+- ``jitter``) of
    its ``cell_type`` cells moves into the state of ``program``: every program gene ``g``
    changes by its measured fold change ``f_g = 2 ** (shift * log2fc_g)`` (``shift=1``: the
    fold changes as measured). Up genes get ``Poisson(((mu_g + pc) f_g - pc - mu_g) * library
    / 1e4)`` extra counts (``mu_g``: the gene's mean counts per 10k in ``cell_type``, so the
    cell type's mean moves to the measured ratio), down genes are thinned binomially with
    probability ``f_g``.

    ``task.obs``: ``donor``, ``stage`` (``"0"`` .. ``"3"``, ordered), ``celltype``,
    ``affected``; ``X``: raw counts (CSR float32).
    """
    rng = np.random.default_rng(seed)
    source = sp.csr_matrix(adata.X, dtype=np.float32)
    types_all = adata.obs[celltype_key].astype(str).to_numpy()
    if cell_type not in set(types_all):
        raise ValueError(f"cell type {cell_type!r} not in obs[{celltype_key!r}]")
    kinds, type_code = np.unique(types_all, return_inverse=True)
    share = np.bincount(type_code) / type_code.size
    members = [np.flatnonzero(type_code == k) for k in range(kinds.size)]
    picks = []
    for _ in range(n_donors):
        counts = rng.multinomial(cells_per_donor, rng.dirichlet(composition_alpha * share))
        picks.append(np.concatenate([rng.choice(members[k], c) for k, c in enumerate(counts) if c]))
    rows = np.concatenate(picks)
    donor_of = np.repeat(np.arange(n_donors), [p.size for p in picks])
    x = source[rows].tocsr()
    x.data = rng.binomial(x.data.astype(np.int64), thinning).astype(np.float32)
    x.eliminate_zeros()
    n, types = x.shape[0], types_all[rows]
    stage_of_donor = np.arange(n_donors) % len(fractions)
    cols = adata.var_names.get_indexer(program.index)
    keep = cols >= 0
    cols, lfc = cols[keep], program.to_numpy()[keep]
    order = np.argsort(cols)
    cols, lfc = cols[order], lfc[order]
    target = np.flatnonzero(types == cell_type)
    affected = np.zeros(n, dtype=bool)
    for d in range(n_donors):
        f = fractions[stage_of_donor[d]]
        if f == 0:
            continue
        mine = target[donor_of[target] == d]
        f = float(np.clip(f + rng.uniform(-jitter, jitter), 0.0, 1.0))
        affected[rng.choice(mine, round(f * mine.size), replace=False)] = True
    hit = np.flatnonzero(affected)
    fold = 2.0 ** (shift * lfc)
    lib = np.asarray(x.sum(axis=1)).ravel()
    mu = np.asarray(_cp10k(source)[types_all == cell_type][:, cols].mean(axis=0)).ravel()
    before = np.asarray(x[hit][:, cols].todense())
    after = before.copy()
    up = fold > 1
    lam = ((mu[up] + pseudocount) * fold[up] - pseudocount - mu[up]).clip(0)[None, :]
    after[:, up] += rng.poisson(lam * (lib[hit] / 1e4)[:, None])
    after[:, ~up] = rng.binomial(
        before[:, ~up].astype(np.int64), np.broadcast_to(fold[~up], before[:, ~up].shape)
    )
    delta = sp.coo_matrix(after - before)
    x = (x + sp.csr_matrix((delta.data, (hit[delta.row], cols[delta.col])), shape=x.shape)).tocsr()
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
    return ad.AnnData(X=x.astype(np.float32), obs=obs, var=adata.var.copy()), cols, fold


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
    """:func:`cellfm_sc.baselines.pseudobulk_baseline` on the split (what ``evaluate()``
    reports beside the donor model)."""
    from cellfm_sc.baselines import pseudobulk_baseline

    res = pseudobulk_baseline(
        task,
        task.obs["stage"].cat.codes.to_numpy(),
        task.obs["donor"].astype(str).to_numpy(),
        train=np.flatnonzero(split == "train"),
        validation=np.flatnonzero(split == "validation"),
        test=np.flatnonzero(split == "test"),
        classes=STAGES,
        ordered=True,
    )
    table = res.donor_table
    return pd.DataFrame(
        {"true": table["true"].cat.codes, "predicted": table["predicted"].cat.codes}
    )


def run_cell(task: ad.AnnData, split: np.ndarray, args: argparse.Namespace) -> pd.DataFrame:
    from cellfm_sc import CellFMClassifier
    from cellfm_sc.data import split_from_obs

    task = task.copy()
    task.obs["split"] = split
    CellFMClassifier.setup_anndata(task, labels_key="stage", donor_key="donor", label_order=STAGES)
    model = CellFMClassifier(task, preset=args.preset, max_tokens=args.max_tokens, seed=args.seed)
    model.train(
        max_epochs=args.cell_epochs,
        split=split_from_obs(task, "split", donor_key="donor"),
        enable_progress_bar=False,
        logger=False,
    )
    table = model.evaluate(baseline=False).donor_table
    return pd.DataFrame(
        {"true": table["true"].cat.codes, "predicted": table["predicted"].cat.codes}
    )


#: the donor model's settings given on the command line (None: the library's default)
_DONOR_MODEL = (
    "max_tokens",
    "trainable",
    "bag_size",
    "pooling",
    "cell_view",
    "expression_genes",
    "expression_dim",
    "dropout",
    "loss",
)
_DONOR_TRAIN = ("epochs", "lr", "bags_per_step", "cell_loss_weight", "monitor")


def donor_options(args: argparse.Namespace) -> dict[str, Any]:
    """``CellFMDonorClassifier(...)`` keywords given (the others stay the library's)."""
    return {k: getattr(args, k) for k in _DONOR_MODEL if getattr(args, k) is not None}


def donor_train_options(args: argparse.Namespace) -> dict[str, Any]:
    """``train(...)`` keywords given."""
    names = {"epochs": "max_epochs", "bags_per_step": "batch_size"}
    return {names.get(k, k): getattr(args, k) for k in _DONOR_TRAIN if getattr(args, k) is not None}


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
    model = CellFMDonorClassifier(task, preset=args.preset, seed=args.seed, **donor_options(args))
    model.train(
        split=split_from_obs(task, "split", donor_key="donor"),
        enable_progress_bar=False,
        logger=False,
        **donor_train_options(args),
    )
    table = model.evaluate(n_bootstrap=0, baseline=False).donor_table
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


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (numbers parsed)."""
    name, _, rest = spec.partition(":")
    out: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for kind in (int, float):
            try:
                out[key.replace("-", "_")] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key.replace("-", "_")] = value
    return name, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--reference", default=str(REFERENCE), help="the program's two populations")
    p.add_argument("--task", choices=sorted(TASKS), default="strong")
    p.add_argument("--methods", default="pseudobulk,cell,donor")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run a donor-model variant, e.g. 'mean:pooling=mean' (repeatable)",
    )
    p.add_argument("--donors", type=int, default=40)
    p.add_argument("--cells-per-donor", type=int, default=150)
    p.add_argument("--composition-alpha", type=float, default=100.0)
    p.add_argument("--splits", default="0,1,2,3,4", help="which of the 5 splits to run")
    p.add_argument("--fractions", default=None, help="default: the task's")
    p.add_argument("--cell-type", default=None, help="default: the task's")
    p.add_argument("--jitter", type=float, default=0.05)
    p.add_argument("--shift", type=float, default=1.0, help="x the measured log fold changes")
    p.add_argument("--program-genes", type=int, default=50)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--cell-epochs", type=int, default=10, help="the cell classifier's epochs")
    # the donor model: None = the library's default
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--trainable", default=None)
    p.add_argument("--bag-size", type=int, default=None)
    p.add_argument("--pooling", default=None)
    p.add_argument("--cell-view", default=None)
    p.add_argument("--expression-genes", type=int, default=None)
    p.add_argument("--expression-dim", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--bags-per-step", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--cell-loss-weight", type=float, default=None)
    p.add_argument("--monitor", default=None)
    p.add_argument("--loss", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="print the donor model's history")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    source = ad.read_h5ad(args.data)
    reference = ad.read_h5ad(args.reference)
    task_spec = dict(TASKS[args.task])
    if args.cell_type is not None:
        task_spec["cell_type"] = args.cell_type
    if args.fractions is not None:
        task_spec["fractions"] = tuple(float(f) for f in args.fractions.split(","))
    if args.quick:
        keep = np.random.default_rng(0).choice(source.n_obs, 480, replace=False)
        source = source[np.sort(keep)].copy()
        args.donors, args.cells_per_donor, args.splits = 12, 20, "0"
        args.epochs, args.cell_epochs, args.max_tokens = 2, 1, 32
        args.expression_genes = args.expression_genes or 200
    program = measured_program(
        reference, "source", "Blood", "Tumor", n_genes=args.program_genes, genes=source.var_names
    )
    task, _, fold = make_donor_task(
        source,
        program,
        n_donors=args.donors,
        cells_per_donor=args.cells_per_donor,
        composition_alpha=args.composition_alpha,
        jitter=args.jitter,
        shift=args.shift,
        seed=args.seed,
        **task_spec,
    )
    variants = dict(parse_variant(v) for v in args.variant)
    for name, spec in variants.items():
        unknown = sorted(set(spec) - set(_DONOR_MODEL) - set(_DONOR_TRAIN))
        if unknown:
            raise SystemExit(f"variant {name!r}: unknown setting(s) {unknown}")
    k = 5
    folds = donor_folds(task, k, args.seed)
    methods = [m for m in args.methods.split(",") if m] + [f"donor:{v}" for v in variants]
    splits = [int(s) for s in args.splits.split(",")]
    tables: dict[str, list[pd.DataFrame]] = {m: [] for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    from cellfm_sc.metrics import quadratic_weighted_kappa

    for i in splits:
        split = split_column(task, folds, i, k)
        for m in methods:
            t0 = time.perf_counter()
            if m == "pseudobulk":
                table = run_pseudobulk(task, split)
            elif m == "cell":
                table = run_cell(task, split, args)
            elif m == "donor":
                table, _ = run_donor(task, split, args)
            elif m.startswith("donor:"):
                v_args = argparse.Namespace(**{**vars(args), **variants[m[len("donor:") :]]})
                table, _ = run_donor(task, split, v_args)
            else:
                raise SystemExit(f"unknown method {m!r}")
            seconds[m] += time.perf_counter() - t0
            tables[m].append(table)
            q = quadratic_weighted_kappa(table["true"], table["predicted"], n_classes=4)
            print(f"split {i} {m:<24} QWK {q:.3f} ({seconds[m]:.0f} s so far)", file=sys.stderr)
    types = task.obs["celltype"].astype(str)
    result = {
        "task": {
            "name": args.task,
            "source": os.path.basename(args.data),
            "program": f"{args.program_genes} genes, Blood -> Tumor T cells of "
            f"{os.path.basename(args.reference)}, measured fold changes x {args.shift}",
            "program_genes": program.index[np.isin(program.index, task.var_names)].tolist(),
            "median_abs_fold_change": float(2 ** np.median(np.abs(np.log2(fold)))),
            "cells": int(task.n_obs),
            "donors": int(args.donors),
            "cell_type": task_spec["cell_type"],
            "cell_type_share": float((types == task_spec["cell_type"]).mean()),
            "fractions": list(task_spec["fractions"]),
            "affected_cells": int(task.obs["affected"].sum()),
            "affected_share": float(task.obs["affected"].mean()),
            "affected_share_max_donor": float(
                task.obs.groupby("donor", observed=True)["affected"].mean().max()
            ),
        },
        "settings": {
            k_: v for k_, v in vars(args).items() if k_ not in ("json", "markdown", "quick")
        },
        "variants": variants,
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
