"""Make the example outputs the SEA-AD tutorial shows, on synthetic SEA-AD-shaped files.

The tutorial's commands are run here, unchanged apart from the file names and a small model,
on two small synthetic files laid out like the two SEA-AD downloads:

* ``allen_like.h5ad`` (Allen Brain Map portal): normalised values in ``X``, raw counts in
  ``layers["UMIs"]``, gene symbols as ``var_names``, donors in ``"Donor ID"``, the stage in
  ``"Overall AD neuropathological Change"``;
* ``cellxgene_like.h5ad`` (CELLxGENE): normalised values in ``X``, raw counts in ``raw.X``,
  Ensembl ids as ``var_names`` with symbols in ``var["feature_name"]``, donors in
  ``"donor_id"``, the stage in ``"ADNC"``.

Each holds 32 donors (8 per stage) x 30 nuclei x 400 genes, with a weak donor-level stage
signal in 12 genes. The model is the ``"tiny"`` preset, randomly initialised (no CellFM
weights are needed or used), so the numbers show what the outputs look like, not what
pretrained CellFM reaches on SEA-AD. The Python route runs on the Allen-shaped file, the
command-line route on the CELLxGENE-shaped one; both backed.

Writes into ``docs/tutorials/sea_ad_example/`` (committed; ``tests/test_docs.py`` reruns
this script and compares): ``python_output.txt``, ``cli_output.txt``,
``donor_predictions.csv``, ``confusion_matrix.png``, ``umap.png``. The CPU kernels are pinned
as ``cellfm-sc demo`` pins them, so the figures are the same on every x86-64 CPU. About 1-2
minutes on 2 CPU cores::

    python docs/tutorials/make_sea_ad_example.py [OUT_DIR]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
OUT = HERE / "sea_ad_example"
STAGES = ["Not AD", "Low", "Intermediate", "High"]
N_DONORS, N_PER_DONOR, N_GENES, N_SIGNAL = 32, 30, 400, 12
#: the small settings replacing the tutorial's 80M run (everything else as the tutorial says)
TINY = dict(preset="tiny", max_tokens=128)
TRAIN = dict(max_epochs=3, batch_size=32, validation_size=0.2, test_size=0.25)


def synthetic_counts(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, list[str], list[str]]:
    """Counts ``(cells, genes)``, donor table per cell, gene symbols and Ensembl ids."""
    rng = np.random.default_rng(seed)
    n = N_DONORS * N_PER_DONOR
    donor_stage = np.repeat(np.arange(4), N_DONORS // 4)
    rng.shuffle(donor_stage)
    donor = np.repeat(np.arange(N_DONORS), N_PER_DONOR)
    stage = donor_stage[donor]
    base = rng.gamma(0.6, 1.0, size=N_GENES)  # gene means
    depth = rng.lognormal(0.0, 0.3, size=n)  # per-nucleus depth
    rate = depth[:, None] * base[None, :]
    # a weak donor-level signal: the signal genes rise with the stage, plus donor noise
    donor_shift = rng.normal(0.0, 0.25, size=N_DONORS)
    rate[:, :N_SIGNAL] *= np.exp(0.35 * stage + donor_shift[donor])[:, None]
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, N_SIGNAL] += 1  # no empty nucleus
    symbols = [f"SIG{j}" for j in range(N_SIGNAL)] + [f"GENE{j}" for j in range(N_SIGNAL, N_GENES)]
    ensembl = [f"ENSG{j + 1:011d}" for j in range(N_GENES)]
    donors = pd.DataFrame(
        {
            "donor": [f"H21.33.{d + 1:03d}" for d in donor],
            "stage": [STAGES[s] for s in stage],
        }
    )
    return counts, donors, symbols, ensembl


def _normalised(counts: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32))


def write_allen_like(path: Path) -> None:
    counts, donors, symbols, _ = synthetic_counts()
    obs = pd.DataFrame(
        {
            "Donor ID": pd.Categorical(donors["donor"]),
            "Overall AD neuropathological Change": pd.Categorical(
                donors["stage"], categories=STAGES
            ),
        },
        index=[f"nucleus_{i}" for i in range(len(donors))],
    )
    adata = ad.AnnData(X=_normalised(counts), obs=obs, var=pd.DataFrame(index=symbols))
    adata.layers["UMIs"] = sp.csr_matrix(counts)
    adata.write_h5ad(path)


def write_cellxgene_like(path: Path) -> None:
    counts, donors, symbols, ensembl = synthetic_counts()
    obs = pd.DataFrame(
        {
            "donor_id": pd.Categorical(donors["donor"]),
            "ADNC": pd.Categorical(donors["stage"], categories=STAGES),
        },
        index=[f"nucleus_{i}" for i in range(len(donors))],
    )
    var = pd.DataFrame({"feature_name": pd.Categorical(symbols)}, index=ensembl)
    adata = ad.AnnData(X=_normalised(counts), obs=obs, var=var)
    adata.raw = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.write_h5ad(path)


def python_route(data: Path, run_dir: Path) -> str:
    """The tutorial's Python route on the Allen-shaped file; returns what it prints."""
    import torch

    import cellfm_sc
    from cellfm_sc import CellFMClassifier

    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.read_h5ad(data, backed="r")
        CellFMClassifier.setup_anndata(
            adata,
            labels_key="Overall AD neuropathological Change",
            donor_key="Donor ID",
            layer="UMIs",
            label_order=STAGES,
        )
        model = CellFMClassifier(adata, **TINY)
        model.train(**TRAIN, enable_progress_bar=False)
        result = model.evaluate(indices="test")
        print(result)
        cellfm_sc.report.write_report(
            run_dir, result, history=model.history, info=model.report_info()
        )
        print(pd.read_csv(run_dir / "donor_predictions.csv").round(3).to_string(index=False))
    return printed.getvalue()


