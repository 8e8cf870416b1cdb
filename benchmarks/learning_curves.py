"""Learning curves of the classifier recipe: old defaults vs new defaults vs logistic regression.

Run: ``python benchmarks/learning_curves.py [--fractions 0.1 1.0] [--seeds 0 1 2]
[--max-tokens 512] [--threads 2] [--markdown] [--out results.jsonl]``.

Data: pbmc3k (``../shared/data/pbmc3k_raw.h5ad``, raw counts, ``obs["celltype"]``, 8 types).
A fixed held-out test set (20% of the cells, stratified by cell type, seed 0) is never used for
training or model selection. Of the other cells, a stratified ``fraction`` (per seed) is
labelled; every method sees exactly these labelled cells:

- ``old``: the original scripts' recipe, passed explicitly: ``trainable="encoder+head"``,
  ``lr=1e-4``, ``lr_schedule="step"``, ``monitor="validation_acc"``, early stopping on,
  ``patience=3``, ``max_epochs=5``, ``batch_size=16``.
- ``new``: ``CellFMClassifier(adata, preset="tiny", seed=s)`` and ``train()`` with only what a
  user passes (the split, no progress bar, and ``--batch-size`` when given).
- ``logreg``: ``normalize_total(1e4)`` + ``log1p`` of the counts, then
  ``sklearn.linear_model.LogisticRegression(max_iter=1000)`` fitted on all labelled cells.

The CellFM runs get the labelled cells as an explicit split: 90% train, 10% validation
(stratified, seed s; the validation cells choose the kept weights), test = the held-out cells.
Extra CellFM configurations on top of the new defaults: ``--variant NAME:key=value,...``
(``key`` a ``train()`` argument, or ``init.key`` a constructor argument), e.g.
``--variant es_on:early_stopping=True``.

Score: macro-F1 (``sklearn.metrics.f1_score``, all 8 classes, ``zero_division=0``) on the
held-out cells; wall time = model construction + training + prediction (logreg:
normalisation + fit + prediction). ``max_tokens`` is 512 here by default for time on a 2-core
machine (pbmc3k cells have 847 expressed genes on average, so most cells are sub-sampled);
the library default stays 2048.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO.parent / "shared" / "data" / "pbmc3k_raw.h5ad"
LABELS = "celltype"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1

OLD_INIT = {"trainable": "encoder+head"}
OLD_TRAIN = {
    "lr": 1e-4,
    "lr_schedule": "step",
    "monitor": "validation_acc",
    "early_stopping": True,
    "patience": 3,
    "max_epochs": 5,
    "batch_size": 16,
}


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def stratified_subset(
    idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int, leave_one: bool = False
) -> np.ndarray:
    """Sorted rows: ``round(fraction * n_k)`` (at least 1) random rows of each class ``k``.

    With ``leave_one`` at least one row of each class stays out of the subset (a class with
    a single row contributes none): a validation subset never takes a class's only
    training cell.
    """
    if fraction >= 1.0:
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels[idx]):
        rows = idx[labels[idx] == k]
        n = max(1, round(fraction * len(rows)))
        if leave_one:
            n = min(n, len(rows) - 1)
        keep.append(rng.choice(rows, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def heldout(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, test)`` rows: a fixed stratified 20% test set (seed 0), the rest the pool."""
    all_rows = np.arange(len(labels))
    test = stratified_subset(all_rows, labels, TEST_FRACTION, seed=0)
    return np.setdiff1d(all_rows, test), test


def labelled_split(
    labels: np.ndarray, pool: np.ndarray, test: np.ndarray, fraction: float, seed: int
):
    """``DataSplit`` of the labelled cells (90/10 train/validation) with the held-out test."""
    from cellfm_sc.data import DataSplit

    labelled = stratified_subset(pool, labels, fraction, seed)
    validation = stratified_subset(
        labelled, labels, VALIDATION_FRACTION, seed + 1000, leave_one=True
    )
    train = np.setdiff1d(labelled, validation)
    return DataSplit(train=train, validation=validation, test=test, labels_key=LABELS)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0))


