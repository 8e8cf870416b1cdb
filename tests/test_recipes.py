"""Fine-tuning recipes: which parameters train in which phase, at which learning rate.

Parameter groups and their rates (:func:`recipe_param_groups`), per-row rates
(:class:`RowRateScaler`, checked against two real parameter groups), staged schedules, and
the classifier's ``train(recipe=...)`` on a checkpoint exported by the pretrainer: the trunk
frozen during the head phase, transferred rows frozen or slower while re-initialised rows
train, the rates recorded in the history, ``"auto"`` resolved, bad recipes refused.
"""

from __future__ import annotations

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cellfm_sc import CellFMClassifier, CellFMPretrainer
from cellfm_sc.data import DataSplit
from cellfm_sc.model import CellFMClassifierModule
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, FinetuneRecipe, apply_trainable
from cellfm_sc.nn.trainable import (
    AUTO_RECIPES,
    RECIPES,
    RowRateScaler,
    recipe_param_groups,
    resolve_recipe,
    shrink_towards_fresh,
)
from cellfm_sc.train import make_scheduler

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)


# ------------------------------------------------------------------ groups and rates (nn)
def _module(n_layers=3):
    cfg = CellFMConfig(**{**CellFMConfig.from_preset("tiny").to_dict(), "n_layers": n_layers})
    module = CellFMClassifierModule(CellFMTrunk(cfg, n_genes=30), 4)
    apply_trainable(module, "auto")
    return module


def test_groups_hold_every_trainable_parameter_once_at_its_rate():
    module = _module(n_layers=3)
    recipe = FinetuneRecipe(head_phase=0.2, pretrained_lr=0.5, layer_decay=0.8)
    groups = recipe_param_groups(module, recipe, n_layers=3, transferred_rows=[1, 2, 5])
    names = {id(p): n for n, p in module.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g.params]
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    by = {g.name: g for g in groups}
    assert [g.name for g in groups] == [
        "head", "encoder.2", "encoder.1", "encoder.0", "input", "gene_emb"
    ]  # fmt: skip
    assert by["head"].lr_scale == 1.0 and by["head"].phase == 0
    for i, want in ((2, 0.5), (1, 0.5 * 0.8), (0, 0.5 * 0.8**2)):
        g = by[f"encoder.{i}"]
        assert g.lr_scale == pytest.approx(want) and g.phase == 1
        assert all(names[id(p)].startswith(f"trunk.encoder.{i}.") for p in g.params)
    assert by["input"].lr_scale == pytest.approx(0.5 * 0.8**3)
    assert {names[id(p)] for p in by["input"].params} >= {
        "trunk.cls_token",
        "trunk.value_enc.value_enc.table.weight",
    }
    # the embedding: new rows at lr, the transferred ones at the input level's rate
    emb = by["gene_emb"]
    assert emb.lr_scale == 1.0 and emb.rows.tolist() == [1, 2, 5]
    assert emb.rows_scale == pytest.approx(0.5 * 0.8**3)
    # no head phase: everything from the first step; no transferred row: all rows new
    plain = recipe_param_groups(module, RECIPES["full"], n_layers=3)
    assert {g.phase for g in plain} == {0} and {g.lr_scale for g in plain} == {1.0}
    assert all(g.rows is None for g in plain)
    # frozen parameters are left out
    apply_trainable(module, "encoder+head")
    names_left = {g.name for g in recipe_param_groups(module, recipe, n_layers=3)}
    assert names_left == {"head", "encoder.0", "encoder.1", "encoder.2"}


