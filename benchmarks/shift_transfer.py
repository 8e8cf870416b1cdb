"""Does a pretrained start transfer to shifted data? Fine-tune on one condition, test on another.

The task (semi-synthetic, fixed before any model was run on it):

* pbmc3k (8 cell types), the split of ``pretraining_transfer.py``: 20% of the cells held out
  for testing (stratified, fixed), of the rest 1%, 10% or 100% labelled (stratified, >= 1
  per class), 3 label draws (seeds). The labelled cells are always unshifted.
* Two test sets of the same 540 held-out cells: **same** (as they are) and **shifted**: what a
  perturbation measured by another lab does to them (:func:`shift_cells`):

  1. an interferon response: 50 canonical type-I interferon-stimulated genes
     (:data:`ISG_PROGRAM`; ISG15, IFI6, IFIT1-3, MX1, OAS1-3, ...) each get extra counts
     ``Poisson(s_i * total_i * (fc_g - 1) * max(mean share of g, 1e-5))``, ``fc_g = 2 **
     U(2, 5)`` per gene (4-32x), response strength ``s_i ~ Beta(5, 2)`` per cell (IFN-beta
     stimulation reaches nearly every PBMC, as in Kang et al. 2018);
  2. another lab's capture: every count is thinned binomially with a per-gene efficiency
     ``0.5 * exp(N(0, 0.3^2))`` (clipped at 1): half the depth, and genes captured
     differently by another chemistry.

  Seeds of the shift are fixed (``--shift-seed``), the same for every method.
* Pretraining: ``pretraining_transfer.pretrain`` on the unlabelled public corpus (Liao 2020
  BALF, Delorey 2021 lung, pbmc3k without labels: 15,192 cells, no shifted cell), tiny
  preset, ``max_tokens=256``, with two probes scored after every epoch on labelled cells of
  the training pool (never the test cells): ``same`` (kNN, 5-fold cross-validation on 1,000
  pool cells) and ``shifted`` (kNN fit on 1,000 pool cells, scored on the other pool cells,
  shifted). The checkpoint is cached in ``OUT/pretrained-SAMPLING`` (``--corpus-sampling``,
  default balanced).
* Methods, side by side in one run: ``random`` (``CellFMClassifier(preset="tiny")``,
  defaults), pretrained starts with each ``--recipes`` entry (``CellFMClassifier(checkpoint=,
  vocabulary_file=, embedding_init="transfer").train(recipe=...)``), ``logreg`` (logistic
  regression on log-normalised counts). Score: macro-F1 on each test set.
* ``--dev``: choose a recipe without touching the test cells: the pool is split again (20%
  of it scored, the rest labelled at ``--fractions``), both test sets are built from the
  scored pool cells.

Run (2 busy CPU cores, 1 torch thread)::

    # pretraining once (about 1-2 h), cached
    python benchmarks/shift_transfer.py --out bench_out/shift --pretrain-only
    # recipe probe, 1 seed, 10% labels, dev cells only
    python benchmarks/shift_transfer.py --out bench_out/shift --dev --seeds 0 \\
        --fractions 0.1 --recipes full lp-ft llrd lp-ft+llrd frozen-rows
    # the full run: 3 seeds, 1/10/100% labels, both test sets
    python benchmarks/shift_transfer.py --out bench_out/shift --markdown

Results go to ``OUT/results[-dev].jsonl`` (one line per run and test set); ``--markdown``
prints the table of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_transfer as pt

#: canonical type-I interferon-stimulated genes (the core of the IFN-alpha/beta response)
ISG_PROGRAM = (
    "ISG15", "IFI6", "IFI27", "IFIT1", "IFIT2", "IFIT3", "IFIT5", "MX1", "MX2", "OAS1",
    "OAS2", "OAS3", "OASL", "RSAD2", "IFI44", "IFI44L", "IFITM1", "IFITM2", "IFITM3", "LY6E",
    "HERC5", "HERC6", "EPSTI1", "XAF1", "STAT1", "STAT2", "IRF7", "IRF9", "ISG20", "SAMD9L",
    "CMPK2", "IFI35", "PLSCR1", "BST2", "TNFSF10", "GBP1", "SP110", "PARP9", "DDX58", "IFIH1",
    "USP18", "LGALS9", "CXCL10", "APOBEC3A", "TRIM22", "EIF2AK2", "DDX60", "RTP4", "SIGLEC1",
    "LAMP3",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=pt.DATA)
    p.add_argument("--out", type=Path, required=True, help="working folder (reused if present)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--pretrain-epochs", type=int, default=16)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", default="auto")
    p.add_argument("--corpus-sampling", default="balanced", choices=["proportional", "balanced"])
    p.add_argument(
        "--pretrain-depth-augmentation",
        type=float,
        default=None,
        help="CellFMPretrainer.train(depth_augmentation=); default: its default (another "
        "value adds -depthP to the folder name)",
    )
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="folder with cellfm.ckpt + gene_info.csv (default: OUT/pretrained-SAMPLING)",
    )
    p.add_argument("--pretrain-only", action="store_true", help="pretrain (cached), then stop")
    p.add_argument("--shift-seed", type=int, default=2018)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", default="0.01:60,0.1:20,1.0:5")
    p.add_argument(
        "--recipes",
        nargs="*",
        default=["auto"],
        help="pretrained-start recipes (names of CellFMClassifier.train(recipe=)), and "
        "--variant names",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:key=value,...",
        help="a run with other settings (keys of CellFMClassifier, train or FinetuneRecipe; "
        "start=random for a random start, default the pretrained one)",
    )
    p.add_argument("--no-random", action="store_true", help="skip the random start")
    p.add_argument("--no-logreg", action="store_true", help="skip logistic regression")
    p.add_argument("--dev", action="store_true", help="score pool cells, never the test cells")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also score each part of the shift alone (program only, capture only)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--probe-table",
        type=Path,
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="print the probe-per-epoch table of these pretrained folders and stop",
    )
    args = p.parse_args(argv)
    args.validation = 0.0
    args.keep_epochs = True
    return args


# --------------------------------------------------------------------------------------------
# the shift
# --------------------------------------------------------------------------------------------


def shift_cells(
    adata: Any, rows: np.ndarray, seed: int = 2018, program: bool = True, capture: bool = True
) -> Any:
    """A copy of ``adata[rows]`` as a perturbation measured by another lab would give it.

    Raw counts in, raw counts out (CSR int): an interferon program (:data:`ISG_PROGRAM`,
    fold changes 4-32x per gene, response strength Beta(5, 2) per cell), then per-gene
    binomial thinning at ``0.5 * exp(N(0, 0.3^2))`` (depth halved, capture biased per gene).
    The gene-level draws depend on ``seed`` only, the cell-level ones on ``seed`` and the
    cell's obs name, so a cell is shifted the same way in every run. ``program=False`` /
    ``capture=False`` leave one part out (to see which part a model is sensitive to).
    """
    import anndata as ad
    import scipy.sparse as sp

    x_all = sp.csr_matrix(adata.X)
    totals_all = np.asarray(x_all.sum(1)).ravel()
    share = np.asarray(x_all.multiply(1.0 / totals_all[:, None]).mean(0)).ravel()
    genes = np.asarray(adata.var_names)
    gene_rng = np.random.default_rng([seed, 1])
    isg = np.flatnonzero(np.isin(genes, ISG_PROGRAM))
    fold = 2.0 ** gene_rng.uniform(2.0, 5.0, size=isg.size)
    efficiency = np.minimum(0.5 * np.exp(gene_rng.normal(0.0, 0.3, size=genes.size)), 1.0)

    x = sp.csr_matrix(x_all[rows], dtype=np.int64)
    totals = totals_all[rows]
    names = np.asarray(adata.obs_names[rows])
    strength = np.empty(len(rows))
    for i, name in enumerate(names):
        key = int.from_bytes(str(name).encode()[:16].ljust(16, b"\0"), "little")
        strength[i] = np.random.default_rng([seed, 2, key]).beta(5.0, 2.0)
    lam = strength[:, None] * totals[:, None] * (fold - 1.0) * np.maximum(share[isg], 1e-5)
    cell_rng = np.random.default_rng([seed, 3, len(rows)])
    extra = cell_rng.poisson(lam)
    thinned = cell_rng  # the same draws whichever parts are on
    if program:
        x = x.tolil()
        x[:, isg] = x[:, isg].toarray() + extra
        x = x.tocsr()
    x.data = thinned.binomial(x.data, efficiency[x.indices] if capture else 1.0)
    x.eliminate_zeros()
    out = ad.AnnData(X=x.astype(np.float32), obs=adata.obs.iloc[rows].copy(), var=adata.var.copy())
    out.obs["condition"] = "shifted"
    return out


def shift_summary(same: Any, shifted: Any) -> dict[str, float]:
    """Median counts per cell, and the share of counts in the program, before and after."""
    import scipy.sparse as sp

    def facts(a: Any) -> tuple[float, float]:
        x = sp.csr_matrix(a.X)
        tot = np.asarray(x.sum(1)).ravel()
        prog = np.isin(np.asarray(a.var_names), ISG_PROGRAM)
        return float(np.median(tot)), float(np.asarray(x[:, prog].sum(1)).ravel().sum() / tot.sum())

    (m0, p0), (m1, p1) = facts(same), facts(shifted)
    return {
        "median_counts": m0,
        "median_counts_shifted": m1,
        "isg_share": p0,
        "isg_share_shifted": p1,
    }


# --------------------------------------------------------------------------------------------
# splits and pretraining
# --------------------------------------------------------------------------------------------


def test_rows(adata: Any) -> np.ndarray:
    """The fixed 20% test cells of ``pretraining_transfer.pbmc_split``."""
    return pt.pbmc_split(adata, 1.0, 0).test


def dev_split(adata: Any, fraction: float, seed: int) -> Any:
    """Within the training pool: a fixed 20% scored (stratified), ``fraction`` of the rest
    labelled; the test cells are in neither."""
    from cellfm_sc.data import DataSplit

    labels = adata.obs["celltype"].astype(str).to_numpy()
    pool = np.setdiff1d(np.arange(adata.n_obs), test_rows(adata))
    fixed = np.random.default_rng(54321)
    scored, rest = [], []
    for c in np.unique(labels[pool]):
        idx = fixed.permutation(pool[labels[pool] == c])
        n = round(0.2 * idx.size)
        scored.extend(idx[:n])
        rest.extend(idx[n:])
    rest = np.asarray(rest)
    rng = np.random.default_rng(seed)
    labelled = []
    for c in np.unique(labels[rest]):
        idx = rng.permutation(rest[labels[rest] == c])
        labelled.extend(idx[: max(1, round(fraction * idx.size))])
    empty = np.zeros(0, np.int64)
    return DataSplit(np.sort(np.asarray(labelled)), empty, np.sort(np.asarray(scored)))


def make_probes(pbmc: Any, seed: int) -> dict[str, Any]:
    """The two pretraining probes, on training-pool cells only."""
    from cellfm_sc import EmbeddingProbe

    pool = np.setdiff1d(np.arange(pbmc.n_obs), test_rows(pbmc))
    rng = np.random.default_rng(777)
    perm = rng.permutation(pool)
    n_fit = min(1000, len(pool) // 2)
    fit, other = np.sort(perm[:n_fit]), np.sort(perm[n_fit:])
    fit_data = pbmc[fit].copy()
    return {
        "same": EmbeddingProbe(fit_data, "celltype", max_cells=1000),
        "shifted": EmbeddingProbe(
            fit_data, "celltype", test=shift_cells(pbmc, other, seed), max_cells=1000
        ),
    }


def pretrained_folder(args: argparse.Namespace) -> Path:
    if args.pretrained is not None:
        return args.pretrained
    import inspect

    from cellfm_sc import CellFMPretrainer

    default = inspect.signature(CellFMPretrainer.train).parameters["depth_augmentation"].default
    depth = args.pretrain_depth_augmentation
    tag = "" if depth is None or depth == default else f"-depth{depth:g}"
    return args.out / f"pretrained-{args.corpus_sampling}{tag}"


# --------------------------------------------------------------------------------------------
# fine-tuning and scoring
# --------------------------------------------------------------------------------------------


def logistic_regression(train: Any, tests: dict[str, Any]) -> dict[str, float]:
    """Log-normalised counts + logistic regression; macro-F1 on each test AnnData."""
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def lognorm(a: Any) -> Any:
        a = a.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return a.X

    clf = LogisticRegression(max_iter=2000)
    clf.fit(lognorm(train), train.obs["celltype"].astype(str).to_numpy())
    return {
        name: float(
            f1_score(
                t.obs["celltype"].astype(str).to_numpy(), clf.predict(lognorm(t)), average="macro"
            )
        )
        for name, t in tests.items()
    }


#: --variant keys that change the recipe (the fields of FinetuneRecipe)
def _recipe_keys() -> set[str]:
    import dataclasses

    from cellfm_sc.nn import FinetuneRecipe

    return {f.name for f in dataclasses.fields(FinetuneRecipe)} - {"name"}


def finetune(
    pbmc: Any,
    split: Any,
    tests: dict[str, Any],
    start: str,
    recipe: str,
    extra: dict[str, Any],
    ckpt: Path,
    vocab: Path,
    args: argparse.Namespace,
    epochs: int,
    seed: int,
) -> dict[str, Any]:
    from cellfm_sc import CellFMClassifier

    extra = dict(extra)
    epochs = extra.pop("max_epochs", epochs)
    init_keys = {"trainable", "head_hidden", "dropout", "max_tokens", "embedding_init"}
    init = {k: v for k, v in extra.items() if k in init_keys}
    recipe_keys = _recipe_keys()
    tweaks = {k: v for k, v in extra.items() if k in recipe_keys}
    train = {k: v for k, v in extra.items() if k not in init_keys | recipe_keys}
    init.setdefault("max_tokens", args.max_tokens)
    adata = pbmc.copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    if start == "random":
        model = CellFMClassifier(adata, preset=args.preset, seed=seed, **init)
    else:
        from cellfm_sc.nn.trainable import resolve_recipe

        init.setdefault("embedding_init", "transfer")
        model = CellFMClassifier(adata, checkpoint=ckpt, vocabulary_file=vocab, seed=seed, **init)
        if tweaks:
            train["recipe"] = resolve_recipe(recipe, pretrained=True).replace(**tweaks)
        else:
            train["recipe"] = recipe
    started = time.perf_counter()
    model.train(max_epochs=epochs, split=split, logger=False, enable_progress_bar=False, **train)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "seconds": seconds,
        "lr": model.train_settings_["lr"],
        "recipe": model.train_settings_.get("recipe"),
        "train_loss": float(model.history["train_loss"].iloc[-1]),
    }
    for name, t in tests.items():
        result = model.evaluate(adata=t, indices=np.arange(t.n_obs))
        out[f"macro_f1_{name}"] = float(result.cell_metrics["macro_f1"])
    return out


#: test sets of the table, in order, and how the table names them
TEST_NAMES = {
    "same": "same",
    "shifted": "shifted",
    "program": "program only",
    "capture": "capture only",
}


def table(rows: list[dict[str, Any]], configs: list[str], tests: tuple[str, ...]) -> str:
    """Macro-F1 mean ± sd over seeds: one line per label fraction and test set, one column per
    method, then the first pretrained config minus random and minus logistic regression."""
    fractions = sorted({r["fraction"] for r in rows})
    tests = tuple(t for t in tests if any(f"macro_f1_{t}" in r for r in rows))

    def name(c: str) -> str:
        recipe = next((r.get("recipe") for r in rows if r["config"] == c), None)
        start = "random" if c == "random" else "logreg" if c == "logreg" else "pretrained"
        if start != "pretrained":
            return c
        label = recipe["name"] if recipe else c
        return f"{c} (= {label})" if recipe and label != c else c

    pretrained = [c for c in configs if c not in ("random", "logreg")]
    first = pretrained[0] if pretrained else None
    head = ["labels", "test cells", *[name(c) for c in configs]]
    if first and "random" in configs:
        head.append(f"{first} - random")
    if first and "logreg" in configs:
        head.append(f"{first} - logreg")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fractions:
        n = sorted({r["n_labelled"] for r in rows if r["fraction"] == f})
        for t in tests:
            key = f"macro_f1_{t}"
            by: dict[str, list[float]] = {c: [] for c in configs}
            for r in rows:
                if r["fraction"] == f and r["config"] in by and key in r:
                    by[r["config"]].append(r[key])
            cells = [f"{100 * f:g}% ({'/'.join(map(str, n))})", TEST_NAMES.get(t, t)]
            for c in configs:
                v = by[c]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f} (n={len(v)})" if v else "")
            for other in ("random", "logreg"):
                if first and other in configs:
                    a, b = by[first], by[other]
                    cells.append(f"{np.mean(a) - np.mean(b):+.3f}" if a and b else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_table(folders: list[Path], epochs: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32)) -> str:
    """The pretraining probes and masked validation loss per epoch of pretrained folders
    (their ``pretrain.json``), side by side: one line per epoch, 3 columns per folder."""
    facts = [json.loads((f / "pretrain.json").read_text()) for f in folders]
    head = ["epoch"]
    for f in facts:
        run = f"{f['corpus_sampling']}, depth aug. {f.get('depth_augmentation', 0):g}, {f['epochs']} ep."
        head += [f"{run}: validation loss", f"{run}: probe same", f"{run}: probe shifted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = ["before"]
    for f in facts:
        probe = f.get("probe") or {}
        cells.append("")
        for name in ("probe_same_macro_f1", "probe_shifted_macro_f1"):
            v = (probe.get(name) or {}).get("initial_macro_f1")
            cells.append("" if v is None else f"{v:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
    for e in sorted({e for f in facts for e in f["history"]["epoch"] if e in epochs}):
        cells = [str(e)]
        for f in facts:
            h = f["history"]
            if e not in h["epoch"]:
                cells += ["", "", ""]
                continue
            i = h["epoch"].index(e)
            for name in ("validation_loss", "probe_same_macro_f1", "probe_shifted_macro_f1"):
                v = h.get(name, [None] * len(h["epoch"]))[i]
                cells.append("" if v is None else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_table:
        print(probe_table(args.probe_table))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import anndata as ad

    args.out.mkdir(parents=True, exist_ok=True)
    pbmc = ad.read_h5ad(args.data_dir / pt.PBMC)
    folder = pretrained_folder(args)
    ckpt, vocab = folder / "cellfm.ckpt", folder / "gene_info.csv"
    if not ckpt.is_file():
        ckpt, vocab, facts = pt.pretrain(
            args, probe=make_probes(pbmc, args.shift_seed), folder=folder
        )
        print(f"pretraining: {facts['seconds']:.0f} s", file=sys.stderr)
    if args.pretrain_only:
        return 0

    variants = pt.parse_variants(args.variant)
    epochs_of = {float(k): int(v) for k, v in (kv.split(":") for kv in args.epochs.split(","))}
    configs = ([] if args.no_random else ["random"]) + list(args.recipes)
    configs += [] if args.no_logreg else ["logreg"]
    results_file = args.out / ("results-dev.jsonl" if args.dev else "results.jsonl")
    rows, done = [], set()
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            rows.append(r)
            done.add((r["config"], r["fraction"], r["seed"]))
    if args.dev:
        scored = dev_split(pbmc, 1.0, 0).test
    else:
        scored = test_rows(pbmc)
    tests = {"same": pbmc[scored].copy(), "shifted": shift_cells(pbmc, scored, args.shift_seed)}
    if args.diagnose:
        tests["program"] = shift_cells(pbmc, scored, args.shift_seed, capture=False)
        tests["capture"] = shift_cells(pbmc, scored, args.shift_seed, program=False)
    print(json.dumps(shift_summary(tests["same"], tests["shifted"])), file=sys.stderr)
    for fraction in args.fractions:
        for seed in args.seeds:
            split = (
                dev_split(pbmc, fraction, seed) if args.dev else pt.pbmc_split(pbmc, fraction, seed)
            )
            for config in configs:
                if (config, fraction, seed) in done:
                    continue
                row: dict[str, Any] = {
                    "config": config,
                    "fraction": fraction,
                    "seed": seed,
                    "n_labelled": len(split.train),
                    "n_scored": len(scored),
                }
                if config == "logreg":
                    row.update(
                        {
                            f"macro_f1_{k}": v
                            for k, v in logistic_regression(pbmc[split.train], tests).items()
                        }
                    )
                else:
                    extra = dict(variants.get(config, {}))
                    # a variant is a pretrained start unless it says start=random
                    start = "random" if config == "random" else extra.pop("start", "pretrained")
                    recipe = extra.pop("recipe", "auto") if config in variants else config
                    row["settings"] = extra
                    row["start"] = start
                    row.update(
                        finetune(
                            pbmc,
                            split,
                            tests,
                            start,
                            recipe,
                            extra,
                            ckpt,
                            vocab,
                            args,
                            epochs_of[fraction],
                            seed,
                        )
                    )
                rows.append(row)
                with results_file.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.markdown:
        print(table([r for r in rows if r["config"] in configs], configs, tuple(tests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
