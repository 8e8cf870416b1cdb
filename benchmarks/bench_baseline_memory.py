"""Peak RSS of the baselines (``cellfm_sc.baselines``) on backed ``.h5ad`` files of growing size.

Run: ``python benchmarks/bench_baseline_memory.py [--cells 50000 200000] [--nnz 300]``.

Each synthetic file (36,601 genes, about ``--nnz`` expressed genes per cell, CSR; obs: 84
donors, as SEA-AD's MTG atlas, whatever the number of cells, with a 4-stage donor label) is
written chunk by chunk (``bench_backed_memory.write_h5ad``). What the baselines hold beside
one chunk of rows is per donor (the ``(n_donors, n_genes)`` sums) or per sampled cell, so with
a fixed number of donors the peak should not grow with the cells. A fresh subprocess opens it with ``backed="r"`` and, on a
donor split (70 / 10 / 20% of the donors), fits and scores

* ``pseudobulk``: :func:`~cellfm_sc.baselines.pseudobulk_baseline` (one chunked pass over
  every cell: per-donor sums by sparse indicator products, C chosen on the validation donors);
* ``cell``: :func:`~cellfm_sc.baselines.cell_baseline` (a chunked gene-variance pass over at
  most 20,000 sampled training cells, logistic regression on their 2,000 most variable genes,
  then every test cell scored in chunks);

and reports the peak RSS (``VmHWM``) of each step, the RSS after imports and opening the file,
and the seconds. The dense cells x genes float32 matrix is given beside it for scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backed_memory import N_GENES, write_h5ad
from bench_model_backed_memory import _vm


def add_obs(path: Path, n_cells: int, n_donors: int = 84) -> None:
    """Replace the file's obs: ``n_donors`` donors of equal size, stage ``donor % 4``."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    donors = np.arange(n_cells) * n_donors // n_cells
    labels = np.array(["Not AD", "Low", "Intermediate", "High"])[donors % 4]
    obs = pd.DataFrame(
        {"donor": pd.Categorical([f"H{d:02d}" for d in donors]), "label": pd.Categorical(labels)},
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    with h5py.File(path, "r+") as f:
        del f["obs"]
        ad.io.write_elem(f, "obs", obs)


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import anndata as ad
    import numpy as np

    from cellfm_sc.baselines import cell_baseline, pseudobulk_baseline
    from cellfm_sc.data import split_by_donor

    adata = ad.read_h5ad(path, backed="r")
    split = split_by_donor(adata, "donor", "label", test_size=0.2, validation_size=0.1, seed=0)
    classes = ["Not AD", "Low", "Intermediate", "High"]
    labels = (
        adata.obs["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    ).astype(np.int64)
    donors = adata.obs["donor"].astype(str).to_numpy()
    base = _vm("VmRSS")
    out = {"n_cells": adata.n_obs, "rss_after_open_mib": base}
    parts = {"train": split.train, "validation": split.validation}
    for name in ("pseudobulk", "cell"):
        _reset_peak()
        t0 = time.time()
        if name == "pseudobulk":
            res = pseudobulk_baseline(
                adata, labels, donors, **parts, test=split.test, classes=classes, ordered=True
            )
        else:
            res = cell_baseline(
                adata, labels, **parts, evaluate=split.test, classes=classes, ordered=True,
                donors=donors,
            )  # fmt: skip
        out[name] = {
            "seconds": round(time.time() - t0, 1),
            "peak_rss_mib": _vm("VmHWM"),
            "n_scored_donors": res.donor_metrics["n_donors"],
        }
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--nnz", type=int, default=300)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cells:
            path = Path(tmp) / f"synthetic_{n}.h5ad"
            write_h5ad(path, n, args.nnz)
            add_obs(path, n)
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            path.unlink()
    print(
        "| cells | dense X (MiB) | RSS after open (MiB) | pseudobulk peak RSS (MiB) | seconds "
        "| cell LR peak RSS (MiB) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dense = r["n_cells"] * N_GENES * 4 / 2**20
        print(
            f"| {r['n_cells']:,} | {dense:,.0f} | {r['rss_after_open_mib']:.0f} "
            f"| {r['pseudobulk']['peak_rss_mib']:.0f} | {r['pseudobulk']['seconds']:.0f} "
            f"| {r['cell']['peak_rss_mib']:.0f} | {r['cell']['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