def run_logreg(adata: Any, labels: np.ndarray, split: Any) -> dict[str, Any]:
    """Logistic regression on log-normalised counts of the labelled (train + validation) cells."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    size = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(1e4 / np.maximum(size, 1e-12)) @ x
    x.data = np.log1p(x.data)
    fit_rows = np.sort(np.concatenate([split.train, split.validation]))
    clf = LogisticRegression(max_iter=1000).fit(x[fit_rows], labels[fit_rows])
    pred = clf.predict(x[split.test])
    wall = time.perf_counter() - t0
    return {"macro_f1": macro_f1(labels[split.test], pred, CLASSES), "wall_s": wall}


def run_cellfm(
    adata: Any,
    labels: np.ndarray,
    split: Any,
    seed: int,
    max_tokens: int,
    init: dict[str, Any],
    train: dict[str, Any],
    trace: bool = False,
) -> dict[str, Any]:
    from cellfm_sc import CellFMClassifier

    t0 = time.perf_counter()
    model = CellFMClassifier(adata, preset="tiny", seed=seed, max_tokens=max_tokens, **init)
    extra = {}
    if trace:
        extra["callbacks"] = [_test_trace(model, labels, split.test)]
    model.train(split=split, enable_progress_bar=False, **train, **extra)
    pred = model.predict(indices=split.test, batch_size=128)
    wall = time.perf_counter() - t0
    s = model.train_settings_
    hist = model.history
    return {
        "macro_f1": macro_f1(labels[split.test], pred.astype(str), CLASSES),
        "wall_s": wall,
        "epochs_run": int(hist["epoch"].max()),
        "best_epoch": None if model.best_epoch_ is None else int(model.best_epoch_),
        "monitor": s["monitor"],
        "early_stopping": s["early_stopping"],
        "lr": s["lr"],
        "lr_schedule": s["lr_schedule"],
        "max_epochs": s["max_epochs"],
        "batch_size": s["batch_size"],
        "trainable": s["trainable"],
        "validation_macro_f1": [float(v) for v in hist.get("validation_macro_f1", [])],
        "validation_loss": [float(v) for v in hist.get("validation_loss", [])],
        "validation_acc": [float(v) for v in hist.get("validation_acc", [])],
        "test_macro_f1_per_epoch": extra["callbacks"][0].scores if trace else None,
    }


def _test_trace(model: Any, labels: np.ndarray, test: np.ndarray) -> Any:
    """A callback that scores the held-out cells after every validation run (exploration
    only: it reads the test cells, so it never chooses anything; ``--trace``)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class TestTrace(Callback):
        def __init__(self) -> None:
            self.scores: list[float] = []

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            with torch.no_grad():
                # mid-training: the model is not marked trained until train() returns
                pred = model.predict(indices=test, batch_size=128, allow_untrained=True)
            self.scores.append(macro_f1(labels[test], pred.astype(str), CLASSES))

    return TestTrace()


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def table(rows: list[dict[str, Any]], configs: list[str], markdown: bool) -> str:
    fractions = sorted({r["fraction"] for r in rows})
    head = ["labels", "train / val cells"]
    for c in configs:
        head += [f"{c} macro-F1", f"{c} s"]
    if "new" in configs and "logreg" in configs:
        head.append("new / logreg")
    lines = []
    for f in fractions:
        sel = [r for r in rows if r["fraction"] == f]
        sizes = sorted({(r["n_train"], r["n_validation"]) for r in sel})
        line = [f"{100 * f:g}%", ", ".join(f"{a} / {b}" for a, b in sizes[:1])]
        means = {}
        for c in configs:
            got = [r for r in sel if r["config"] == c]
            if not got:
                line += ["-", "-"]
                continue
            f1 = [r["macro_f1"] for r in got]
            means[c] = float(np.mean(f1))
            extra = ""
            if "epochs_run" in got[0]:
                extra = f" ({'/'.join(str(r['epochs_run']) for r in got)} ep)"
            line += [
                _mean_sd(f1) + f" (n={len(got)})",
                f"{np.mean([r['wall_s'] for r in got]):.0f}{extra}",
            ]
        if "new / logreg" in head:
            ok = "new" in means and "logreg" in means
            line.append(f"{means['new'] / means['logreg']:.3f}" if ok else "-")
        lines.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [head, *lines])


def _chosen_epoch(scores: list[float], mode: str, patience: int | None) -> int:
    """0-based epoch whose weights are kept: the best ``scores`` (strictly better only, as
    ``BestStateCallback``) among the epochs run before early stopping with ``patience``
    (Lightning's ``EarlyStopping``, ``min_delta=0``; None = off) would stop."""
    best, best_i, wait = None, 0, 0
    for i, v in enumerate(scores):
        better = best is None or (v < best if mode == "min" else v > best)
        if better:
            best, best_i, wait = v, i, 0
        else:
            wait += 1
            if patience is not None and wait >= patience:
                break
    return best_i


MONITOR_TRACES = {
    "loss": ("validation_loss", "min"),
    "acc": ("validation_acc", "max"),
    "f1": ("validation_macro_f1", "max"),
}


