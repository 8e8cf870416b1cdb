"""One catalogue of bad inputs: each gets a clear error that names the problem, exit status 2
on the command line (one line, no traceback), and leaves nothing half-written behind.

Every case runs through the command line; data cases also through the Python API, whose
messages name keywords (``layer="counts"``) where the command line names flags
(``--layer counts``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc import CellFMClassifier, datasets

from .test_cli import assert_usage_error, run_cli

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)
TINY = ["--preset", "tiny", "--epochs", "1", "--max-tokens", "64", "--quiet"]


def _base() -> ad.AnnData:
    return datasets.pbmc3k()[:80].copy()


def _csr(adata: ad.AnnData) -> sp.csr_matrix:
    return sp.csr_matrix(adata.X, dtype=np.float32)


def _lognorm(a):
    x = _csr(a)
    x.data = np.log1p(x.data)
    a.X = x


def _negative(a):
    x = _csr(a)
    x.data[5] = -3
    a.X = x


def _nan(a):
    x = _csr(a)
    x.data[x.nnz // 2] = np.nan
    a.X = x


def _fractional(a):
    x = _csr(a)
    x.data[10] += 0.5
    a.X = x


def _single_class(a):
    a.obs["celltype"] = "T"


def _nan_labels(a):
    col = a.obs["celltype"].astype(object)
    col.iloc[:3] = np.nan
    a.obs["celltype"] = col


def _duplicated_genes(a):
    names = list(a.var_names)
    names[1] = names[0]
    a.var_names = names


def _empty_cell(a):
    x = _csr(a).tolil()
    x[3, :] = 0
    a.X = sp.csr_matrix(x)
    a.X.eliminate_zeros()


# name -> (how to spoil the data, extra flags, CLI fragment, API fragment)
DATA_CASES: dict[str, tuple[Callable | None, list[str], str, str]] = {
    "log-normalised counts": (_lognorm, [], "--layer counts", 'layer="counts"'),
    "negative counts": (_negative, [], "negative value", "negative value"),
    "NaN counts": (_nan, [], "NaN", "NaN"),
    "fractional counts": (_fractional, [], "fractional value", "fractional value"),
    "missing layer": (None, ["--layer", "counts"], "counts", "counts"),
    "missing labels column": (None, ["--labels-key", "cell_type"], "--labels-key cell_type", "labels_key='cell_type'"),
    "missing donor column": (None, ["--donor-key", "donor"], "--donor-key donor", "donor_key='donor'"),
    "single class": (_single_class, [], "single class", "single class"),
    "NaN labels": (_nan_labels, [], "3 missing value", "3 missing value"),
    "duplicated genes": (_duplicated_genes, [], "duplicated gene", "duplicated gene"),
    "0 cells": (lambda a: None, [], "0 cells", "0 cells"),
    "0 genes": (lambda a: None, [], "0 genes", "0 genes"),
    "empty cell": (_empty_cell, [], "no counts", "no counts"),
}  # fmt: skip


def _data(name: str, folder: Path) -> Path:
    spoil = DATA_CASES[name][0]
    adata = _base()
    if name == "0 cells":
        adata = adata[:0].copy()
    elif name == "0 genes":
        adata = adata[:, :0].copy()
    elif spoil is not None:
        spoil(adata)
    path = folder / "data.h5ad"
    adata.write_h5ad(path)
    return path


def assert_nothing_left(out: Path) -> None:
    """No output, or only run.log saying what failed (the run started, then failed)."""
    if out.exists():
        left = sorted(p.name for p in out.iterdir())
        assert left == ["run.log"], left
        assert "failed" in (out / "run.log").read_text()


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data(name, tmp_path):
    _, flags, cli_fragment, api_fragment = DATA_CASES[name]
    path = _data(name, tmp_path)
    args = ["--labels-key", "celltype", *flags] if "--labels-key" not in flags else flags
    out = tmp_path / "out"
    proc = run_cli("finetune", path, *args, *TINY, "-o", out)
    assert_usage_error(proc, cli_fragment)
    assert_nothing_left(out)
    # the Python API: the same problem, worded with keywords, before any training
    adata = ad.read_h5ad(path)
    kw = {"labels_key": "celltype"}
    for flag, key in (
        ("--labels-key", "labels_key"),
        ("--donor-key", "donor_key"),
        ("--layer", "layer"),
    ):
        if flag in flags:
            kw[key] = flags[flags.index(flag) + 1]
    with pytest.raises((ValueError, KeyError)) as info:
        CellFMClassifier.setup_anndata(adata, **kw)
        model = CellFMClassifier(adata, preset="tiny", max_tokens=64)
        model.train(max_epochs=1, enable_progress_bar=False)
    assert api_fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------ checkpoints
def _golden(golden_dir: Path) -> Path:
    return golden_dir / "model_d48_h4_l2_g37_cellfm_padzero.ckpt"


def _bad_checkpoint(kind: str, golden_dir: Path, folder: Path) -> Path:
    from cellfm_sc.io import read_mindspore_checkpoint, write_mindspore_checkpoint

    good = _golden(golden_dir)
    path = folder / "weights.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "flipped":  # a corrupted exponent: a value near 8e37
        state = read_mindspore_checkpoint(good)
        state["gene_emb"] = state["gene_emb"].copy()
        state["gene_emb"][3, 7] = 8.1e37
        write_mindspore_checkpoint(path, state)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("gene_emb,1,2,3\n")
    elif kind == "pickle":
        torch.save({"gene_emb": torch.zeros(3, 3)}, path)
    return path


CHECKPOINT_CASES = {
    "truncated": "--checkpoint",
    "flipped": "8.1e+37",
    "empty": "--checkpoint",
    "text": "--checkpoint",
    "pickle": "--checkpoint",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_bad_checkpoint(kind, golden_dir, tmp_path):
    ckpt = _bad_checkpoint(kind, golden_dir, tmp_path)
    data = tmp_path / "d.h5ad"
    _base().write_h5ad(data)
    out = tmp_path / "out"
    proc = run_cli(
        "finetune", data, "--labels-key", "celltype", "--checkpoint", ckpt, "--num-heads", "4",
        "--epochs", "1", "--quiet", "-o", out,
    )  # fmt: skip
    assert_usage_error(proc, CHECKPOINT_CASES[kind])
    assert not out.exists()
    if kind != "pickle":  # inspect reads MindSpore files only
        assert_usage_error(run_cli("inspect", ckpt), "checkpoint")


def test_corrupt_values_refused_by_from_mindspore(golden_dir, tmp_path):
    from cellfm_sc.io import CheckpointError
    from cellfm_sc.nn import CellFMTrunk

    ckpt = _bad_checkpoint("flipped", golden_dir, tmp_path)
    with pytest.raises(CheckpointError, match=r"gene_emb holds 8\.1e\+37"):
        CellFMTrunk.from_mindspore(ckpt, num_heads=4)
    trunk = CellFMTrunk.from_mindspore(ckpt, num_heads=4, max_abs=None)  # the user's call
    assert trunk.gene_emb.abs().max() > 1e37


def test_wrong_number_of_heads(golden_dir, tmp_path):
    data = tmp_path / "d.h5ad"
    _base().write_h5ad(data)
    proc = run_cli(
        "finetune", data, "--labels-key", "celltype", "--checkpoint", _golden(golden_dir),
        "--num-heads", "5", "--quiet", "-o", tmp_path / "out",
    )  # fmt: skip
    assert_usage_error(proc, "not divisible by --num-heads 5")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ runs, models, outputs
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny finetune run (1 epoch) to spoil its files."""
    folder = tmp_path_factory.mktemp("bad_run")
    data = folder / "d.h5ad"
    _base().write_h5ad(data)
    out = folder / "run"
    proc = run_cli("finetune", data, "--labels-key", "celltype", *TINY, "-o", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out


@pytest.mark.parametrize("kind", ["truncated", "empty", "flipped"])
def test_corrupt_resume_file(run_dir, tmp_path, kind):
    data, out = run_dir
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ckpt = copy / "checkpoint_epoch_1.pth"
    if kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    else:
        state = torch.load(ckpt, weights_only=False)
        key = next(iter(state["state_dict"]))
        state["state_dict"][key] = torch.full_like(state["state_dict"][key], float("nan"))
        torch.save(state, ckpt)
    before = sorted(p.name for p in copy.iterdir())
    proc = run_cli("finetune", data, "--labels-key", "celltype", *TINY, "-o", copy, "--resume")
    assert_usage_error(proc, "checkpoint_epoch_1.pth")
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written or removed


def test_corrupt_saved_model(run_dir, tmp_path):
    data, out = run_dir
    model = tmp_path / "model"
    shutil.copytree(out / "model", model)
    (model / "model.pt").write_bytes((model / "model.pt").read_bytes()[:500])
    proc = run_cli("predict", model, data, "--output", tmp_path / "o.h5ad", "--quiet")
    assert_usage_error(proc, "model.pt")
    assert not (tmp_path / "o.h5ad").exists()


def test_query_without_overlap(run_dir, tmp_path):
    _, out = run_dir
    query = _base()
    query.var_names = [f"NOT_A_GENE_{i}" for i in range(query.n_vars)]
    path = tmp_path / "q.h5ad"
    query.write_h5ad(path)
    proc = run_cli("predict", out / "model", path, "--output", tmp_path / "o.h5ad", "--quiet")
    assert_usage_error(proc, "0 of the model's", "--min-gene-coverage")
    assert not (tmp_path / "o.h5ad").exists()


def test_unwritable_output(run_dir, tmp_path):
    data, out = run_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli("finetune", data, "--labels-key", "celltype", *TINY, "-o", blocker / "out")
    assert_usage_error(proc, "--output-dir")
    proc = run_cli("predict", out / "model", data, "--output", blocker / "o.h5ad")
    assert_usage_error(proc, "--output")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--validation-size", "1.5"], "--validation-size"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--patience", "-1"], "--patience"),
    ],
)
def test_bad_numeric_arguments(run_dir, tmp_path, args, fragment):
    data, _ = run_dir
    out = tmp_path / "out"
    proc = run_cli(
        "finetune", data, "--labels-key", "celltype", "--preset", "tiny", "-o", out, *args
    )
    assert_usage_error(proc, fragment)
    assert not out.exists()
