"""Peak RSS of ``CellFMClassifier`` training + inference on backed ``.h5ad`` (50k vs 200k cells).

Run: ``python benchmarks/bench_model_backed_memory.py [--cells 50000 200000] [--nnz 300]``.

Each synthetic file (36,601 genes, about ``--nnz`` expressed genes per cell, CSR, a 4-class
``label`` and a ``donor`` column in obs) is written chunk by chunk (``bench_backed_memory.
write_h5ad``). A fresh subprocess opens it with ``backed="r"``, runs ``setup_anndata`` (count
check), builds a tiny-preset model, trains one epoch capped at 40 training and 10 validation
batches of 32 cells (donor split over all cells: the full index arrays exist), then embeds
5,000 cells, and reports its peak RSS (``VmHWM``) and the RSS after imports. The cap keeps
the run short on 2 CPU cores; what grows with the number of cells (obs, index arrays, the
registry) is all there.
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

from bench_backed_memory import write_h5ad


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def add_obs(path: Path, n_cells: int) -> None:
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    donors = np.arange(n_cells) // 500
    labels = np.array(["Not AD", "Low", "Intermediate", "High"])[donors % 4]
    obs = pd.DataFrame(
        {"donor": pd.Categorical(donors.astype(str)), "label": pd.Categorical(labels)},
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    with h5py.File(path, "r+") as f:
        del f["obs"]
        ad.io.write_elem(f, "obs", obs)


def child(path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import anndata as ad

    from cellfm_sc import CellFMClassifier

    base = _vm("VmRSS")
    t0 = time.time()
    adata = ad.read_h5ad(path, backed="r")
    CellFMClassifier.setup_anndata(adata, labels_key="label", donor_key="donor")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=128)
    model.train(
        max_epochs=1,
        batch_size=32,
        validation_size=0.1,
        enable_progress_bar=False,
        limit_train_batches=40,
        limit_val_batches=10,
    )
    emb = model.get_latent_representation(indices=range(5000), batch_size=128)
    print(
        json.dumps(
            {
                "n_cells": adata.n_obs,
                "rss_after_imports_mib": base,
                "peak_rss_mib": _vm("VmHWM"),
                "seconds": time.time() - t0,
                "embedding": list(emb.shape),
            }
        )
    )


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
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            path.unlink()
    print("| cells | peak RSS (MiB) | RSS after imports (MiB) | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n_cells']:,} | {r['peak_rss_mib']:.0f} | {r['rss_after_imports_mib']:.0f} "
            f"| {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
