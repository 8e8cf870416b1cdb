"""CellFMDonorClassifier: bags, setup checks, attention, frozen-trunk cache, save/load, metrics."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc import CellFMDonorClassifier
from cellfm_sc.data import split_from_obs
from cellfm_sc.dataloaders._bags import BagSampler, DonorDataModule, eval_keys, partition_bags
from cellfm_sc.metrics import quadratic_weighted_kappa
from cellfm_sc.model._donor_eval import aggregate_bag_logits, stratified_donor_folds

STAGES = ["A", "B", "C", "D"]


def toy_donors(
    n_donors: int = 12,
    cells: int = 20,
    genes: int = 60,
    seed: int = 0,
    effect: float = 6.0,
) -> ad.AnnData:
    """Donor ``i`` has stage ``i % 4``; a fraction ``0.25 * stage`` of its cells express
    genes 0-7 strongly. Split: donors 1, 6 validate, 2, 7, 11 test."""
    rng = np.random.default_rng(seed)
    n = n_donors * cells
    donor = np.repeat(np.arange(n_donors), cells)
    stage = donor % 4
    x = rng.poisson(rng.gamma(1.0, 1.0, genes), (n, genes)).astype(np.float32)
    x[:, -1] += 1  # no empty cell
    affected = rng.random(n) < 0.25 * stage
    x[affected, :8] += rng.poisson(effect, (int(affected.sum()), 8))
    split = np.where(np.isin(donor, [1, 6]), "validation", "train").astype(object)
    split[np.isin(donor, [2, 7, 11])] = "test"
    obs = pd.DataFrame(
        {
            "donor": [f"d{d:02d}" for d in donor],
            "stage": [STAGES[s] for s in stage],
            "split": split,
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(
        sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)])
    )


def setup(adata: ad.AnnData) -> ad.AnnData:
    CellFMDonorClassifier.setup_anndata(
        adata, labels_key="stage", donor_key="donor", label_order=STAGES
    )
    return adata


def make_model(adata: ad.AnnData, **kwargs) -> CellFMDonorClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random trunk
        return CellFMDonorClassifier(adata, preset="tiny", max_tokens=32, **kwargs)


def quiet_train(model: CellFMDonorClassifier, **kwargs) -> None:
    kwargs.setdefault("split", split_from_obs(model.adata, "split", donor_key="donor"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(enable_progress_bar=False, logger=False, accelerator="cpu", **kwargs)


# ------------------------------------------------------------------------------------ bags


def test_partition_bags_covers_each_cell_once_in_one_donor_bags():
    rng = np.random.default_rng(0)
    rows = rng.permutation(1000)[:300]
    donors = rng.integers(0, 7, rows.size)
    bags = partition_bags(rows, donors, bag_size=16, rng=np.random.default_rng(1))
    got = np.concatenate([b.rows for b in bags])
    assert np.array_equal(np.sort(got), np.sort(rows))
    donor_of = dict(zip(rows.tolist(), donors.tolist()))
    for b in bags:
        assert 1 <= b.rows.size <= 16
        assert {donor_of[r] for r in b.rows.tolist()} == {b.donor}
    for d in np.unique(donors):
        sizes = [b.rows.size for b in bags if b.donor == d]
        assert len(sizes) == -(-int((donors == d).sum()) // 16)
        assert max(sizes) - min(sizes) <= 1


def test_bag_sampler_epochs_cover_each_training_cell_once_and_differ():
    rows = np.arange(50, 250)
    donors = rows % 5
    sampler = BagSampler(rows, donors, bag_size=9, bags_per_step=3, train=True, seed=0)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        steps = list(sampler)
        assert len(steps) == len(sampler)
        cells = np.concatenate([b.rows for _, step in steps for b, _ in step])
        assert np.array_equal(np.sort(cells), rows)  # each training cell exactly once
        seen.append([tuple(b.rows.tolist()) for _, step in steps for b, _ in step])
    assert seen[0] != seen[1]  # a fresh partition every epoch


def test_bag_sampler_distributed_evaluation_counts_every_bag_once():
    rows = np.arange(37)
    donors = rows % 3
    keys = eval_keys([f"c{i}" for i in rows], 0)
    single = [b for _, s in BagSampler(rows, donors, 5, train=False, keys=keys) for b, _ in s]
    real = []
    lengths = set()
    for rank in range(2):
        sampler = BagSampler(
            rows, donors, 5, bags_per_step=2, train=False, keys=keys, rank=rank, world_size=2
        )
        steps = list(sampler)
        lengths.add(len(steps))
        real += [b for _, s in steps for b, w in s if w > 0]
    assert len(lengths) == 1  # every rank steps the same number of times
    assert sorted(tuple(b.rows) for b in real) == sorted(tuple(b.rows) for b in single)


def test_training_loader_reads_each_training_cell_once_per_epoch_with_donor_labels():
    adata = setup(toy_donors())
    donors = adata.obs["donor"].astype(str).to_numpy()
    names = np.unique(donors)
    codes = np.searchsorted(names, donors)
    labels = np.array([STAGES.index(s) for s in adata.obs.groupby("donor")["stage"].first()])
    train = np.flatnonzero(adata.obs["split"].to_numpy() == "train")
    dm = DonorDataModule(
        {"train": train, "validation": np.flatnonzero(adata.obs["split"] == "validation")},
        codes,
        labels,
        bag_size=7,
        bags_per_step=2,
        seed=3,
        eval_keys=eval_keys(adata.obs_names, 0),
        chunk_size=4,
        cell_kwargs={"adata": adata, "max_tokens": 32, "seed": 0},
    )
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        got = []
        for batch in loader:
            idx = batch.obs_index.numpy()
            got.append(idx)
            bag = batch.bag.numpy()
            for b in range(batch.n_bags):
                assert set(codes[idx[bag == b]]) == {int(batch.donor[b])}
                assert int(batch.labels[b]) == labels[int(batch.donor[b])]
            n_tok = batch.cells.n_tokens.numpy()
            assert np.all(np.diff(n_tok) >= 0)  # sorted by length for chunking
            assert len(batch.chunk_lengths) == -(-idx.size // 4)
        assert np.array_equal(np.sort(np.concatenate(got)), train)


def test_aggregate_and_folds():
    d, z, n = aggregate_bag_logits(
        np.array([[0.0, 1.0], [3.0, 4.0], [5.0, 5.0]]),
        np.array(["b", "b", "a"]),
        np.array([3, 1, 2]),
    )
    assert d.tolist() == ["a", "b"] and n.tolist() == [2, 4]
    np.testing.assert_allclose(z, [[5.0, 5.0], [0.75, 1.75]])
    labels = np.repeat(["x", "y", "z"], [7, 5, 3])
    folds = stratified_donor_folds(labels, 5, seed=2)
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
    for value in "xyz":
        per = np.bincount(folds[labels == value], minlength=5)
        assert per.max() - per.min() <= 1


# ------------------------------------------------------------------------------------ setup


def test_setup_refuses_a_donor_with_two_labels_and_names_the_first():
    adata = toy_donors()
    stage = adata.obs["stage"].to_numpy().copy()
    stage[np.flatnonzero(adata.obs["donor"] == "d05")[3]] = "D"  # d05 is stage B
    stage[np.flatnonzero(adata.obs["donor"] == "d09")[0]] = "A"
    adata.obs["stage"] = stage
    with pytest.raises(ValueError, match=r"donor 'd05' .*labels \['B', 'D'\].*1 more donor"):
        CellFMDonorClassifier.setup_anndata(adata, labels_key="stage", donor_key="donor")


def test_setup_errors_name_the_argument():
    adata = toy_donors()
    with pytest.raises(KeyError, match="donor_key='patient'"):
        CellFMDonorClassifier.setup_anndata(adata, labels_key="stage", donor_key="patient")
    with pytest.raises(ValueError, match=r"labels \['D'\] .*label_order"):
        CellFMDonorClassifier.setup_anndata(
            adata, labels_key="stage", donor_key="donor", label_order=["A", "B", "C"]
        )
    setup(adata)
    with pytest.raises(ValueError, match="loss='corn' needs ordered labels"):
        CellFMDonorClassifier.setup_anndata(adata, labels_key="stage", donor_key="donor")
        make_model(adata, loss="corn")
    with pytest.raises(ValueError, match="bag_size must be an integer >= 1"):
        make_model(setup(adata), bag_size=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        make_model(adata, pooling="max")


def test_ordinal_labels_choose_the_cumulative_link_loss():
    adata = setup(toy_donors())
    assert make_model(adata).loss_ == "cumulative_link"
    CellFMDonorClassifier.setup_anndata(adata, labels_key="stage", donor_key="donor")
    model = make_model(adata)
    assert model.loss_ == "cross_entropy" and not model.ordinal_


# ------------------------------------------------------------------------------------ model


@pytest.fixture(scope="module")
def trunk_model():
    """A model whose trunk trained for one epoch (bags of <= 10 cells: 2 per donor)."""
    adata = setup(toy_donors())
    model = make_model(adata, bag_size=10, trainable="all")
    quiet_train(model, max_epochs=1, monitor="validation_donor_loss")
    return model


def test_attention_sums_to_one_within_each_donor_and_prediction_averages_bags():
    adata = setup(toy_donors())
    model = make_model(
        adata, bag_size=7, trainable="head", cell_view="both"
    )  # 20 cells per donor: 3 bags
    quiet_train(model, max_epochs=1)
    table = model.annotate(adata)
    att = adata.obs["cellfm_attention"]
    sums = att.groupby(adata.obs["donor"]).sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-5)
    assert (att > 0).all() and att.std() > 0  # gated attention: not uniform
    assert adata.obsm["X_cellfm"].shape == (adata.n_obs, 64)
    pred = adata.obs["cellfm_donor_prediction"].astype(str)
    assert (pred.groupby(adata.obs["donor"]).nunique() == 1).all()
    assert (table["n_cells"] == 20).all()
    # the donor's logits are the cell-count-weighted mean of its 3 fixed bags' logits
    donor = "d03"
    pos = np.flatnonzero(adata.obs["donor"] == donor)
    keys = eval_keys(adata.obs_names[pos], model.seed)
    bags = partition_bags(pos, np.zeros(pos.size, int), 7, keys=keys)
    assert len(bags) == 3
    emb = torch.from_numpy(adata.obsm["X_cellfm"])
    expr = model._expression_rows(adata)  # the expression view's input, read per bag
    module = model.module.eval()
    with torch.no_grad():
        z = [
            module(
                emb[b.rows],
                torch.zeros(b.rows.size, dtype=torch.long),
                1,
                torch.from_numpy(expr(b.rows)),
            )
            for b in bags
        ]
    sizes = torch.tensor([b.rows.size for b in bags], dtype=torch.float32)
    mean = (torch.cat([o.logits for o in z]) * sizes[:, None]).sum(0) / sizes.sum()
    probs = module.probabilities(mean[None])[0].numpy()
    got = table.loc[donor, [f"p_{c}" for c in STAGES]].to_numpy(dtype=float)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    # and each cell's attention is its weight in its bag times the bag's share of the donor
    for b, o in zip(bags, z):
        np.testing.assert_allclose(
            att.to_numpy()[b.rows], o.attention.numpy() * b.rows.size / 20, atol=1e-6
        )


def test_frozen_trunk_embeddings_are_computed_once_and_reused():
    adata = setup(toy_donors())
    model = make_model(adata, trainable="head", cell_view="both")
    assert model._trunk_frozen()
    encoded = []
    hook = model.module.trunk.register_forward_hook(
        lambda mod, args, out: encoded.append(int(args[0].shape[0]))
    )
    try:
        quiet_train(model, max_epochs=3)
        split = adata.obs["split"].to_numpy()
        n_fit = int(np.isin(split, ["train", "validation"]).sum())
        assert sum(encoded) == n_fit  # every training/validation cell once, not once per epoch
        assert model.embedding_cache_info == {"cached": n_fit, "computed": n_fit, "reused": 0}
        table = model.predict_donors(adata)
        assert sum(encoded) == adata.n_obs  # only the test cells were new
        info = model.embedding_cache_info
        assert info["computed"] == adata.n_obs and info["reused"] == n_fit
        again = model.predict_donors(adata)
        assert sum(encoded) == adata.n_obs
        pd.testing.assert_frame_equal(table, again)
        # the cache is not used for another AnnData object
        other = adata.copy()
        model.predict_donors(other)
        assert sum(encoded) == 2 * adata.n_obs
    finally:
        hook.remove()


def test_save_load_gives_identical_donor_predictions(trunk_model, tmp_path):
    adata = trunk_model.adata
    before = trunk_model.predict_donors(adata)
    trunk_model.save(tmp_path / "m")
    loaded = CellFMDonorClassifier.load(tmp_path / "m", adata, accelerator="cpu")
    after = loaded.predict_donors(adata)
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    assert loaded.loss_ == "cumulative_link" and loaded.bag_size == 10
    assert loaded.split_names_ == trunk_model.split_names_
    with pytest.raises(ValueError, match="holds a CellFMDonorClassifier"):
        from cellfm_sc import CellFMClassifier

        CellFMClassifier.load(tmp_path / "m", adata)


def test_validation_loss_is_that_of_predict_donors_on_the_validation_donors(trunk_model):
    # training validated token bags through the plan; predict_donors embeds cells and pools
    # them: the same fixed bags and the same weights give the same donor loss
    best = trunk_model.history.set_index("epoch").loc[trunk_model.best_epoch]
    table = trunk_model.predict_donors(indices="validation")
    truth = trunk_model.adata.obs.groupby("donor")["stage"].first().loc[table.index]
    p_true = [table.loc[d, f"p_{s}"] for d, s in truth.items()]
    assert best["validation_n_donors"] == 2
    assert best["validation_donor_loss"] == pytest.approx(-np.mean(np.log(p_true)), abs=1e-5)
    assert trunk_model.train_settings_["frozen_trunk"] is False


def test_evaluate_reports_donor_metrics_with_bootstrap_intervals():
    adata = setup(toy_donors())
    model = make_model(adata, trainable="head", cell_view="both", loss="corn")
    quiet_train(model, max_epochs=2)
    res = model.evaluate(n_bootstrap=200)
    table = res.donor_table
    assert sorted(table.index) == ["d02", "d07", "d11"]
    t, p = table["true"].cat.codes.to_numpy(), table["predicted"].cat.codes.to_numpy()
    from sklearn.metrics import accuracy_score, cohen_kappa_score

    assert res.donor_metrics["accuracy"] == pytest.approx(accuracy_score(t, p))
    if len(set(t) | set(p)) > 1:
        assert res.donor_metrics["qwk"] == pytest.approx(
            cohen_kappa_score(t, p, weights="quadratic", labels=range(4))
        )
    assert res.donor_metrics["ordinal_mae"] == pytest.approx(np.abs(t - p).mean())
    lo, hi = res.intervals["accuracy"]
    assert lo <= res.donor_metrics["accuracy"] <= hi
    assert set(res.predictions["donor"]) == set(table.index)
    assert res.to_dict()["donor_intervals"]["accuracy"] == [lo, hi]
    pd.testing.assert_frame_equal(
        table[["predicted", "n_cells"]],
        model.predict_donors(adata, indices="test")[["predicted", "n_cells"]],
    )


def test_cross_validate_scores_every_donor_once_and_leaves_the_model_as_it_was():
    adata = setup(toy_donors())
    model = make_model(adata, trainable="head", cell_view="both")
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = model.cross_validate(
            k=3, max_epochs=1, n_bootstrap=50, enable_progress_bar=False, logger=False
        )
    assert len(cv.per_fold) == 3
    assert sorted(cv.donor_table.index) == sorted(adata.obs["donor"].unique())
    assert set(cv.per_fold["n_test"]) == {4}
    t = cv.donor_table["true"].cat.codes.to_numpy()
    p = cv.donor_table["predicted"].cat.codes.to_numpy()
    q = quadratic_weighted_kappa(t, p, n_classes=4)
    assert cv.pooled["qwk"] == pytest.approx(q, nan_ok=True)
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert not model.is_trained_
    # the frozen trunk encoded every cell once over the three rounds
    assert model.embedding_cache_info["computed"] == adata.n_obs


def test_default_never_trains_on_frozen_random_features():
    """Acceptance: ``CellFMDonorClassifier(adata, preset="tiny").train()`` never learns from
    the features of a frozen random trunk (a head on them learned nothing, see RESULTS.md):
    by default a random trunk is left out (the expression view represents the cells), and
    when it is used it trains end to end."""
    adata = setup(toy_donors())
    model = make_model(adata, bag_size=8)
    assert model.cell_view_requested_ == "auto" and model.cell_view_ == "expression"
    assert not model.module.uses_trunk  # the head reads no trunk feature
    calls = []
    hook = model.module.trunk.register_forward_hook(lambda *a: calls.append(1))
    quiet_train(model, max_epochs=1)
    model.evaluate(n_bootstrap=0, baseline=False)
    hook.remove()
    assert calls == []  # the random trunk was never even run
    view = model.module.expression_view
    assert view.n_genes == min(500, adata.n_vars) and model.history is not None
    # the trunk beside the expression view: trained end to end, not frozen
    both = make_model(adata, bag_size=8, cell_view="both")
    assert both.trainable_requested_ == "auto" and both.trainable_ == "auto"
    assert not both._trunk_frozen()
    before = {k: v.clone() for k, v in both.module.trunk.state_dict().items()}
    quiet_train(both, max_epochs=1)
    assert both.train_settings_["frozen_trunk"] is False
    changed = [
        k
        for k, v in both.module.trunk.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert any(k.startswith("encoder.") for k in changed) and "gene_emb" in changed, changed
    # an explicit "head" still freezes it (the user's choice)
    assert make_model(adata, trainable="head", cell_view="both")._trunk_frozen()


def test_auto_freezes_a_pretrained_trunk(golden_dir):
    import csv

    vocab_file = golden_dir / "vocab_d48_h4_l2_g37.csv"
    with open(vocab_file, newline="") as fh:
        genes = [r[0] for r in list(csv.reader(fh))[1:] if r][:30]
    base = toy_donors(genes=len(genes))
    adata = setup(ad.AnnData(base.X, obs=base.obs, var=pd.DataFrame(index=genes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellFMDonorClassifier(
            adata,
            checkpoint=golden_dir / "model_d48_h4_l2_g37_backbone.ckpt",
            vocabulary_file=vocab_file,
            num_heads=4,
            max_tokens=16,
        )
    assert model.pretrained and model.trainable_ == "head" and model._trunk_frozen()
    assert model.cell_view_ == "both" and model.module.uses_trunk


@pytest.mark.slow
def test_donor_model_learns_a_donor_signal():
    """The acceptance recipe: defaults, tiny preset, 10 epochs, a split from obs."""
    adata = setup(toy_donors(n_donors=24, cells=24, seed=1))
    donor = adata.obs["donor"].str[1:].astype(int).to_numpy()
    split = np.full(adata.n_obs, "train", dtype=object)
    split[np.isin(donor, [0, 5, 10, 15])] = "validation"
    split[np.isin(donor, [2, 7, 9, 12, 17, 22, 19, 20])] = "test"
    adata.obs["split"] = split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = CellFMDonorClassifier(adata, preset="tiny", max_tokens=256)
    quiet_train(model, max_epochs=10, split=split_from_obs(adata, "split", donor_key="donor"))
    res = model.evaluate(n_bootstrap=0)
    assert res.donor_metrics["qwk"] > 0.6, model.history


def test_chunked_checkpointed_encoding_matches_one_forward_and_its_gradients():
    from cellfm_sc.model._donor_module import CellFMDonorModule
    from cellfm_sc.nn import CellFMConfig, CellFMTrunk

    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=50)
    module = CellFMDonorModule(trunk, 4, "cumulative_link").double().train()
    for layer in trunk.encoder:  # dropout off: both passes must see the same function
        layer.dropout1.p = layer.dropout2.p = 0.0
    module.head.eval()  # nor may head dropout or the running statistics differ
    n, length = 11, 9
    n_tok = torch.sort(torch.randint(1, length + 1, (n,))).values
    valid = torch.arange(length)[None, :] < n_tok[:, None]
    values = torch.rand(n, length, dtype=torch.float64) * valid
    ids = torch.randint(1, 51, (n, length)) * valid
    chunks = tuple(int(n_tok[i : i + 4].max()) for i in range(0, n, 4))
    bag = torch.tensor([0] * 6 + [1] * 5)

    def run(chunked: bool, ckpt: bool):
        module.zero_grad()
        if chunked:
            emb = module.encode(values, ids, valid, chunks, 4, gradient_checkpointing=ckpt)
        else:
            emb = trunk(values, ids, valid).cls
        out = module(emb, bag, 2)
        out.logits.sum().backward()
        grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        return emb.detach(), grads

    plain, g_plain = run(False, False)
    for ckpt in (False, True):
        emb, grads = run(True, ckpt)
        torch.testing.assert_close(emb, plain)
        assert grads.keys() == g_plain.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], g_plain[key], msg=key)