def test_row_rate_scaler_equals_two_real_groups():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4, dtype=torch.float64)
    rows = torch.tensor([1, 3, 4])
    rest = torch.tensor([0, 2, 5])
    for scale in (0.3, 0.0):
        whole = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([whole], lr=1e-2, weight_decay=0.1)
        RowRateScaler(whole, rows, scale).attach(opt)
        a = torch.nn.Parameter(w0[rows].clone())
        b = torch.nn.Parameter(w0[rest].clone())
        ref = torch.optim.AdamW(
            [{"params": [a], "lr": 1e-2 * scale}, {"params": [b], "lr": 1e-2}], weight_decay=0.1
        )
        for step in range(5):
            g = torch.randn(
                6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
            )
            whole.grad = g.clone()
            a.grad, b.grad = g[rows].clone(), g[rest].clone()
            opt.step()
            ref.step()
        torch.testing.assert_close(whole.detach()[rows], a.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(whole.detach()[rest], b.detach(), rtol=0, atol=1e-12)
        if scale == 0.0:
            assert torch.equal(whole.detach()[rows], w0[rows])  # frozen exactly
        assert not torch.equal(whole.detach()[rest], w0[rest])


def test_staged_schedule_starts_a_group_late_with_its_own_warmup():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}])
    sched = make_scheduler(
        opt, "warmup_cosine", total_steps=100, max_epochs=5, warmup_fraction=0.1,
        group_starts=[0, 40],
    )["scheduler"]  # fmt: skip
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs = np.asarray(lrs)
    assert lrs[0, 0] == pytest.approx(1.0 / 11)  # warm-up over 10 of 100 steps
    assert (lrs[:40, 1] == 0).all() and lrs[40, 1] == pytest.approx(0.5 / 7)  # 6 of 60 steps
    assert lrs[46, 1] == pytest.approx(0.5) and lrs[-1, 1] < 0.01
    # the constant schedule with a late group: 0, then the group's own rate
    opt2 = torch.optim.AdamW([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}])
    entry = make_scheduler(opt2, "constant", total_steps=10, max_epochs=1, group_starts=[0, 3])
    s2 = entry["scheduler"]
    seen = []
    for _ in range(5):
        seen.append(opt2.param_groups[1]["lr"])
        opt2.step()
        s2.step()
    assert seen[:3] == [0.0, 0.0, 0.0] and seen[3] > 0
    assert make_scheduler(opt2, "constant", total_steps=10, max_epochs=1) is None


def test_recipe_values_and_names_are_checked():
    assert resolve_recipe("auto", pretrained=False) == RECIPES[AUTO_RECIPES["random"]]
    assert resolve_recipe("auto", pretrained=True) == RECIPES[AUTO_RECIPES["pretrained"]]
    assert resolve_recipe("lp-ft", pretrained=False).head_phase > 0
    mine = FinetuneRecipe(pretrained_lr=0.1)
    assert resolve_recipe(mine, pretrained=True) is mine
    with pytest.raises(ValueError, match="recipe must be 'auto' or one of"):
        resolve_recipe("lpft", pretrained=True)
    with pytest.raises(TypeError, match="recipe must be a name"):
        resolve_recipe(0.1, pretrained=True)
    for bad, fragment in (
        ({"head_phase": 1.0}, "head_phase must be in"),
        ({"pretrained_lr": 0.0}, "pretrained_lr must be > 0"),
        ({"layer_decay": 1.5}, "layer_decay must be in"),
        ({"transferred_rows_lr": -1}, "transferred_rows_lr must be >= 0"),
        ({"pretrained_lr": float("nan")}, "pretrained_lr must be"),
        ({"head_phase": True}, "head_phase must be a number"),
    ):
        with pytest.raises(ValueError, match=fragment):
            FinetuneRecipe(**bad)
    assert RECIPES["llrd"].replace(layer_decay=0.5).to_dict() == {
        "name": "llrd (custom)",
        "head_phase": 0.0,
        "pretrained_lr": 0.3,
        "layer_decay": 0.5,
        "transferred_rows_lr": 1.0,
        "interpolate": 1.0,
        "shrink": 1.0,
    }


# ------------------------------------------------------------------ the classifier
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pbmc3k_path):
    """A tiny checkpoint over 12,000 of pbmc3k's genes, and 120 labelled cells of all genes
    (so 12,000 rows transfer and 4,634 are re-initialised)."""
    full = ad.read_h5ad(pbmc3k_path)
    cells = full[np.sort(np.random.default_rng(2).choice(full.n_obs, 120, replace=False))].copy()
    corpus = cells[:, :12000].copy()
    CellFMPretrainer.setup_anndata(corpus)
    pre = CellFMPretrainer(corpus, preset="tiny", max_tokens=64, seed=5)
    ckpt, vocab = pre.export_mindspore(tmp_path_factory.mktemp("ckpt"))
    return cells, ckpt, vocab


