"""Peak memory of embedding a large backed ``.h5ad``: streamed vs one ``(n, D)`` array.

Run: ``python benchmarks/bench_inference_memory.py [--cells 50000 200000] [--nnz 1400]``.

For each size a synthetic SEA-AD-like file (36,601 genes, ~1,500 expressed per cell, CSR
float32, written chunk by chunk: ``bench_backed_memory.write_h5ad``) is embedded by a model
with the ``small`` preset (256 dims, random weights: memory does not depend on the values)
and ``max_tokens=128`` (to keep the run short on a CPU; memory per batch scales with it, not
with the number of cells). Two fresh subprocesses per size:

* ``streamed``: ``cellfm-sc embed MODEL DATA --backed -o out.h5ad`` (rows written into the
  output as they are computed: ``get_latent_representation(out=...)``);
* ``in-memory``: ``model.get_latent_representation(backed)`` returning one float32
  ``(n, 256)`` array, then writing it (what the CLI did before).

Reported: wall time, cells/s, peak RSS (``VmHWM``) and the size of the ``(n, D)`` array.
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

from bench_backed_memory import N_GENES, write_h5ad  # the one synthetic writer

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, anndata as ad, torch
torch.set_num_threads(2)
from cellfm_sc import CellFMClassifier
mode, model_dir, data, out = sys.argv[1:5]
sys.path.insert(0, sys.argv[5])
from bench_backed_memory import status_mb as mb
adata = ad.read_h5ad(data, backed="r")
model = CellFMClassifier.load(model_dir, adata)
base = mb("VmRSS")
t = time.perf_counter()
if mode == "streamed":
    from cellfm_sc._stores import output_store
    with output_store(out, adata.obs) as store:
        model.get_latent_representation(
            adata, batch_size=64, out=store.dense("X_cellfm", 256), allow_untrained=True
        )
else:
    emb = model.get_latent_representation(adata, batch_size=64, allow_untrained=True)
    from cellfm_sc._atomic import write_h5ad_atomic
    write_h5ad_atomic(ad.AnnData(obs=adata.obs.copy(), obsm={"X_cellfm": emb}), out)
dt = time.perf_counter() - t
print(json.dumps({"mode": mode, "cells": adata.n_obs, "seconds": dt,
                  "rss_before_mb": base, "peak_rss_mb": mb("VmHWM")}))
"""


def make_model(folder: Path) -> Path:
    """A saved small-preset classifier over the synthetic genes (random weights)."""
    import warnings

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from cellfm_sc import CellFMClassifier

    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    x = sp.random(40, N_GENES, density=0.02, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    obs = pd.DataFrame({"label": ["a", "b"] * 20}, index=[f"c{i}" for i in range(40)])
    var = pd.DataFrame(index=[f"gene{j:05d}" for j in range(N_GENES)])
    adata = ad.AnnData(x, obs=obs, var=var)
    CellFMClassifier.setup_anndata(adata, labels_key="label")
    model = CellFMClassifier(adata, preset="small", max_tokens=128)
    path = folder / "model"
    model.save(path, overwrite=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--nnz", type=int, default=1400)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--modes", nargs="+", default=["streamed", "in-memory"], choices=["streamed", "in-memory"]
    )
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellfm_infmem_"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    rows = []
    for n in args.cells:
        data = work / f"synthetic_{n}.h5ad"
        if not data.exists():
            t = time.perf_counter()
            write_h5ad(data, n, args.nnz)
            print(f"wrote {data} ({n:,} cells) in {time.perf_counter() - t:.0f} s", flush=True)
        for mode in args.modes:
            out = work / f"emb_{mode}_{n}.h5ad"
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    mode,
                    str(model),
                    str(data),
                    str(out),
                    str(Path(__file__).resolve().parent),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["array_mb"] = n * 256 * 4 / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.unlink(missing_ok=True)
    print()
    print(
        "| cells | mode | seconds | cells/s | RSS before (MiB) | peak RSS (MiB) | (n, 256) float32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['cells']:,} | {r['mode']} | {r['seconds']:.0f} | {r['cells'] / r['seconds']:,.0f} "
            f"| {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['array_mb']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
