"""End-to-end fine-tuning through the public API on one device (Lightning, data path, bf16).

Synthetic SEA-AD-like data (36,601 genes, a donor-level 4-stage label with a weak per-stage
expression signal, ``--expressed`` genes per cell) in a backed ``.h5ad``; a randomly
initialised trunk of ``--preset`` (no pretrained weights can be fetched on the benchmark
machine); ``CellFMClassifier.train`` with the default precision (bf16-mixed on a GPU), then
``evaluate``, ``annotate``, ``save`` / ``load`` and a prediction check. Prints one JSON record
(training cells/s through the whole loader + model, inference cells/s, peak GPU memory).

Usage::

    python benchmarks/gpu_end_to_end.py                       # GPU, 80M preset
    python benchmarks/gpu_end_to_end.py --preset tiny --cells 300 --expressed 200 \
        --max-tokens 128 --epochs 1                           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

N_GENES = 36_601
STAGES = ["Not AD", "Low", "Intermediate", "High"]


def synthetic(path: Path, n_cells: int, expressed: int, seed: int = 0) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    donors = np.arange(n_cells) * 40 // n_cells  # 40 donors
    stage = donors % 4
    rows, cols, vals = [], [], []
    marker = rng.choice(N_GENES, size=(4, 50), replace=False)
    for i in range(n_cells):
        genes = rng.choice(N_GENES, size=expressed, replace=False)
        counts = rng.geometric(0.4, size=expressed)
        genes = np.concatenate([genes, marker[stage[i]]])
        counts = np.concatenate([counts, rng.poisson(3, size=50) + 1])
        genes, first = np.unique(genes, return_index=True)
        rows.append(np.full(genes.size, i))
        cols.append(genes)
        vals.append(counts[first])
    x = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, N_GENES),
    )
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"D{d:02d}" for d in donors]),
            "ADNC": pd.Categorical(np.array(STAGES)[stage], categories=STAGES, ordered=True),
        },
        index=[f"cell{i:06d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=pd.Index([f"G{j:05d}" for j in range(N_GENES)], dtype=object))
    obs.index = obs.index.astype(object)  # pandas 3 would make these nullable strings
    if hasattr(ad.settings, "allow_write_nullable_strings"):
        ad.settings.allow_write_nullable_strings = True
    ad.AnnData(x, obs=obs, var=var).write_h5ad(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="80M")
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--expressed", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import anndata as ad

    from cellfm_sc import CellFMClassifier

    gpu = torch.cuda.is_available()
    result: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5ad"
        t = time.perf_counter()
        synthetic(path, args.cells, args.expressed)
        result["write_s"] = time.perf_counter() - t
        adata = ad.read_h5ad(path, backed="r")
        CellFMClassifier.setup_anndata(adata, labels_key="ADNC", donor_key="donor")
        model = CellFMClassifier(adata, preset=args.preset, max_tokens=args.max_tokens)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model.train(
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=1e-4,
            validation_size=0.15,
            test_size=0.15,
            num_workers=args.num_workers,
            enable_progress_bar=False,
        )
        train_s = time.perf_counter() - t
        n_train = len(model.train_indices) * len(model.history)
        n_val = len(model.validation_indices) * len(model.history)
        result.update(
            train_s=train_s,
            precision=model.train_settings_["precision"],
            train_plus_val_cells_per_s=(n_train + n_val) / train_s,
            history=model.history.to_dict("list"),
            peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        )
        t = time.perf_counter()
        res = model.evaluate()
        result["evaluate_cells_per_s"] = len(model.test_indices) / (time.perf_counter() - t)
        result["test_metrics"] = res.cell_metrics
        result["donor_metrics"] = res.donor_metrics
        t = time.perf_counter()
        model.annotate(batch_size=64)
        result["annotate_cells_per_s"] = adata.n_obs / (time.perf_counter() - t)
        result["annotate_shapes"] = {k: list(v.shape) for k, v in adata.obsm.items()}
        model.save(Path(tmp) / "model")
        loaded = CellFMClassifier.load(Path(tmp) / "model", adata)
        a = model.predict(indices=np.arange(64), soft=True).to_numpy()
        b = loaded.predict(indices=np.arange(64), soft=True).to_numpy()
        result["save_load_max_abs_diff"] = float(np.abs(a - b).max())
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
