"""CellFMClassifier end to end on small real data (tiny preset, CPU)."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc import CellFMClassifier

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)
FAST = dict(max_epochs=2, lr=1e-3, batch_size=16, enable_progress_bar=False)


@pytest.fixture(scope="module")
def pbmc_small(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(full.n_obs, 240, replace=False))
    return full[keep].copy()


def _model(adata, **kw):
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    return CellFMClassifier(adata, preset="tiny", max_tokens=128, **kw)


def test_train_annotate_save_load(pbmc_small, tmp_path):
    adata = pbmc_small.copy()
    with pytest.warns(UserWarning, match="no pretrained weights"):
        CellFMClassifier.setup_anndata(adata, labels_key="celltype")
        model = CellFMClassifier(adata, preset="tiny", max_tokens=128)
    assert "no pretrained weights" in repr(model) and "16,634 genes" in repr(model)
    model.train(validation_size=0.2, test_size=0.1, **FAST)
    hist = model.history
    assert list(hist["epoch"]) == [1, 2]
    for col in ("train_loss", "train_acc", "validation_loss", "validation_acc", "lr"):
        assert hist[col].notna().all(), col
    assert len(model.train_indices) + len(model.validation_indices) + len(model.test_indices) == 240
    model.annotate()
    k = len(model.classes_)
    assert isinstance(adata.obs["cellfm_prediction"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["cellfm_prediction"].cat.categories) == model.classes_
    assert adata.obs["cellfm_confidence"].dtype == np.float32
    assert adata.obsm["cellfm_probabilities"].shape == (240, k)
    assert adata.obsm["cellfm_probabilities"].dtype == np.float32
    np.testing.assert_allclose(adata.obsm["cellfm_probabilities"].sum(1), 1.0, atol=1e-5)
    assert adata.obsm["X_cellfm"].shape == (240, 64) and adata.obsm["X_cellfm"].dtype == np.float32
    assert adata.uns["cellfm"]["classes"] == model.classes_
    soft = model.predict(soft=True)
    assert list(soft.columns) == model.classes_ and list(soft.index) == list(adata.obs_names)
    labels = model.predict()
    np.testing.assert_array_equal(labels, adata.obs["cellfm_prediction"].astype(str).to_numpy())

    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m")
    loaded = CellFMClassifier.load(tmp_path / "m", adata)
    np.testing.assert_allclose(loaded.predict(soft=True).to_numpy(), soft.to_numpy(), atol=1e-6)
    np.testing.assert_array_equal(loaded.predict(), labels)
    pd.testing.assert_frame_equal(loaded.history, hist)
    # a permutation of the genes is reordered; other genes raise
    perm = adata[:, adata.var_names[::-1]].copy()
    again = CellFMClassifier.load(tmp_path / "m", perm)
    np.testing.assert_allclose(again.predict(soft=True).to_numpy(), soft.to_numpy(), atol=1e-6)
    # query data with another gene set: a warning gives the coverage
    fewer = CellFMClassifier.load(tmp_path / "m", adata[:, 1:].copy())
    with pytest.warns(UserWarning, match="16,633 of the model's 16,634 genes"):
        fewer.predict()
    # prediction-only data (no labels column)
    bare = ad.AnnData(adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names), var=adata.var)
    other = CellFMClassifier.load(tmp_path / "m", bare)
    np.testing.assert_allclose(other.predict(soft=True).to_numpy(), soft.to_numpy(), atol=1e-6)
    # the embedding is deterministic and the same as annotate's
    np.testing.assert_allclose(model.get_latent_representation(), adata.obsm["X_cellfm"], atol=1e-6)


def test_golden_checkpoint_random_and_transfer(golden_dir, tmp_path):
    vocab_file = golden_dir / "vocab_d48_h4_l2_g37.csv"
    with open(vocab_file, newline="") as fh:
        symbols = [r[0] for r in list(csv.reader(fh))[1:] if r]
    genes = symbols[:30] + [f"NOVEL{i}" for i in range(10)]
    rng = np.random.default_rng(1)
    counts = sp.random(120, len(genes), density=0.5, random_state=rng, format="csr")
    counts.data = rng.integers(1, 30, size=counts.nnz).astype(np.float32)
    counts = counts + sp.eye(120, len(genes), format="csr")  # no empty cell
    obs = pd.DataFrame(
        {"label": np.where(np.arange(120) % 2 == 0, "a", "b")},
        index=[f"c{i}" for i in range(120)],
    )
    adata = ad.AnnData(counts.tocsr(), obs=obs, var=pd.DataFrame(index=genes))
    CellFMClassifier.setup_anndata(adata, labels_key="label")
    ckpt = golden_dir / "model_d48_h4_l2_g37_backbone.ckpt"
    for init in ("random", "transfer"):
        model = CellFMClassifier(
            adata, checkpoint=ckpt, vocabulary_file=vocab_file, num_heads=4, embedding_init=init
        )
        assert "variant A'" in repr(model) and "30/40" in repr(model)
        table = model.module.trunk.gene_emb.detach().numpy()
        orig = np.load(golden_dir / "params_d48_h4_l2_g37_backbone.npz")["gene_emb"]
        same = (table[1:31] == orig[1:31]).all(axis=1)
        assert same.all() if init == "transfer" else not same.any()
        model.train(max_epochs=1, validation_size=0.2, enable_progress_bar=False)
        model.annotate()
        assert adata.obsm["X_cellfm"].shape == (120, 48)
        model.save(tmp_path / init)
        loaded = CellFMClassifier.load(tmp_path / init, adata)
        np.testing.assert_allclose(
            loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy(), atol=1e-6
        )


def test_donor_split_keeps_donors_whole_and_report(wu2020_path, tmp_path):
    adata = ad.read_h5ad(wu2020_path)
    stage = {
        p: ["low", "mid", "high"][i % 3]
        for i, p in enumerate(sorted(adata.obs["patient"].unique()))
    }
    adata.obs["stage"] = adata.obs["patient"].map(stage).astype(str)
    CellFMClassifier.setup_anndata(
        adata, labels_key="stage", donor_key="patient", label_order=["low", "mid", "high"]
    )
    model = CellFMClassifier(adata, preset="tiny", max_tokens=64)
    assert model.ordinal_
    model.train(max_epochs=1, validation_size=0.2, test_size=0.2, enable_progress_bar=False)
    donors = adata.obs["patient"].to_numpy()
    sets = [
        set(donors[i]) for i in (model.train_indices, model.validation_indices, model.test_indices)
    ]
    assert sets[0] and sets[1] and sets[2]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    result = model.evaluate()
    assert "qwk" in result.cell_metrics
    assert result.donor_table is not None and set(result.donor_table.index) == sets[2]
    assert result.cell_metrics["n_cells"] == len(model.test_indices)  # no cell dropped

    import json

    from cellfm_sc.report import write_report

    from .test_plotting_report import _assert_png_not_blank, _validate

    files = write_report(
        tmp_path / "report", result, history=model.history, info=model.report_info(), umap=True
    )
    names = {p.name for p in files.values()}
    assert names == {
        "training_results.json",
        "predictions.csv",
        "donor_predictions.csv",
        "confusion_matrix.png",
        "training_curves.png",
        "umap.png",
    }
    record = json.loads((tmp_path / "report" / "training_results.json").read_text())
    _validate(record, donors=True, ordinal=True)
    assert record["n_genes"] == adata.n_vars and record["num_classes"] == 3
    assert record["checkpoint_variant"] is None and record["gene_embedding"] == "random"
    for name in ("confusion_matrix.png", "training_curves.png", "umap.png"):
        _assert_png_not_blank(tmp_path / "report" / name)
    preds = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert len(preds) == len(model.test_indices)


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted_run(pbmc_small, tmp_path, request):
    """A run stopped after epoch 1 and resumed equals the run that was never stopped."""
    import lightning.pytorch as pl

    class CrashAfterFirstEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise _Crash("stopped")

    kw = dict(validation_size=0.2, enable_progress_bar=False, early_stopping=False, max_epochs=2)
    # one thread: the sparse gradient of the gene embedding is summed in a thread-dependent
    # order with several threads, which alone moves the loss by ~1e-7 per step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    a = pbmc_small.copy()
    full = _model(a, seed=3)
    full.train(**kw)
    b = pbmc_small.copy()
    first = _model(b, seed=3)
    with pytest.raises(_Crash):
        first.train(checkpoint_dir=tmp_path, callbacks=[CrashAfterFirstEpoch()], **kw)
    ckpt = tmp_path / "checkpoint_epoch_1.pth"
    assert ckpt.is_file() and not (tmp_path / "checkpoint_epoch_2.pth").exists()
    resumed = _model(b, seed=3)
    with torch.no_grad():  # spoil the weights: everything must come from the checkpoint
        for p in resumed.module.parameters():
            p.add_(0.5)
    resumed.train(resume_from=ckpt, checkpoint_dir=tmp_path, **kw)
    pd.testing.assert_frame_equal(resumed.history, full.history, atol=1e-6, rtol=0)
    for (n, p), (_, q) in zip(
        full.module.state_dict().items(), resumed.module.state_dict().items()
    ):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_step_validation_history(pbmc_small):
    adata = pbmc_small[:120].copy()
    model = _model(adata)
    model.train(
        max_epochs=2,
        batch_size=16,
        validation_size=0.2,
        check_val_every_n_steps=2,
        early_stopping=False,
        enable_progress_bar=False,
    )
    steps = model.step_history
    n_batches = -(-len(model.train_indices) // 16)  # 96 cells -> 6 batches per epoch
    assert len(steps) == 2 * (n_batches // 2)
    assert list(steps["step"]) == sorted(steps["step"]) and steps["step"].iloc[0] == 2
    assert steps[["train_loss", "validation_loss", "validation_acc"]].notna().all().all()
    assert list(model.history["epoch"]) == [1, 2]
    # each epoch row carries that epoch's last validation
    last = steps.groupby("epoch").tail(1)["validation_acc"].to_numpy()
    np.testing.assert_allclose(model.history["validation_acc"].to_numpy(), last)


def test_masked_value_auxiliary_objective(pbmc_small, golden_dir):
    adata = pbmc_small[:120].copy()
    model = _model(adata)
    before = model.module.trunk.value_dec.w1.weight.detach().clone()
    model.train(
        max_epochs=1, validation_size=0.2, masked_value_weight=1.0, enable_progress_bar=False
    )
    assert np.isfinite(model.history[["train_loss", "validation_loss"]].to_numpy()).all()
    assert not torch.equal(model.module.trunk.value_dec.w1.weight, before)  # the decoder trained
    assert model.train_settings_["masked_value_weight"] == 1.0
    # an annotation-Backbone checkpoint has no value decoder
    backbone = CellFMClassifier(
        adata, checkpoint=golden_dir / "model_d48_h4_l2_g37_backbone.ckpt", num_heads=4
    )
    with pytest.raises(ValueError, match="value decoder"):
        backbone.train(max_epochs=1, masked_value_weight=0.5)


def test_lora_train_save_load(pbmc_small, tmp_path):
    pytest.importorskip("peft", reason="peft (optional extra 'lora') is not installed")
    adata = pbmc_small[:120].copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=128, trainable="lora")
    assert any("lora_" in n for n, p in model.module.named_parameters() if p.requires_grad)
    model.train(max_epochs=1, validation_size=0.2, lr=1e-2, enable_progress_bar=False)
    soft = model.predict(soft=True).to_numpy()
    model.save(tmp_path / "lora")
    # saved with its adapters; it reloads as LoRA with the saved rank
    state = torch.load(tmp_path / "lora" / "model.pt", weights_only=True)["model_state_dict"]
    assert [k for k in state if "lora_" in k]
    loaded = CellFMClassifier.load(tmp_path / "lora", adata)
    assert loaded.trainable_ == "lora"
    trainable = [n for n, p in loaded.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    np.testing.assert_allclose(loaded.predict(soft=True).to_numpy(), soft, atol=1e-5)
    # the exported weights are merged: plain trunk names, no adapter tensors
    merged = model.export_state_dict()
    assert not [k for k in merged if "lora_" in k or "base_layer" in k]
    assert any("lora_" in n for n, _ in model.module.named_parameters())  # original untouched


def test_backed_training_and_annotate(pbmc_small, tmp_path):
    path = tmp_path / "small.h5ad"
    pbmc_small.write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    model = _model(adata)
    model.train(max_epochs=1, validation_size=0.2, enable_progress_bar=False)
    model.annotate()
    assert adata.isbacked and adata.obsm["X_cellfm"].shape == (240, 64)
    mem = pbmc_small.copy()
    CellFMClassifier.setup_anndata(mem, labels_key="celltype")
    np.testing.assert_allclose(
        model.get_latent_representation(mem), adata.obsm["X_cellfm"], atol=1e-5
    )


def test_clear_errors_before_training(pbmc_small, golden_dir):
    adata = pbmc_small.copy()
    with pytest.raises(KeyError, match=r"'cell_type' is not a column of adata\.obs.*'celltype'"):
        CellFMClassifier.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(KeyError, match="counts"):
        CellFMClassifier.setup_anndata(adata, labels_key="celltype", layer="counts")
    one = adata.copy()
    one.obs["one"] = "x"
    with pytest.raises(ValueError, match="single class"):
        CellFMClassifier.setup_anndata(one, labels_key="one")
    nan = adata.copy()
    nan.obs["lab"] = nan.obs["celltype"].astype(object)
    nan.obs.iloc[:3, nan.obs.columns.get_loc("lab")] = np.nan
    with pytest.raises(ValueError, match="3 missing"):
        CellFMClassifier.setup_anndata(nan, labels_key="lab")
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    with pytest.raises(ValueError, match=r"trainable must be one of .*got 'encoder'"):
        CellFMClassifier(adata, preset="tiny", trainable="encoder")
    with pytest.raises(ValueError, match="embedding_init must be one of"):
        CellFMClassifier(adata, preset="tiny", embedding_init="pretrained")
    ckpt = golden_dir / "model_d48_h4_l2_g37_backbone.ckpt"
    with pytest.raises(ValueError, match="enc_dims is 48 in the checkpoint but 64 in the preset"):
        CellFMClassifier(adata, checkpoint=ckpt, num_heads=4, preset="tiny")
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        CellFMClassifier(adata, checkpoint=ckpt, num_heads=5)
    log = pbmc_small.copy()
    log.X = log.X.copy()
    log.X.data = np.log1p(log.X.data)
    with pytest.raises(ValueError, match="log-normalised"):
        CellFMClassifier.setup_anndata(log, labels_key="celltype")


@pytest.mark.slow
def test_ddp_two_cpu_processes(pbmc_small, tmp_path):
    path = tmp_path / "small.h5ad"
    pbmc_small.write_h5ad(path)
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import warnings, json
            warnings.filterwarnings("ignore")
            import anndata as ad
            from cellfm_sc import CellFMClassifier
            adata = ad.read_h5ad({str(path)!r})
            CellFMClassifier.setup_anndata(adata, labels_key="celltype")
            # "all" trains parameters the forward never uses (decoders): DDP must cope
            model = CellFMClassifier(adata, preset="tiny", max_tokens=64, trainable="all")
            model.train(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                        batch_size=7, validation_size=0.2, enable_progress_bar=False,
                        early_stopping=True, patience=5)
            model.save({str(tmp_path / "saved")!r})  # only rank 0 writes
            print("RANK", model.global_rank_, "HISTORY", json.dumps(model.history.to_dict("list")))
            print("WORLD", model.train_settings_["world_size"])
            print("NVAL", len(model.validation_indices))
            """
        )
    )
    res = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RANK")]
    assert sorted(ln.split()[1] for ln in lines) == ["0", "1"]  # both processes trained
    import json

    hist = json.loads(lines[0].split(" ", 3)[3])
    assert json.loads(lines[1].split(" ", 3)[3]) == hist  # metrics reduced across ranks
    assert (tmp_path / "saved" / "model.pt").is_file()
    assert hist["epoch"] == [1, 2]
    assert all(v == v for v in hist["validation_acc"])  # not NaN
    assert "WORLD 2" in res.stdout
    # every validation cell counted exactly once although ranks are padded to equal batches
    n_val = int(next(ln for ln in res.stdout.splitlines() if ln.startswith("NVAL")).split()[1])
    assert hist["validation_n_cells"] == [n_val, n_val]