def cli_route(data: Path, run_dir: Path) -> str:
    """The tutorial's command line on the CELLxGENE-shaped file; returns its stdout."""
    exe = shutil.which("cellfm-sc")
    cmd = [exe] if exe else [sys.executable, "-m", "cellfm_sc.cli"]
    args = [
        "finetune", str(data), "--labels-key", "ADNC", "--donor-key", "donor_id",
        "--label-order", ",".join(STAGES), "--use-raw", "--gene-symbols", "feature_name",
        "--backed", "--preset", TINY["preset"], "--max-tokens", str(TINY["max_tokens"]),
        "--epochs", str(TRAIN["max_epochs"]), "--batch-size", str(TRAIN["batch_size"]),
        "--validation-size", str(TRAIN["validation_size"]),
        "--test-size", str(TRAIN["test_size"]), "--output-dir", str(run_dir), "--quiet",
    ]  # fmt: skip
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cellfm-sc finetune failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def normalise(text: str) -> str:
    """Output without what differs between runs: run times and temporary paths."""
    text = re.sub(r"done in \d+ s", "done in N s", text)
    text = re.sub(r"(/[\w.-]+)*/(runs/adnc\w*)", r"\2", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def make(out: Path = OUT) -> dict[str, Path]:
    """Run both routes in a temporary folder and write the outputs into ``out``."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        allen, cxg = tmp_path / "allen_like.h5ad", tmp_path / "cellxgene_like.h5ad"
        write_allen_like(allen)
        write_cellxgene_like(cxg)
        py_dir, cli_dir = tmp_path / "runs" / "adnc", tmp_path / "runs" / "adnc_cli"
        py_text = python_route(allen, py_dir)
        cli_text = cli_route(cxg, cli_dir)
        files = {
            "python_output.txt": normalise(py_text.replace(str(tmp_path) + "/", "")) + "\n",
            "cli_output.txt": "$ cellfm-sc finetune cellxgene_like.h5ad ... --use-raw "
            "--output-dir runs/adnc_cli\n"
            + normalise(cli_text.replace(str(tmp_path) + "/", ""))
            + "\n",
        }
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        for name in ("donor_predictions.csv", "confusion_matrix.png", "umap.png"):
            shutil.copyfile(py_dir / name, out / name)
    return {name: out / name for name in (*files, "donor_predictions.csv")}


def run_pinned(out: Path) -> None:
    """Run this script in a fresh process with the demo's pinned CPU kernels.

    The figures of a tiny model trained from scratch follow the CPU's rounding (AVX2 /
    AVX-512 kernels sum differently); pinned, as ``cellfm-sc demo`` pins them, they are the
    same on every x86-64 CPU. The pins act only before torch is imported, hence the process.
    """
    from cellfm_sc.cli.demo import REPRODUCIBLE_CPU

    env = dict(os.environ, **REPRODUCIBLE_CPU, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(__file__).name} failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    from cellfm_sc.cli.demo import pin_cpu_kernels

    if not pin_cpu_kernels():
        raise SystemExit("torch was imported before the CPU kernels could be pinned")
    for path in make(target).values():
        print("wrote", path)
