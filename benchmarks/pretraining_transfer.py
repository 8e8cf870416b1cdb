"""Does masked-value pretraining transfer? Pretrain on unlabelled cells, fine-tune on few labels.

1. Pretrain a small CellFM trunk with :class:`cellfm_sc.CellFMPretrainer` on the unlabelled
   public corpus in ``../shared/data``: Liao 2020 BALF (10,706 cells), Delorey 2021 lung
   (1,786 cells; Ensembl ``var_names``, symbols in ``var["gene_names"]``) and pbmc3k
   (2,700 cells, its labels unused), read backed, one vocabulary over the union of their genes.
   ``export_mindspore`` writes ``cellfm.ckpt`` + ``gene_info.csv``.
2. On pbmc3k, hold out 20% of the cells (stratified, fixed) for the test; from the other 80%,
   take 1%, 10% or 100% as labelled cells (stratified, at least one per class; all train,
   the last epoch is kept unless ``--validation``). For each of ``--seeds``:

   * random start: ``CellFMClassifier(adata, preset=PRESET)``, library defaults;
   * pretrained start: ``CellFMClassifier(adata, checkpoint=ckpt, vocabulary_file=vocab,
     embedding_init="transfer")``, library defaults (``lr="auto"``, ``trainable="auto"``);
   * logistic regression on log-normalised counts (``normalize_total(1e4)`` + ``log1p``) of
     the same labelled cells.

   Macro-F1 on the held-out cells. Extra fine-tuning recipes can be compared with
   ``--variant NAME:key=value,...`` (keys of ``CellFMClassifier`` or ``train``).

Run (2 CPU cores, ~1.5 h with the defaults)::

    python benchmarks/pretraining_transfer.py --out /tmp/transfer --markdown

Results go to ``OUT/results.jsonl`` (one line per run) and, with ``--markdown``, a table on
stdout (the one in ``benchmarks/RESULTS.md``).
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

LIAO = "liao2020_balf_raw.h5ad"
DELOREY = "delorey2021_lung_raw.h5ad"
PBMC = "pbmc3k_raw.h5ad"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True, help="working folder (reused if present)")
    p.add_argument("--preset", default="tiny", help="trunk size (tiny, small)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", default="auto")
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="folder with cellfm.ckpt + gene_info.csv to use instead of pretraining",
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument(
        "--validation",
        type=float,
        default=0.0,
        help="share of the labelled cells that validate (model selection); 0: the last "
        "epoch's weights are kept",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--epochs",
        default="0.01:60,0.1:20,1.0:5",
        help="fine-tuning epochs per label fraction, 'fraction:epochs,...'",
    )
    p.add_argument(
        "--configs",
        nargs="*",
        default=["random", "pretrained", "logreg"],
        help="what to fine-tune: random, pretrained, logreg, and any --variant names",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:key=value,...",
        help="a recipe with other settings, e.g. 'lr3e-4:lr=3e-4' (pretrained start unless "
        "start=random; max_epochs= overrides --epochs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a busy 2-core machine)",
    )
    p.add_argument("--markdown", action="store_true", help="print the results table")
    return p.parse_args(argv)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_variants(specs: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        out[name] = {k: _value(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    return out


# --------------------------------------------------------------------------------------------
# 1. pretraining
# --------------------------------------------------------------------------------------------


def pretrain(
    args: argparse.Namespace, probe: Any = None, folder: Path | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """Pretrain once on the public corpus and export; reused when ``folder`` holds the result.

    ``probe``: an ``EmbeddingProbe`` (or a dict of them) scored after every epoch;
    ``args.corpus_sampling`` (default proportional) and ``folder`` (default
    ``args.out / "pretrained"``; per-epoch resumable checkpoints go to ``folder/epochs``)
    are optional.
    """
    import anndata as ad

    from cellfm_sc import CellFMPretrainer

    folder = folder or args.out / "pretrained"
    facts_file = folder / "pretrain.json"
    if facts_file.is_file():
        facts = json.loads(facts_file.read_text())
        return folder / "cellfm.ckpt", folder / "gene_info.csv", facts
    lung = ad.read_h5ad(args.data_dir / DELOREY, backed="r")
    CellFMPretrainer.setup_anndata(lung, gene_symbols="gene_names")
    corpus = [args.data_dir / LIAO, lung, args.data_dir / PBMC]
    started = time.perf_counter()
    model = CellFMPretrainer(corpus, preset=args.preset, max_tokens=args.max_tokens, seed=0)
    print(model, file=sys.stderr)
    lr = args.pretrain_lr if args.pretrain_lr == "auto" else float(args.pretrain_lr)
    sampling = getattr(args, "corpus_sampling", "proportional")
    extra = {"probe": probe} if probe is not None else {}
    depth = getattr(args, "pretrain_depth_augmentation", None)
    if depth is not None:  # otherwise CellFMPretrainer.train's default
        extra["depth_augmentation"] = float(depth)
    if getattr(args, "keep_epochs", False):
        extra["checkpoint_dir"] = str(folder / "epochs")
    model.train(
        max_epochs=args.pretrain_epochs,
        batch_size=args.pretrain_batch_size,
        lr=lr,
        logger=False,
        enable_progress_bar=True,
        corpus_sampling=sampling,
        **extra,
    )
    seconds = time.perf_counter() - started
    ckpt, vocab = model.export_mindspore(folder, overwrite=True)
    facts = {
        "seconds": seconds,
        "preset": args.preset,
        "max_tokens": args.max_tokens,
        "epochs": args.pretrain_epochs,
        "corpus_sampling": sampling,
        "depth_augmentation": model.train_settings_["depth_augmentation"],
        "n_genes": int(model.vocab.n_genes),
        "corpus": model.train_settings_["corpus"],
        "lr": model.train_settings_["lr"],
        "probe": model.train_settings_.get("probe"),
        "history": model.history.to_dict("list"),
    }
    facts_file.write_text(json.dumps(facts, indent=2))
    return ckpt, vocab, facts


# --------------------------------------------------------------------------------------------
# 2. fine-tuning on pbmc3k
# --------------------------------------------------------------------------------------------


def pbmc_split(adata: Any, fraction: float, seed: int, validation: float = 0.0) -> Any:
    """Fixed 20% test; ``fraction`` of the rest labelled (stratified, >= 1 per class); a
    ``validation`` share of the labelled cells validates (none by default: with a few labels
    a validation score of a handful of cells only adds noise to the kept epoch)."""
    from cellfm_sc.data import DataSplit

    labels = adata.obs["celltype"].astype(str).to_numpy()
    fixed = np.random.default_rng(12345)
    test, pool = [], []
    for c in np.unique(labels):
        idx = fixed.permutation(np.flatnonzero(labels == c))
        n_test = round(0.2 * idx.size)
        test.extend(idx[:n_test])
        pool.extend(idx[n_test:])
    pool = np.asarray(pool)
    rng = np.random.default_rng(seed)
    labelled = []
    for c in np.unique(labels[pool]):
        idx = rng.permutation(pool[labels[pool] == c])
        labelled.extend(idx[: max(1, round(fraction * idx.size))])
    labelled = rng.permutation(np.asarray(labelled))
    n_val = max(1, round(validation * labelled.size)) if validation > 0 else 0
    return DataSplit(np.sort(labelled[n_val:]), np.sort(labelled[:n_val]), np.sort(test))


def logistic_regression(adata: Any, split: Any) -> float:
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    x = adata.copy()
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    labels = x.obs["celltype"].astype(str).to_numpy()
    train = np.concatenate([split.train, split.validation])
    clf = LogisticRegression(max_iter=2000)
    clf.fit(x.X[train], labels[train])
    pred = clf.predict(x.X[split.test])
    return float(f1_score(labels[split.test], pred, average="macro"))


def finetune(
    adata: Any,
    split: Any,
    start: str,
    ckpt: Path,
    vocab: Path,
    args: argparse.Namespace,
    epochs: int,
    seed: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from cellfm_sc import CellFMClassifier

    init_keys = {"trainable", "head_hidden", "dropout", "max_tokens", "embedding_init"}
    extra = dict(extra)
    start = extra.pop("start", start)
    epochs = extra.pop("max_epochs", epochs)
    init = {k: v for k, v in extra.items() if k in init_keys}
    train = {k: v for k, v in extra.items() if k not in init_keys}
    init.setdefault("max_tokens", args.max_tokens)
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    if start == "random":
        model = CellFMClassifier(adata, preset=args.preset, seed=seed, **init)
    else:
        init.setdefault("embedding_init", "transfer")
        model = CellFMClassifier(adata, checkpoint=ckpt, vocabulary_file=vocab, seed=seed, **init)
    started = time.perf_counter()
    model.train(max_epochs=epochs, split=split, logger=False, enable_progress_bar=False, **train)
    seconds = time.perf_counter() - started
    result = model.evaluate(indices="test")
    return {
        "macro_f1": float(result.cell_metrics["macro_f1"]),
        "accuracy": float(result.cell_metrics["accuracy"]),
        "seconds": seconds,
        "lr": model.train_settings_["lr"],
        "best_epoch": model.best_epoch_,
    }


def table(rows: list[dict[str, Any]], configs: list[str]) -> str:
    fractions = sorted({r["fraction"] for r in rows})
    lines = [
        "| labels | " + " | ".join(configs) + " | pretrained - random |",
        "|---|" + "---|" * (len(configs) + 1),
    ]
    for f in fractions:
        cells, means = [], {}
        for c in configs:
            vals = [r["macro_f1"] for r in rows if r["fraction"] == f and r["config"] == c]
            if vals:
                means[c] = float(np.mean(vals))
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f} (n={len(vals)})")
            else:
                cells.append("")
        n_train = {r["n_labelled"] for r in rows if r["fraction"] == f}
        diff = ""
        if "random" in means and "pretrained" in means:
            diff = f"{means['pretrained'] - means['random']:+.3f}"
        label = f"{100 * f:g}% ({'/'.join(str(n) for n in sorted(n_train))} cells)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pretrained is not None:
        ckpt, vocab = args.pretrained / "cellfm.ckpt", args.pretrained / "gene_info.csv"
        facts = {}
    else:
        ckpt, vocab, facts = pretrain(args)
    if facts:
        print(
            f"pretraining: {facts['seconds']:.0f} s, {facts['epochs']} epochs, "
            f"{facts['n_genes']:,} genes, final validation loss "
            f"{facts['history']['validation_loss'][-1]:.3f}",
            file=sys.stderr,
        )
    import anndata as ad

    variants = parse_variants(args.variant)
    epochs_of = {float(k): int(v) for k, v in (kv.split(":") for kv in args.epochs.split(","))}
    results_file = args.out / "results.jsonl"
    done = set()
    rows = []
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            rows.append(r)
            done.add((r["config"], r["fraction"], r["seed"]))
    pbmc = ad.read_h5ad(args.data_dir / PBMC)
    for fraction in args.fractions:
        for seed in args.seeds:
            split = pbmc_split(pbmc, fraction, seed, args.validation)
            for config in args.configs:
                if (config, fraction, seed) in done:
                    continue
                row = {
                    "config": config,
                    "fraction": fraction,
                    "seed": seed,
                    "n_labelled": int(len(split.train) + len(split.validation)),
                    "n_test": len(split.test),
                }
                if config == "logreg":
                    row["macro_f1"] = logistic_regression(pbmc, split)
                else:
                    start = "random" if config == "random" else "pretrained"
                    extra = variants.get(config, {})
                    row["settings"] = extra
                    row.update(
                        finetune(
                            pbmc.copy(),
                            split,
                            start,
                            ckpt,
                            vocab,
                            args,
                            epochs_of[fraction],
                            seed,
                            extra,
                        )
                    )
                rows.append(row)
                with results_file.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.markdown:
        print(table([r for r in rows if r["config"] in args.configs], args.configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