def test_import_is_light():
    code = (
        "import sys, time; t=time.time(); import cellfm_sc; dt=time.time()-t; "
        "heavy=[m for m in ('scvi','lightning','matplotlib','scanpy','torch') if m in sys.modules]; "
        "print(dt, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dt, heavy = out.stdout.split(" ", 1)
    assert heavy.strip() == "[]"
    assert float(dt) < 1.5


@pytest.mark.slow
def test_learns_pbmc3k_celltypes(pbmc3k_path):
    """Held-out accuracy >= 0.80 on pbmc3k cell types (majority class ~0.43), tiny preset."""
    adata = ad.read_h5ad(pbmc3k_path)
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=512, seed=0)
    model.train(
        max_epochs=4,
        lr=1e-3,
        batch_size=16,
        validation_size=0.1,
        test_size=0.2,
        patience=2,
        enable_progress_bar=False,
    )
    result = model.evaluate()  # the 20% test cells, never used for training or selection
    majority = adata.obs["celltype"].value_counts(normalize=True).iloc[0]
    print(
        f"pbmc3k held-out accuracy {result.cell_metrics['accuracy']:.4f} (majority {majority:.3f})"
    )
    assert result.cell_metrics["n_cells"] == len(model.test_indices) == 540
    assert result.cell_metrics["accuracy"] >= 0.80
