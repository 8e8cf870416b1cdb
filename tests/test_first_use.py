"""What a newcomer meets first: an untrained model refuses to predict, a missing accelerator
is one line before any work, epoch checkpoints do not pile up, predictions are categoricals
over the model's classes, the command line refuses bad columns before its heavy imports, and
training does not print Lightning's banners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellfm_sc
from cellfm_sc import CellFMClassifier, CellFMPretrainer
from cellfm_sc._checkpoints import epoch_checkpoints
from cellfm_sc._hardware import check_accelerator, check_device
from cellfm_sc.model import UntrainedModelError
from cellfm_sc.train import BestStateCallback, EpochCheckpoint
from tests.test_cli import HEAVY, assert_usage_error, run_cli
from tests.test_donor import make_model, toy_donors
from tests.test_donor import setup as setup_donors

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def _cells(n: int = 80, seed: int = 0) -> ad.AnnData:
    """``n`` cells of the shipped PBMC subset, every cell type present."""
    full = cellfm_sc.datasets.pbmc3k()
    labels = full.obs["celltype"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    per = n // len(np.unique(labels))
    rows = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == t), min(per, (labels == t).sum()), False)
            for t in np.unique(labels)
        ]
    )
    return full[np.sort(rows)].copy()


def _classifier(adata: ad.AnnData, **kwargs) -> CellFMClassifier:
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    return CellFMClassifier(adata, preset="tiny", max_tokens=32, **kwargs)


@pytest.fixture(scope="module")
def untrained():
    adata = _cells()
    return _classifier(adata), adata


# --------------------------------------------------------------------------------------------
# the untrained-model guard
# --------------------------------------------------------------------------------------------


def test_untrained_classifier_refuses_every_inference(untrained, tmp_path):
    model, adata = untrained
    assert not model.is_trained_
    calls = {
        "predict": lambda **kw: model.predict(**kw),
        "predict soft": lambda **kw: model.predict(soft=True, **kw),
        "annotate": lambda **kw: model.annotate(adata.copy(), **kw),
        "get_latent_representation": lambda **kw: model.get_latent_representation(**kw),
        # no split was ever made: "untrained" comes before "the model has no test cells"
        "evaluate": lambda **kw: model.evaluate(**kw),
    }
    for name, call in calls.items():
        with pytest.raises(UntrainedModelError, match=r"not been trained") as err:
            call()
        assert "train()" in str(err.value) and "CellFMClassifier.load(" in str(err.value), name
        assert "allow_untrained=True" in str(err.value), name
    # on purpose: random features
    emb = model.get_latent_representation(allow_untrained=True)
    assert emb.shape == (adata.n_obs, 64) and np.isfinite(emb).all()
    assert len(model.predict(allow_untrained=True)) == adata.n_obs
    # a save of the untrained model loads untrained
    model.save(tmp_path / "m")
    loaded = CellFMClassifier.load(tmp_path / "m", adata)
    with pytest.raises(UntrainedModelError):
        loaded.predict()
    # and the error is a usage error of the command line (exit status 2)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    proc = run_cli("predict", tmp_path / "m", tmp_path / "cells.h5ad", "-o", tmp_path / "o.h5ad")
    assert_usage_error(proc, "has not been trained")
    assert not (tmp_path / "o.h5ad").exists()


def test_a_pretrained_trunk_embeds_but_its_new_head_does_not_predict(golden_dir):
    import csv

    import scipy.sparse as sp

    vocab_file = golden_dir / "vocab_d48_h4_l2_g37.csv"
    with open(vocab_file, newline="") as fh:
        genes = [r[0] for r in list(csv.reader(fh))[1:] if r][:30]
    rng = np.random.default_rng(0)
    counts = sp.random(40, len(genes), density=0.5, random_state=rng, format="csr")
    counts.data = rng.integers(1, 30, size=counts.nnz).astype(np.float32)
    counts = (counts + sp.eye(40, len(genes), format="csr")).tocsr()
    obs = pd.DataFrame({"label": ["a", "b"] * 20}, index=[f"c{i}" for i in range(40)])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    CellFMClassifier.setup_anndata(adata, labels_key="label")
    ckpt = golden_dir / "model_d48_h4_l2_g37_backbone.ckpt"
    kw = dict(checkpoint=ckpt, vocabulary_file=vocab_file, num_heads=4)
    transfer = CellFMClassifier(adata, embedding_init="transfer", **kw)
    assert transfer.get_latent_representation().shape == (40, 48)  # CellFM's embedding
    with pytest.raises(UntrainedModelError, match="predictions would be random"):
        transfer.predict()  # the head is new
    fresh = CellFMClassifier(adata, embedding_init="random", **kw)
    with pytest.raises(UntrainedModelError, match=r"gene embedding is new"):
        fresh.get_latent_representation()


def test_untrained_pretrainer_and_donor_model_refuse():
    adata = _cells(40)
    CellFMPretrainer.setup_anndata(adata)
    pre = CellFMPretrainer(adata, preset="tiny", max_tokens=32)
    with pytest.raises(UntrainedModelError, match="CellFMPretrainer has not been trained"):
        pre.get_latent_representation()
    assert pre.get_latent_representation(allow_untrained=True).shape == (40, 64)

    donors = setup_donors(toy_donors(n_donors=8, cells=6))
    model = make_model(donors)
    for call in (model.predict_donors, model.annotate, model.evaluate):
        with pytest.raises(UntrainedModelError, match="CellFMDonorClassifier"):
            call()
    table = model.predict_donors(allow_untrained=True)
    assert len(table) == 8


# --------------------------------------------------------------------------------------------
# predict(): a categorical over the model's classes, in order
# --------------------------------------------------------------------------------------------


def test_predict_is_a_categorical_of_the_models_classes(untrained):
    model, adata = untrained
    query = adata.copy()
    x = query.X.tolil()
    x[3, :] = 0  # a cell without counts
    query.X = x.tocsr()
    query.X.eliminate_zeros()
    with pytest.warns(UserWarning, match="1 cell"):
        labels = model.predict(query, allow_untrained=True)
    assert isinstance(labels, pd.Categorical)
    assert list(labels.categories) == model.classes_  # every class, in the model's order
    assert len(labels) == query.n_obs and pd.isna(labels[3]) and not pd.isna(labels[:3]).any()
    with pytest.warns(UserWarning, match="1 cell"):
        soft = model.predict(query, soft=True, allow_untrained=True)
    assert list(soft.columns) == model.classes_ and list(soft.index) == list(query.obs_names)
    assert soft.iloc[3].isna().all()
    ok = ~np.isnan(soft.to_numpy()[:, 0])
    np.testing.assert_array_equal(
        np.asarray(labels)[ok], np.asarray(model.classes_)[soft.to_numpy()[ok].argmax(1)]
    )
    # into obs: the categories are the labels', so scanpy colours both panels alike
    query.obs["predicted"] = labels
    assert list(query.obs["predicted"].cat.categories) == list(query.obs["celltype"].cat.categories)
    # a subset keeps the categories
    sub = model.predict(query, indices=[0, 1], allow_untrained=True)
    assert list(sub.categories) == model.classes_ and len(sub) == 2


# --------------------------------------------------------------------------------------------
# accelerators and device counts
# --------------------------------------------------------------------------------------------


def test_cpu_only_build_is_read_without_importing_torch():
    from cellfm_sc._hardware import _cpu_only_build

    assert _cpu_only_build() == (torch.version.cuda is None and torch.version.hip is None)


@NO_GPU
def test_missing_gpu_is_one_line_before_any_work(untrained, tmp_path):
    model, _ = untrained
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(ValueError, match=rf"accelerator='{accelerator}' but .*'cpu'"):
            model.train(max_epochs=1, accelerator=accelerator, checkpoint_dir=tmp_path / "ck")
    assert not model.is_trained_ and model.history_ is None and not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="device='cuda' but"):
        model.get_latent_representation(device="cuda", allow_untrained=True)
    with pytest.raises(ValueError, match="accelerator='quantum' is not one of"):
        check_accelerator("quantum")
    check_accelerator("cpu", 4)  # several CPU processes are Lightning's business
    check_accelerator("auto", 4)
    check_device("cpu")


def test_device_counts_are_checked_against_the_gpus(monkeypatch):
    """On a machine with one CUDA GPU (simulated), more devices than that are refused."""
    from cellfm_sc import _hardware

    monkeypatch.setattr(_hardware, "_cpu_only_build", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_accelerator("gpu", 1)
    check_accelerator("cuda", "auto")
    check_accelerator("gpu", [0])
    with pytest.raises(
        ValueError,
        match=r"devices=2 with accelerator='gpu' but this machine has 1 CUDA GPU; pass devices=1",
    ):
        check_accelerator("gpu", 2)
    with pytest.raises(ValueError, match=r"names CUDA GPU \[1\]"):
        check_accelerator("cuda", [0, 1])
    with pytest.raises(ValueError, match="devices=4 with accelerator='auto'"):
        check_accelerator("auto", 4)  # Lightning's auto would pick the GPU
    with pytest.raises(ValueError, match=r"device='cuda:1' but this machine has 1 CUDA GPU"):
        check_device("cuda:1")
    check_device("cuda:0")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    _cells(80).write_h5ad(path)
    return path


@NO_GPU
def test_cli_missing_gpu_exits_2_and_leaves_nothing(untrained, small_file, tmp_path):
    model, _ = untrained
    out = tmp_path / "out"
    for accelerator in ("gpu", "cuda"):
        proc = run_cli(
            "finetune", small_file, "--labels-key", "celltype", "--preset", "tiny",
            "--accelerator", accelerator, "-o", out,
        )  # fmt: skip
        assert_usage_error(proc, f"--accelerator {accelerator} but", "--accelerator cpu")
        assert not out.exists()
    out.mkdir()  # an existing folder stays as it was (no run.log)
    proc = run_cli(
        "pretrain", small_file, "--preset", "tiny", "--accelerator", "gpu", "--devices", "2",
        "-o", out,
    )  # fmt: skip
    assert_usage_error(proc, "--accelerator gpu but")
    assert not list(out.iterdir())
    model.save(tmp_path / "m")
    proc = run_cli(
        "predict", tmp_path / "m", small_file, "-o", tmp_path / "o.h5ad", "--device", "cuda"
    )
    assert_usage_error(proc, "--device cuda but", "--device cpu")
    assert not (tmp_path / "o.h5ad").exists()


# --------------------------------------------------------------------------------------------
# the light front: data errors before torch, anndata, scvi-tools, Lightning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--labels-key", "cell_type"], "--labels-key cell_type is not a column of adata.obs"),
        (["--donor-key", "Donor ID"], '--donor-key "Donor ID" is not a column of adata.obs'),
        (["--split-key", "fold"], "--split-key fold is not a column of adata.obs"),
        (["--layer", "counts"], "layer 'counts' not found in adata.layers"),
        (["--use-raw"], "adata.raw is None: --use-raw reads counts from adata.raw.X"),
        (["--gene-symbols", "symbol"], "--gene-symbols symbol is not a column of adata.var"),
        (["--split-json", "SPLIT"], "is not JSON"),
    ],
)
def test_data_errors_come_before_the_heavy_imports(small_file, tmp_path, extra, fragment):
    bad_json = tmp_path / "split.json"
    bad_json.write_text("{not json")
    extra = [str(bad_json) if e == "SPLIT" else e for e in extra]
    args = ["finetune", str(small_file), "--preset", "tiny", "-o", str(tmp_path / "out")]
    if "--labels-key" not in extra:
        args += ["--labels-key", "celltype"]
    args += extra
    code = (
        "import sys\n"
        "from cellfm_sc.cli import main\n"
        f"rc = main({args!r})\n"
        f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)  # no heavy import
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cellfm-sc: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_not_an_h5ad_file_is_said_at_once(tmp_path):
    bogus = tmp_path / "cells.h5ad"
    bogus.write_text("not hdf5")
    proc = run_cli(
        "finetune", bogus, "--labels-key", "x", "--preset", "tiny", "-o", tmp_path / "out"
    )
    assert_usage_error(proc, "cannot read", "not an HDF5 file")


# --------------------------------------------------------------------------------------------
# per-epoch checkpoints: the newest and the best are kept
# --------------------------------------------------------------------------------------------


def test_epoch_checkpoint_keeps_the_newest_and_the_best(tmp_path):
    for n in range(1, 6):
        (tmp_path / f"checkpoint_epoch_{n}.pth").write_bytes(b"x")
    (tmp_path / "checkpoint_epoch_9.pth").write_bytes(b"x")  # an earlier, longer run's
    best = BestStateCallback(monitor="validation_loss", mode="min")
    best.best_epoch = 2
    EpochCheckpoint(tmp_path, keep=2, best=best)._prune(5)
    assert [n for n, _ in epoch_checkpoints(tmp_path)] == [2, 4, 5, 9]
    EpochCheckpoint(tmp_path, keep=1)._prune(5)
    assert [n for n, _ in epoch_checkpoints(tmp_path)] == [5, 9]
    EpochCheckpoint(tmp_path, keep=-1)._prune(9)
    assert [n for n, _ in epoch_checkpoints(tmp_path)] == [5, 9]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="keep_checkpoints must be -1"):
            EpochCheckpoint(tmp_path, keep=bad)


@pytest.mark.slow
def test_training_keeps_newest_and_best_checkpoints_and_resumes(tmp_path):
    adata = _cells(80)
    model = _classifier(adata)
    fast = dict(batch_size=16, lr=1e-3, enable_progress_bar=False, logger=False)
    model.train(max_epochs=3, checkpoint_dir=tmp_path / "one", **fast)
    kept = {n for n, _ in epoch_checkpoints(tmp_path / "one")}
    assert kept == {3, model.best_epoch}  # the newest and the best epoch's, names unchanged
    again = _classifier(adata)
    again.train(max_epochs=3, checkpoint_dir=tmp_path / "all", keep_checkpoints=-1, **fast)
    assert {n for n, _ in epoch_checkpoints(tmp_path / "all")} == {1, 2, 3}
    # the newest one continues the run
    resumed = _classifier(adata)
    resumed.train(
        max_epochs=4,
        checkpoint_dir=tmp_path / "one",
        resume_from=tmp_path / "one" / "checkpoint_epoch_3.pth",
        **fast,
    )
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    assert 4 in {n for n, _ in epoch_checkpoints(tmp_path / "one")}
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _classifier(adata).train(max_epochs=1, checkpoint_dir=tmp_path / "x", keep_checkpoints=0)


def test_keep_checkpoints_flag():
    from cellfm_sc.cli import build_parser

    parser = build_parser()
    base = ["finetune", "d.h5ad", "--labels-key", "y", "-o", "o"]
    assert parser.parse_args(base).keep_checkpoints == 1
    assert parser.parse_args([*base, "--keep-checkpoints", "-1"]).keep_checkpoints == -1
    assert parser.parse_args(["pretrain", "d.h5ad", "-o", "o", "--keep-checkpoints", "3"])
    for bad in ("0", "-2", "x"):
        proc = run_cli(*base, "--keep-checkpoints", bad)
        assert_usage_error(proc, "argument --keep-checkpoints")


def test_gitignore_covers_the_demo_folder():
    repo = Path(__file__).resolve().parents[1]
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=repo, capture_output=True, text=True
    )
    if inside.returncode != 0:
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "cellfm_demo/checkpoint_epoch_5.pth"], cwd=repo
    )
    assert proc.returncode == 0, "./cellfm_demo (the demo's default output) is not git-ignored"


# --------------------------------------------------------------------------------------------
# quiet by default
# --------------------------------------------------------------------------------------------

BANNERS = ("GPU available", "TPU available", "litlogger", "Loading `train_dataloader`")


QUIET_SCRIPT = """
import logging, sys, warnings
warnings.simplefilter("default")
import torch
torch.set_num_threads(1)
import cellfm_sc
from cellfm_sc import CellFMClassifier
adata = cellfm_sc.datasets.pbmc3k()[::30].copy()
CellFMClassifier.setup_anndata(adata, labels_key="celltype")
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="no checkpoint given")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=32)
kw = dict(max_epochs=1, batch_size=16, enable_progress_bar=False, logger=False)
model.train(**kw)
print("-- verbose --", file=sys.stderr, flush=True)
logging.getLogger("cellfm_sc").setLevel(logging.DEBUG)  # Lightning's info lines come back
model.train(**kw)
print("-- verbose=True --", file=sys.stderr, flush=True)
logging.getLogger("cellfm_sc").setLevel(logging.WARNING)
model.train(**kw, verbose=True)  # the keyword alone brings them back
"""


def test_training_prints_no_banner_and_no_third_party_deprecation():
    proc = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    quiet, _, verbose = proc.stderr.partition("-- verbose --")
    verbose, _, keyword = verbose.partition("-- verbose=True --")
    for banner in BANNERS:
        assert banner not in quiet, quiet
    assert "LeafSpec" not in quiet and "does not have many workers" not in quiet, quiet
    assert "GPU available" in verbose  # the same run shows them when asked
    assert "GPU available" in keyword  # and with train(verbose=True)


@pytest.mark.slow
def test_cli_draws_progress_bars_only_when_asked_or_on_a_terminal(small_file, tmp_path):
    args = [
        "finetune", small_file, "--labels-key", "celltype", "--preset", "tiny",
        "--epochs", "1", "--max-tokens", "32", "--test-size", "0.2",
    ]  # fmt: skip
    plain = run_cli(*args, "-o", tmp_path / "a")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "\r" not in plain.stderr and "it/s" not in plain.stderr  # stderr is a pipe here
    for banner in BANNERS:
        assert banner not in plain.stderr
    assert "reading" in plain.stderr  # info lines stay
    shown = run_cli(*args, "-o", tmp_path / "b", "--progress")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "it/s" in shown.stderr or "s/it" in shown.stderr
    resolved = json.loads((tmp_path / "b" / "config_resolved.json").read_text())
    assert resolved["progress"] is True and resolved["keep_checkpoints"] == 1
    assert [n for n, _ in epoch_checkpoints(tmp_path / "b")] == [1]