def analyse(
    rows: list[dict[str, Any]],
    patiences: tuple[int | None, ...] = (None, 3),
    markdown: bool = False,
) -> str:
    """Held-out macro-F1 of the weights each rule would have kept, per traced run, and the
    mean per (config, labels): ``last`` (no selection), ``oracle`` (best epoch on the test
    cells, a bound), and each monitor without / with early stopping (``es3`` = patience 3).
    Exact: early stopping only truncates a run, and the kept weights are one epoch's."""
    rules = ["last", "oracle"] + [
        f"{m}{'' if pat is None else f' es{pat}'}" for m in MONITOR_TRACES for pat in patiences
    ]
    scored: dict[tuple[str, float], list[list[float]]] = {}
    lines = []
    for r in rows:
        test = r.get("test_macro_f1_per_epoch")
        if not test:
            continue
        picks = [len(test) - 1, int(np.argmax(test))]
        for key, mode in MONITOR_TRACES.values():
            picks += [_chosen_epoch(r[key], mode, pat) for pat in patiences]
        scored.setdefault((r["config"], r["fraction"]), []).append([test[i] for i in picks])
        lines.append(
            [r["config"], f"{100 * r['fraction']:g}%", str(r["seed"])]
            + [f"{test[i]:.3f} ({i + 1})" for i in picks]
        )
    for (config, fraction), values in scored.items():
        mean = np.mean(values, axis=0)
        lines.append([config, f"{100 * fraction:g}%", f"mean of {len(values)}"])
        lines[-1] += [f"{v:.3f}" for v in mean]
    head = ["config", "labels", "seed", *rules]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [head, *lines])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _parse_variant(text: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    name, _, body = text.partition(":")
    init: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key.startswith("init."):
            init[key[5:]] = value
        else:
            train[key] = value
    return name, init, train


CLASSES: list[str] = []
_STATE: dict[str, Any] = {}


def _init_worker(data: str, threads: int) -> None:
    """Load the data once per process; quiet the libraries; fix torch's thread count."""
    import anndata as ad
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "cellfm_sc", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from cellfm_sc import CellFMClassifier

    adata = ad.read_h5ad(data)
    labels = adata.obs[LABELS].astype(str).to_numpy()
    CLASSES[:] = sorted(set(labels))
    CellFMClassifier.setup_anndata(adata, labels_key=LABELS)
    _STATE.update(adata=adata, labels=labels, heldout=heldout(labels))


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One method on one (fraction, seed): a result row."""
    adata, labels = _STATE["adata"], _STATE["labels"]
    pool, test = _STATE["heldout"]
    fraction, seed, spec = task["fraction"], task["seed"], task["spec"]
    split = labelled_split(labels, pool, test, fraction, seed)
    if spec is None:
        res = run_logreg(adata, labels, split)
    else:
        res = run_cellfm(adata, labels, split, seed, task["max_tokens"], *spec, trace=task["trace"])
    return {
        "config": task["config"],
        "fraction": fraction,
        "seed": seed,
        "n_train": len(split.train),
        "n_validation": len(split.validation),
        "n_test": len(split.test),
        "max_tokens": task["max_tokens"],
        "threads": task["threads"],
        "jobs": task["jobs"],
        **res,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(PBMC))
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="*", default=["old", "new", "logreg"])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,...")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="batch size passed to 'new'")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--table-from", default=None, help="only print the table of a JSONL file")
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also score the held-out cells after every epoch (exploration of monitors, "
        "early stopping and epochs; never used to choose weights)",
    )
    args = p.parse_args(argv)

    if args.table_from:
        rows = [json.loads(x) for x in Path(args.table_from).read_text().splitlines() if x]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        print(table(rows, configs, args.markdown))
        if any(r.get("test_macro_f1_per_epoch") for r in rows):
            print()
            print(analyse(rows, markdown=args.markdown))
        return 0

    import torch

    new_train: dict[str, Any] = {}
    if args.batch_size is not None:
        new_train["batch_size"] = args.batch_size
    configs: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {}
    for c in args.configs:
        configs[c] = {"old": (OLD_INIT, OLD_TRAIN), "new": ({}, new_train), "logreg": None}[c]
    for text in args.variant:
        name, init, train = _parse_variant(text)
        configs[name] = (init, {**new_train, **train})
    common = {"max_tokens": args.max_tokens, "trace": args.trace}
    common.update(threads=args.threads, jobs=args.jobs)
    tasks = [
        {"config": name, "spec": spec, "fraction": f, "seed": seed, **common}
        for f in args.fractions
        for seed in args.seeds
        for name, spec in configs.items()
    ]
    # longest first (most labelled cells, CellFM before logistic regression): even load
    tasks.sort(key=lambda t: (-t["fraction"], t["spec"] is None))
    print(
        f"pbmc3k: {len(tasks)} runs, {args.jobs} at a time; max_tokens={args.max_tokens}, "
        f"torch threads {args.threads} per run, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, _init_worker, (args.data, args.threads)) as pool:
            results = pool.imap_unordered(_run_task, tasks)
            rows = [_report(row, args.out) for row in results]
    else:
        _init_worker(args.data, args.threads)
        rows = [_report(_run_task(task), args.out) for task in tasks]
    print(f"total wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows, list(configs), args.markdown))
    return 0


def _report(row: dict[str, Any], out: str | None) -> dict[str, Any]:
    brief = {k: row[k] for k in ("epochs_run", "best_epoch", "monitor") if k in row}
    print(
        f"{row['config']:>10} labels {100 * row['fraction']:g}% seed {row['seed']}: macro-F1 "
        f"{row['macro_f1']:.3f}, {row['wall_s']:.0f} s {brief}",
        file=sys.stderr,
        flush=True,
    )
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    raise SystemExit(main())