class _Snapshots(pl.Callback):
    """The module's parameters at the end of every training epoch, and each group's lr."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_train_epoch_end(self, trainer, plan):
        self.params.append({n: p.detach().clone() for n, p in plan.module.named_parameters()})
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def _classifier(pretrained, **kw):
    cells, ckpt, vocab = pretrained
    adata = cells.copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    return CellFMClassifier(
        adata, checkpoint=ckpt, vocabulary_file=vocab, embedding_init="transfer",
        max_tokens=64, **kw,
    )  # fmt: skip


SPLIT = DataSplit(np.arange(0, 64), np.zeros(0, np.int64), np.arange(64, 120))
RUN = dict(batch_size=16, split=SPLIT, logger=False, enable_progress_bar=False)


def test_lp_ft_trains_the_head_alone_then_everything(pretrained):
    model = _classifier(pretrained)
    rows = model.transferred_rows_
    assert rows.tolist() == list(range(1, 12001))  # the 12,000 genes the checkpoint knows
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    snaps = _Snapshots()
    model.train(max_epochs=4, recipe="lp-ft", callbacks=[snaps], **RUN)  # 4 steps per epoch
    assert model.train_settings_["recipe"] == RECIPES["lp-ft"].to_dict()
    first, last = snaps.params[0], snaps.params[-1]
    trunk = [n for n in before if n.startswith("trunk.") and n in model.trainable_summary.trainable]
    assert trunk
    # epoch 1 = the head phase (4 of 16 steps): the head moved, no trunk parameter did
    assert not torch.equal(first["head.net.0.weight"], before["head.net.0.weight"])
    assert all(torch.equal(first[n], before[n]) for n in trunk)
    # afterwards the trunk trains too
    assert all(not torch.equal(last[n], before[n]) for n in trunk)
    # rates: the trunk groups at 0 during the head phase, then pretrained_lr times lr at the
    # peak of their own warm-up (one of 12 steps) ...
    hist = model.history
    assert hist.loc[0, "lr_encoder.1"] == pytest.approx(0.3 * 1e-3 * 0.5)
    assert snaps.lrs[1]["encoder.1"] < 0.3 * 1e-3 and snaps.lrs[1]["head"] < 1e-3


def test_llrd_rates_and_new_rows_at_the_head_rate(pretrained):
    model = _classifier(pretrained)
    before = model.module.trunk.gene_emb.detach().clone()
    snaps = _Snapshots()
    model.train(max_epochs=2, recipe="llrd", callbacks=[snaps], **RUN)
    hist = model.history
    # one schedule for every group: the ratios to the head's rate are the recipe's
    for column, want in (
        ("lr_encoder.1", 0.3),
        ("lr_encoder.0", 0.3 * 0.7),
        ("lr_input", 0.3 * 0.7**2),
        ("lr_gene_emb", 1.0),
    ):
        np.testing.assert_allclose(hist[column].iloc[0] / hist["lr"].iloc[0], want, rtol=1e-9)
    after = model.module.trunk.gene_emb.detach()
    # transferred rows move at 0.147 x the rate of the re-initialised ones
    used = torch.zeros(after.shape[0], dtype=torch.bool)
    used[1:12001] = True
    moved_old = (after[used] - before[used]).abs().sum(1)
    moved_new = (after[12001:16635] - before[12001:16635]).abs().sum(1)
    assert moved_old.max() > 0 and moved_new.max() > 0
    assert moved_old[moved_old > 0].median() < 0.5 * moved_new[moved_new > 0].median()


def test_frozen_rows_keep_transferred_rows_exactly(pretrained):
    model = _classifier(pretrained)
    before = model.module.trunk.gene_emb.detach().clone()
    model.train(max_epochs=1, recipe="frozen-rows", **RUN)
    after = model.module.trunk.gene_emb.detach()
    assert torch.equal(after[1:12001], before[1:12001])
    assert not torch.equal(after[12001:16635], before[12001:16635])
    assert torch.equal(after[0], before[0])  # padding row untouched


def test_auto_recipe_and_saved_rows(pretrained, tmp_path):
    model = _classifier(pretrained)
    model.train(max_epochs=1, **RUN)
    assert model.train_settings_["recipe"]["name"] == AUTO_RECIPES["pretrained"]
    model.save(tmp_path / "m")
    back = CellFMClassifier.load(tmp_path / "m", model.adata)
    np.testing.assert_array_equal(back.transferred_rows_, model.transferred_rows_)
    cells = pretrained[0].copy()
    CellFMClassifier.setup_anndata(cells, labels_key="celltype")
    random = CellFMClassifier(cells, preset="tiny", max_tokens=64)
    assert random.transferred_rows_ is None
    random.train(max_epochs=1, **RUN)
    assert random.train_settings_["recipe"]["name"] == AUTO_RECIPES["random"]
    with pytest.raises(ValueError, match="recipe must be 'auto' or one of"):
        random.train(max_epochs=1, recipe="linear-probe", **RUN)


def test_interpolation_mixes_the_start_and_the_fine_tuned_weights(pretrained):
    # interpolate=0 keeps the weights at the end of the head phase: the pretrained trunk
    # and the probed head; 0.5 lies halfway between those and the fine-tuned weights (the
    # last epoch's, as the callback saw them before the interpolation)
    for a in (0.0, 0.5):
        model = _classifier(pretrained)
        before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        snaps = _Snapshots()
        recipe = FinetuneRecipe(head_phase=0.25, interpolate=a)
        model.train(max_epochs=4, recipe=recipe, callbacks=[snaps], **RUN)
        start, end = snaps.params[0], snaps.params[-1]  # epoch 1 = the 4 head-phase steps
        changed = 0
        for n, p in model.module.named_parameters():
            want = a * end[n] + (1 - a) * start[n]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)
            if a == 0.0 and n.startswith("trunk."):
                torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
            changed += not torch.equal(start[n], end[n])
        assert changed > 10  # fine-tuning did move the weights
    with pytest.raises(ValueError, match="needs a head phase"):
        FinetuneRecipe(interpolate=0.5)


def test_shrink_mixes_the_pretrained_and_a_fresh_trunk(pretrained):
    # nn level: w <- s * w + (1 - s) * w_fresh, w_fresh a new trunk drawn from the same seed
    cfg = CellFMConfig.from_preset("tiny")
    trunk = CellFMTrunk(cfg, n_genes=30)
    before = {n: p.detach().double().clone() for n, p in trunk.named_parameters()}
    torch.manual_seed(11)
    fresh = {n: p.detach().double() for n, p in CellFMTrunk(cfg, n_genes=30).named_parameters()}
    torch.manual_seed(11)
    assert shrink_towards_fresh(trunk, 0.25) == len(before)
    for n, p in trunk.named_parameters():
        want = 0.25 * before[n] + 0.75 * fresh[n]
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6)
    assert torch.count_nonzero(trunk.gene_emb[0]) == 0  # the padding row stays zero
    with pytest.raises(ValueError, match="shrink must be in"):
        FinetuneRecipe(shrink=1.5)
    # in train(): applied once before the first step, only to the trunk; the head and a
    # second train() call start from where they are
    model = _classifier(pretrained)
    start = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    snaps = _Snapshots()
    recipe = FinetuneRecipe(head_phase=0.5, shrink=0.0)
    model.train(max_epochs=2, recipe=recipe, callbacks=[snaps], **RUN)
    assert model.train_settings_["recipe"]["shrink"] == 0.0
    first = snaps.params[0]  # the head phase: the trunk is what shrink made of it
    # shrink=0: a fresh trunk; every randomly initialised tensor is new (constants such as
    # LayerNorm weights are the same in both)
    drawn = [n for n in start if n.startswith("trunk.") and start[n].unique().numel() > 1]
    assert len(drawn) > 10
    assert all(not torch.equal(first[n], start[n]) for n in drawn)
    assert torch.equal(first["trunk.gene_emb"][0], start["trunk.gene_emb"][0])
    assert not torch.equal(first["head.net.0.weight"], start["head.net.0.weight"])
