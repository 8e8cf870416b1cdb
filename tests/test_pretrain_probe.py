"""The pretraining probe (EmbeddingProbe, history, plot) and balanced corpus sampling."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from cellfm_sc import CellFMPretrainer, EmbeddingProbe
from cellfm_sc.dataloaders._corpus import CorpusDataModule, balanced_quotas
from cellfm_sc.model._probe import probe_score

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    keep = np.sort(np.random.default_rng(4).choice(full.n_obs, 300, replace=False))
    return full[keep].copy()


def test_probe_score_is_sklearn_knn_macro_f1():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 8)) + 3.0 * np.eye(8)[y]  # separable-ish clusters
    got = probe_score(x, y, method="knn", n_neighbors=5, folds=4, seed=3)
    pred = np.empty_like(y)
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):
        clf = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(x[tr], y[tr])
        pred[te] = clf.predict(x[te])
    assert got == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert got > 0.6
    # fit on one set, score another; labels that carry nothing score near chance
    test_x = rng.normal(size=(60, 8)) + 3.0 * np.eye(8)[np.repeat(np.arange(3), 20)]
    test_y = np.repeat(np.arange(3), 20)
    clf = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(x, y)
    want = f1_score(test_y, clf.predict(test_x), average="macro")
    assert probe_score(x, y, test_x, test_y, n_neighbors=5) == pytest.approx(want, abs=1e-12)
    noise = probe_score(rng.normal(size=(120, 8)), rng.permutation(y), method="logreg")
    assert noise < 0.5
    assert np.isnan(probe_score(np.full((120, 8), np.nan), y))
    with pytest.raises(ValueError, match="probe method must be one of"):
        probe_score(x, y, method="svm")


def test_probe_checks_its_input(pbmc):
    with pytest.raises(KeyError, match="cell_type"):
        EmbeddingProbe(pbmc, "cell_type")
    one = pbmc.copy()
    one.obs["one"] = "B"
    with pytest.raises(ValueError, match="at least 2 classes"):
        EmbeddingProbe(one, "one")
    other = pbmc.copy()
    other.obs["celltype"] = "unseen"
    with pytest.raises(ValueError, match="no cell of the probe's test data"):
        EmbeddingProbe(pbmc, "celltype", test=other)
    with pytest.raises(ValueError, match="n_neighbors must be an integer"):
        EmbeddingProbe(pbmc, "celltype", n_neighbors=0)
    probe = EmbeddingProbe(pbmc, "celltype", max_cells=50)
    assert probe.rows.size == 50 and probe.describe()["n_cells"] == 50
    with pytest.raises(RuntimeError, match="before bind"):
        probe.score(None)


def test_pretrainer_records_the_probe_every_epoch(pbmc, tmp_path):
    corpus = pbmc[:200].copy()
    CellFMPretrainer.setup_anndata(corpus)
    model = CellFMPretrainer(corpus, preset="tiny", max_tokens=64, seed=1)
    labelled = pbmc[200:].copy()
    probes = {
        "same": EmbeddingProbe(labelled, "celltype", n_neighbors=5, folds=3),
        "across": EmbeddingProbe(labelled[:50].copy(), "celltype", test=labelled[50:].copy()),
    }
    with pytest.raises(TypeError, match="probe must be an EmbeddingProbe"):
        model.train(max_epochs=1, probe="celltype", logger=False, enable_progress_bar=False)
    model.train(
        max_epochs=2,
        batch_size=32,
        validation_size=0.0,
        probe=probes,
        logger=False,
        enable_progress_bar=False,
    )
    hist = model.history
    for column in ("probe_same_macro_f1", "probe_across_macro_f1"):
        assert column in hist and len(hist[column]) == 2
        assert np.isfinite(hist[column]).all() and (hist[column].between(0, 1)).all()
    settings = model.train_settings_["probe"]
    assert settings["probe_same_macro_f1"]["folds"] == 3
    assert settings["probe_across_macro_f1"]["n_test_cells"] == 50
    start = settings["probe_same_macro_f1"]["initial_macro_f1"]
    assert 0 <= start <= 1
    # the score is that of the trunk the model holds (the last epoch: no validation cells
    # chose another one), recomputed here from its embeddings
    probe = probes["same"]
    emb = model.get_latent_representation(labelled)[probe.rows]
    want = probe_score(emb, probe.codes, n_neighbors=5, folds=3, seed=0)
    assert hist["probe_same_macro_f1"].iloc[-1] == pytest.approx(want, abs=1e-9)
    # plotted beside the masked loss
    from cellfm_sc.plotting import pretraining_curves

    fig = pretraining_curves(
        hist,
        probe_initial={c: s["initial_macro_f1"] for c, s in settings.items()},
        show=False,
    )
    assert [a.get_title() for a in fig.axes][-1] == "probe macro-F1"
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert labels == ["same", "same, before", "across", "across, before"]
    # one probe: the plain column
    model.train(max_epochs=1, probe=probes["same"], logger=False, enable_progress_bar=False)
    assert "probe_macro_f1" in model.history


def test_balanced_quotas_and_sampler(pbmc):
    assert balanced_quotas([10, 2, 0, 3]) == [5, 5, 0, 5]
    assert balanced_quotas([0, 0]) == [0, 0]
    big, small = pbmc[:240].copy(), pbmc[240:270].copy()
    for a in (big, small):
        CellFMPretrainer.setup_anndata(a)
    model = CellFMPretrainer([big, small], preset="tiny", max_tokens=32, seed=2)
    model._split_members(0.0)
    with pytest.raises(ValueError, match="corpus sampling must be one of"):
        CorpusDataModule(model.members_, batch_size=10, max_tokens=32, sampling="even")
    counts = {}
    for sampling in ("proportional", "balanced"):
        dm = CorpusDataModule(model.members_, batch_size=10, max_tokens=32, sampling=sampling)
        loader = dm.loader(train=True)
        per_epoch = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            seen = {0: [], 1: []}
            for member, _, rows, _ in loader.sampler:  # (member, epoch key, rows, weight)
                seen[member].append(rows)
            per_epoch.append({m: np.concatenate(v) for m, v in seen.items()})
            n_cells = sum(len(b) for b in loader)  # the loader reads what the sampler says
            assert n_cells == sum(len(v) for v in per_epoch[-1].values())
        counts[sampling] = per_epoch
        assert len(loader) == 27  # 24 + 3 batches either way: the epoch keeps its length
    prop = counts["proportional"][0]
    assert sorted(prop[0].tolist()) == list(range(240))
    assert sorted(prop[1].tolist()) == list(range(30))
    for epoch in counts["balanced"]:
        # 14 / 13 batches each: the small member's 30 cells repeated, the big one sub-sampled
        assert {len(epoch[0]) // 10, len(epoch[1]) // 10} == {13, 14}
        assert set(epoch[1].tolist()) == set(range(30))
        assert len(set(epoch[0].tolist())) == len(epoch[0]) < 240
    # the big member's cells differ between epochs
    assert set(counts["balanced"][0][0].tolist()) != set(counts["balanced"][1][0].tolist())


def test_cli_pretrain_records_the_probe(pbmc, tmp_path, capsys):
    import json

    from cellfm_sc.cli import main

    corpus, labelled = tmp_path / "corpus.h5ad", tmp_path / "labelled.h5ad"
    pbmc[:200].write_h5ad(corpus)
    pbmc[200:].write_h5ad(labelled)
    out = tmp_path / "run"
    base = ["pretrain", str(corpus), "--preset", "tiny", "--epochs", "1", "--max-tokens", "32"]
    assert main([*base, "--probe", str(labelled), "-o", str(out), "--quiet"]) == 2
    assert "--probe and --probe-labels-key go together" in capsys.readouterr().err
    argv = [*base, "--probe", str(labelled), "--probe-labels-key", "celltype", "-o", str(out)]
    assert main([*argv, "--quiet", "--corpus-sampling", "proportional"]) == 0
    facts = json.loads((out / "history.json").read_text())
    assert len(facts["history"]["probe_macro_f1"]) == 1
    assert facts["train_settings"]["corpus_sampling"] == "proportional"
    assert 0 <= facts["train_settings"]["probe"]["probe_macro_f1"]["initial_macro_f1"] <= 1
    assert "probe macro-F1" in capsys.readouterr().out
