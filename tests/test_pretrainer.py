"""CellFMPretrainer end to end (tiny preset, a few hundred real cells, CPU): training,
the corpus of several files, the MindSpore export round trip, save/load, resume, the CLI."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc import CellFMClassifier, CellFMPretrainer
from cellfm_sc.dataloaders._corpus import member_gene_names, union_genes

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)
FAST = dict(max_epochs=1, batch_size=32, enable_progress_bar=False, logger=False)


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    keep = np.sort(np.random.default_rng(0).choice(full.n_obs, 160, replace=False))
    return full[keep].copy()


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, pbmc3k_path, shared_dir):
    """Two small files: pbmc3k cells (symbols) and Delorey lung cells (Ensembl var_names,
    symbols in var['gene_names'], some repeated)."""
    folder = tmp_path_factory.mktemp("corpus")
    a = ad.read_h5ad(pbmc3k_path)
    a = a[np.arange(0, 2700, 27)[:100]].copy()
    lung = ad.read_h5ad(shared_dir / "data" / "delorey2021_lung_raw.h5ad")
    lung = lung[:80].copy()
    a.write_h5ad(folder / "pbmc.h5ad")
    lung.write_h5ad(folder / "lung.h5ad")
    return folder / "pbmc.h5ad", folder / "lung.h5ad"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_history_latent_save_load(pbmc, tmp_path):
    adata = pbmc.copy()
    CellFMPretrainer.setup_anndata(adata)
    with pytest.warns(UserWarning, match="no pretrained weights"):
        model = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    assert "16,634 genes" in repr(model) and "mask_ratio=0.2" in repr(model)
    model.train(max_epochs=2, batch_size=32, validation_size=0.1, enable_progress_bar=False)
    hist = model.history
    assert list(hist["epoch"]) == [1, 2]
    for part in ("train", "validation"):
        for key in ("loss", "value_mse", "cellwise_mse"):
            assert hist[f"{part}_{key}"].notna().all() and (hist[f"{part}_{key}"] > 0).all()
        np.testing.assert_allclose(
            hist[f"{part}_loss"], hist[f"{part}_value_mse"] + hist[f"{part}_cellwise_mse"]
        )
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert len(model.train_indices) + len(model.validation_indices) == adata.n_obs
    assert len(model.validation_indices) == 16
    emb = model.get_latent_representation()
    assert emb.shape == (160, 64) and emb.dtype == np.float32 and np.isfinite(emb).all()
    val = model.get_latent_representation(indices="validation")
    np.testing.assert_allclose(val, emb[model.validation_indices], atol=1e-5)
    model.save(tmp_path / "m")
    loaded = CellFMPretrainer.load(tmp_path / "m", adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), emb, atol=1e-5)
    pd.testing.assert_frame_equal(loaded.history, hist)
    assert loaded.mask_ratio_ == 0.2
    with pytest.raises(ValueError, match="holds a CellFMPretrainer"):
        CellFMClassifier.load(tmp_path / "m", adata)
    # a loaded model trains on the set-up data it was given (continued pretraining)
    loaded.train(**FAST)
    assert len(loaded.history) == 1


def test_validation_masks_are_fixed_across_epochs(pbmc):
    adata = pbmc.copy()
    CellFMPretrainer.setup_anndata(adata)
    model = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    # lr ~ 0: the weights do not move, so the validation loss can only change with its masks
    model.train(max_epochs=2, batch_size=32, lr=1e-12, enable_progress_bar=False, logger=False)
    v = model.history["validation_loss"].to_numpy()
    assert abs(v[0] - v[1]) < 1e-6 * abs(v[0])
    t = model.history["train_loss"].to_numpy()
    assert abs(t[0] - t[1]) > 1e-4 * abs(t[0])  # training masks are redrawn


def test_corpus_union_vocabulary_and_per_file_maps(corpus_files):
    pbmc_path, lung_path = corpus_files
    before = _digest(lung_path), _digest(pbmc_path)
    lung = ad.read_h5ad(lung_path, backed="r")
    CellFMPretrainer.setup_anndata(lung, gene_symbols="gene_names")
    model = CellFMPretrainer([pbmc_path, lung], preset="tiny", max_tokens=64, seed=1)
    assert model.corpus == ["pbmc.h5ad", "lung.h5ad"]
    p_names = np.asarray(ad.read_h5ad(pbmc_path, backed="r").var_names, dtype=object)
    l_names = member_gene_names(lung, gene_symbols="gene_names")
    want = union_genes([p_names, l_names])
    assert list(model.vocab.names) == want
    assert len(set(l_names)) == lung.n_vars  # repeated symbols keep their Ensembl id
    symbols = lung.var["gene_names"].astype(str).to_numpy()
    repeated = pd.Index(symbols).duplicated()
    assert repeated.any()
    np.testing.assert_array_equal(l_names[repeated], np.asarray(lung.var_names)[repeated])
    m_pbmc, m_lung = model.members_
    # the same symbol gets the same token in both files
    shared = sorted(set(p_names) & set(l_names))[:50]
    assert len(shared) == 50
    ids_p = m_pbmc.gene_id_map[pd.Index(p_names).get_indexer(shared)]
    ids_l = m_lung.gene_id_map[pd.Index(l_names).get_indexer(shared)]
    np.testing.assert_array_equal(ids_p, ids_l)
    np.testing.assert_array_equal(model.vocab.ids(l_names), m_lung.gene_id_map)

    # one epoch: every training cell of both files once, batches of one file each
    model._split_members(0.1)
    from cellfm_sc.dataloaders._corpus import CorpusDataModule

    dm = CorpusDataModule(model.members_, batch_size=16, max_tokens=64, seed=1)
    loader = dm.loader(train=True)
    loader.sampler.set_epoch(0)
    seen = {0: [], 1: []}
    lung_ids = set(m_lung.gene_id_map.tolist())
    pbmc_ids = set(m_pbmc.gene_id_map.tolist())
    for batch in loader:
        ids = set(batch.gene_ids[batch.valid].tolist())
        member = 0 if ids <= pbmc_ids and not ids <= lung_ids else 1
        assert ids <= (pbmc_ids if member == 0 else lung_ids)
        seen[member].extend(batch.obs_index.tolist())
    assert sorted(seen[0]) == m_pbmc.train.tolist()
    assert sorted(seen[1]) == m_lung.train.tolist()

    model.train(**FAST)
    assert model.train_settings_["corpus"] == {
        "pbmc.h5ad": {"train": 95, "validation": 5},
        "lung.h5ad": {"train": 76, "validation": 4},
    }
    with pytest.raises(ValueError, match="pass adata="):
        model.get_latent_representation()
    emb = model.get_latent_representation(lung)  # read with its own gene_symbols setting
    assert emb.shape == (80, 64) and np.isfinite(emb).all()
    lung.file.close()
    assert (_digest(lung_path), _digest(pbmc_path)) == before  # files untouched


def test_corpus_errors(corpus_files, pbmc, tmp_path):
    pbmc_path, lung_path = corpus_files
    with pytest.raises(ValueError, match=r"'lung.h5ad' names its genes by Ensembl id.*gene_names"):
        CellFMPretrainer([pbmc_path, lung_path], preset="tiny")
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad"):
        CellFMPretrainer([pbmc_path, tmp_path / "missing.h5ad"], preset="tiny")
    with pytest.raises(ValueError, match="listed twice"):
        CellFMPretrainer([pbmc_path, str(pbmc_path)], preset="tiny")
    bare = pbmc.copy()
    with pytest.raises(ValueError, match=r"corpus member 1 .* is not set up"):
        CellFMPretrainer([pbmc_path, bare], preset="tiny")
    with pytest.raises(TypeError, match="corpus member 0"):
        CellFMPretrainer([42], preset="tiny")
    adata = pbmc.copy()
    with pytest.raises(KeyError, match="gene_symbols='symbol' is not a column"):
        CellFMPretrainer.setup_anndata(adata, gene_symbols="symbol")
    CellFMPretrainer.setup_anndata(adata)
    with pytest.raises(ValueError, match="mask_ratio"):
        CellFMPretrainer(adata, preset="tiny", mask_ratio=0)
    model = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    for kwargs, match in (
        ({"validation_size": 1.0}, "validation_size"),
        ({"lr": "fast"}, "lr"),
        ({"max_epochs": 0}, "max_epochs"),
    ):
        with pytest.raises(ValueError, match=match):
            model.train(**{**FAST, **kwargs})


def test_cells_without_counts_are_left_out(pbmc):
    adata = pbmc.copy()
    x = adata.X.tolil()
    x[[3, 7], :] = 0
    adata.X = sp.csr_matrix(x)
    CellFMPretrainer.setup_anndata(adata)
    model = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    with pytest.warns(UserWarning, match="2 cell"):
        model.train(**FAST)
    assert 3 not in model.train_indices and 7 not in model.validation_indices
    assert len(model.train_indices) + len(model.validation_indices) == 158


def test_export_round_trip_and_classifier_transfer(pbmc, tmp_path):
    from cellfm_sc.io import read_mindspore_checkpoint, trunk_from_mindspore

    adata = pbmc.copy()
    CellFMPretrainer.setup_anndata(adata)
    model = CellFMPretrainer(adata, preset="tiny", max_tokens=64, seed=3)
    model.train(**FAST)
    ckpt, vocab = model.export_mindspore(tmp_path / "export")
    assert (ckpt.name, vocab.name) == ("cellfm.ckpt", "gene_info.csv")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.export_mindspore(tmp_path / "export")
    state = read_mindspore_checkpoint(ckpt)
    assert int(state["num_heads"]) == 4
    assert "encoder.0.post_norm1.gamma" in state and "value_enc.mask_emb" in state
    assert state["gene_emb"].shape == (16640, 64)
    rows = pd.read_csv(vocab)
    assert rows.columns[0] == "HGNC_gene" and list(rows.iloc[:, 0]) == list(model.vocab.names)
    # pbmc3k's var["gene_ids"] travel as the vocabulary's Ensembl ids
    assert list(rows["ensembl_id"]) == list(adata.var["gene_ids"])

    # reader -> trunk: the same parameters and the same outputs, no num_heads= needed
    trunk, report = trunk_from_mindspore(ckpt)
    assert report.variant == "A" and "num_heads" in report.skipped
    own = model.module.trunk.state_dict()
    back = trunk.state_dict()
    assert set(own) == set(back)
    for k in own:
        assert torch.equal(own[k], back[k]), k
    batch = next(iter(_batches(adata, model)))
    trunk.eval()
    with torch.no_grad():
        a = model.module.trunk.eval()(batch.values, batch.gene_ids, batch.valid).cls
        b = trunk(batch.values, batch.gene_ids, batch.valid).cls
    assert torch.equal(a, b)

    # the classifier fine-tunes from it with its defaults: every pretrained row transfers
    query = pbmc[:, ::-1].copy()  # other gene order
    CellFMClassifier.setup_anndata(query, labels_key="celltype")
    clf = CellFMClassifier(query, checkpoint=ckpt, vocabulary_file=vocab, embedding_init="transfer")
    assert clf.pretrained_report_["coverage"] == 1.0
    pos = model.vocab.ids(np.asarray(query.var_names, dtype=object))
    torch.testing.assert_close(
        clf.module.trunk.gene_emb[1 : query.n_vars + 1].detach(),
        model.module.trunk.gene_emb[torch.as_tensor(pos)].detach(),
        rtol=0,
        atol=0,
    )
    for k, v in model.module.trunk.state_dict().items():
        if k != "gene_emb":
            assert torch.equal(clf.module.trunk.state_dict()[k], v), k
    # the defaults after a checkpoint are the recipe that kept the pretraining gain:
    # lr="auto" is 1e-3 for this narrow trunk (1e-4 at the released width) and everything
    # the classification uses trains, the transferred gene embedding included
    from cellfm_sc.model import auto_lr

    assert clf.pretrained and auto_lr(clf.pretrained, clf.module.trunk.config) == 1e-3
    trained = set(clf.trainable_summary.trainable)
    assert {
        "trunk.gene_emb",
        "trunk.value_enc.value_enc.table.weight",
        "trunk.cls_token",
    } <= trained
    assert any(n.startswith("head.") for n in trained)
    # a query with Ensembl var_names and partly renamed symbols maps the renamed genes by id
    by_id = pbmc[:, :400].copy()
    by_id.var["symbol"] = [
        f"RENAMED{i}" if i % 4 == 0 else s for i, s in enumerate(by_id.var_names)
    ]
    by_id.var_names = by_id.var["gene_ids"].astype(str).to_numpy()
    CellFMClassifier.setup_anndata(by_id, labels_key="celltype", gene_symbols="symbol")
    clf2 = CellFMClassifier(
        by_id, checkpoint=ckpt, vocabulary_file=vocab, embedding_init="transfer"
    )
    assert clf2.pretrained_report_["coverage"] == 1.0
    assert clf2.pretrained_report_["mapping_counts"]["ensembl"] == 100
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        CellFMClassifier(query, checkpoint=ckpt, num_heads=8)


def _batches(adata, model):
    from cellfm_sc.data import batches

    return batches(adata, batch_size=8, max_tokens=model.max_tokens, indices=np.arange(8))


def test_resume_continues_the_history(pbmc, tmp_path):
    adata = pbmc.copy()
    CellFMPretrainer.setup_anndata(adata)
    first = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    first.train(max_epochs=1, batch_size=32, enable_progress_bar=False, checkpoint_dir=tmp_path)
    assert (tmp_path / "checkpoint_epoch_1.pth").is_file()
    again = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    again.train(
        max_epochs=2,
        batch_size=32,
        enable_progress_bar=False,
        logger=False,
        resume_from=tmp_path / "checkpoint_epoch_1.pth",
    )
    assert list(again.history["epoch"]) == [1, 2]
    assert again.history["train_loss"].iloc[0] == pytest.approx(first.history["train_loss"].iloc[0])
    with pytest.raises(FileNotFoundError, match="resume_from"):
        again.train(**FAST, resume_from=tmp_path / "nope.pth")


@pytest.mark.slow
def test_cli_pretrain_resume_inspect(corpus_files, tmp_path):
    from cellfm_sc.cli import main

    pbmc_path, lung_path = corpus_files
    out = tmp_path / "run"
    argv = [
        "pretrain", str(pbmc_path), str(lung_path), "--gene-symbols", "lung.h5ad=gene_names",
        "--preset", "tiny", "--epochs", "1", "--max-tokens", "64", "-o", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    for name in ("cellfm.ckpt", "gene_info.csv", "model", "history.json", "loss_curve.png"):
        assert (out / name).exists(), name
    facts = json.loads((out / "history.json").read_text())
    assert facts["n_genes"] > 16634 and len(facts["history"]["train_loss"]) == 1
    # --resume continues to 2 epochs
    assert (
        main(
            [
                *argv[:-5],
                "--epochs",
                "2",
                "--max-tokens",
                "64",
                "-o",
                str(out),
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "history.json").read_text())["history"]["train_loss"]) == 2
    assert main(["inspect", str(out / "cellfm.ckpt")]) == 0
    loaded = CellFMPretrainer.load(out / "model")
    assert loaded.vocab.n_genes == facts["n_genes"]
    # errors in flags, before any work
    assert main(["pretrain", str(pbmc_path), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert (
        main(
            [
                *argv[:5],
                "--gene-symbols",
                "other.h5ad=x",
                "--preset",
                "tiny",
                "-o",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "y").exists()


def test_cli_pretrain_help_and_symbol_columns(tmp_path, capsys):
    from pathlib import Path

    from cellfm_sc.cli import main
    from cellfm_sc.cli._console import CLIError
    from cellfm_sc.cli.pretrain import gene_symbol_columns

    assert main(["pretrain", "--help"]) == 0
    assert "--gene-symbols" in capsys.readouterr().out
    files = [Path("data/a.h5ad"), Path("other/b.h5ad")]
    per_file, everywhere = gene_symbol_columns(["b.h5ad=gene_names", "symbol"], files)
    assert per_file == {files[1]: "gene_names"} and everywhere == ["symbol"]
    with pytest.raises(CLIError, match="not one of the input files"):
        gene_symbol_columns(["c.h5ad=gene_names"], files)
