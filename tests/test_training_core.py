"""The training core and the classifier's recipe, evaluation and conventions (tiny, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellfm_sc import CellFMClassifier
from cellfm_sc.model import auto_lr
from cellfm_sc.nn import CellFMConfig
from cellfm_sc.train import NonFiniteLossError, check_training_numbers, make_scheduler

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)
QUICK = dict(max_epochs=1, batch_size=16, enable_progress_bar=False)


@pytest.fixture(scope="module")
def cells(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(1)
    return full[np.sort(rng.choice(full.n_obs, 160, replace=False))].copy()


def _model(adata, **kw):
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    return CellFMClassifier(adata, preset="tiny", max_tokens=64, **kw)


# ------------------------------------------------------------------ 1. recipe
def test_auto_policy_trains_what_the_classification_uses(cells):
    model = _model(cells.copy())
    train = {n for n, p in model.module.named_parameters() if p.requires_grad}
    for name in (
        "trunk.gene_emb",
        "trunk.cls_token",
        "trunk.value_enc.value_enc.w1.weight",
        "head.",
    ):
        assert any(n.startswith(name) for n in train), name
    assert any(n.startswith("trunk.encoder.") for n in train)
    for frozen in ("trunk.value_dec.", "trunk.cellwise_dec.", "trunk.zero_emb"):
        assert not any(n.startswith(frozen) for n in train), frozen
    assert "trunk.value_enc.mask_emb" not in train
    # the original scripts' policy stays available and freezes the new embedding
    old = _model(cells.copy(), trainable="encoder+head")
    assert not old.module.trunk.gene_emb.requires_grad


def test_auto_learning_rate_rule():
    assert auto_lr(False, CellFMConfig.from_preset("80M")) == 1e-3
    assert auto_lr(True, CellFMConfig.from_preset("80M")) == 1e-4
    assert auto_lr(True, CellFMConfig.from_preset("800M")) == 1e-4
    assert auto_lr(True, CellFMConfig.from_preset("tiny")) == 1e-3


def test_warmup_cosine_steps_per_optimizer_step():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    entry = make_scheduler(opt, "warmup_cosine", total_steps=100, max_epochs=5)
    assert entry["interval"] == "step"
    sched, lrs = entry["scheduler"], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = 5  # 5% of 100 steps
    assert lrs[:warm] == sorted(lrs[:warm]) and lrs[0] < 0.25
    assert lrs[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # decays monotonically
    expected = 0.5 * (1 + math.cos(math.pi * (99 - warm) / (100 - warm)))
    assert lrs[-1] == pytest.approx(expected) and lrs[-1] < 1e-3
    step = make_scheduler(opt, "step", total_steps=100, max_epochs=5, gamma=0.5)
    assert step["interval"] == "epoch"


def test_defaults_train_with_the_recipe(cells):
    adata = cells.copy()
    model = _model(adata)
    model.train(**QUICK)
    s = model.train_settings_
    assert s["lr"] == 1e-3 and s["lr_requested"] == "auto" and s["trainable"] == "auto"
    assert s["lr_schedule"] == "warmup_cosine"
    assert s["monitor"] == "validation_loss"
    # 16 validation cells: early stopping on their score would be noise
    assert s["early_stopping"] is False
    assert len(model.test_indices) > 0  # test_size=0.1 by default
    assert model.history["lr"].iloc[-1] < 1e-6  # cosine to 0 at the last step


# ------------------------------------------------------------------ 2. honest evaluation
def test_evaluate_scores_test_cells_and_refuses_without(cells, tmp_path):
    adata = cells.copy()
    model = _model(adata)
    model.train(**QUICK)
    result = model.evaluate()
    assert result.evaluated_on == "test"
    assert result.cell_metrics["n_cells"] == len(model.test_indices)
    assert set(result.predictions.index) == set(adata.obs_names[model.test_indices])
    assert result.embedding.shape == (len(model.test_indices), 64)

    none = _model(cells.copy())
    none.train(test_size=0.0, **QUICK)
    with pytest.raises(ValueError, match="no test cells"):
        none.evaluate()
    assert none.evaluate(indices="validation").evaluated_on == "validation"

    # the split travels by obs name: a permuted copy is scored on the same cells
    model.save(tmp_path / "m")
    perm = adata[::-1].copy()
    loaded = CellFMClassifier.load(tmp_path / "m", perm)
    again = loaded.evaluate()
    assert set(again.predictions.index) == set(result.predictions.index)
    np.testing.assert_allclose(
        again.predictions.loc[result.predictions.index, "confidence"],
        result.predictions["confidence"],
        atol=1e-5,
    )
    # data without the split's cells are refused, not silently re-split
    with pytest.raises(ValueError, match="test cells are not in this AnnData"):
        model.evaluate(adata=adata[: len(adata) // 2].copy())
    # annotate writes the split of every cell
    model.annotate(adata)
    counts = adata.obs["cellfm_split"].value_counts()
    assert counts["test"] == len(model.test_indices)
    assert counts["train"] == len(model.train_indices)


# ------------------------------------------------------------------ 4. robust training
def test_last_batch_of_one_cell_trains(cells):
    adata = cells[:40].copy()
    model = _model(adata)
    n_train = len(model.adata) - 4 - 4  # validation 4 + test 4 of 40
    model.train(validation_size=4, test_size=4, max_epochs=1, batch_size=n_train - 1,
                enable_progress_bar=False)  # fmt: skip
    assert len(model.train_indices) % (n_train - 1) == 1
    assert np.isfinite(model.history["train_loss"]).all()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_and_clipped_gradients_in_full_and_bf16_mixed_precision(cells, precision):
    """AdamW runs fused (one pass per tensor) also under bf16-mixed, and the gradients the
    step sees are clipped to gradient_clip_val (norm over every trained parameter)."""
    import lightning.pytorch as pl

    clip = 1e-3
    seen: list[tuple[float, bool]] = []

    class AfterStep(pl.Callback):  # the step's gradients are still there after the step
        def on_train_batch_end(self, trainer, pl_module, *args):
            opt = trainer.optimizers[0]
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            seen.append((float(norm), bool(opt.defaults.get("fused"))))

    model = _model(cells.copy())
    model.train(**QUICK, precision=precision, gradient_clip_val=clip, callbacks=[AfterStep()])
    assert seen and all(fused for _, fused in seen)
    assert all(norm <= clip * (1 + 1e-3) for norm, _ in seen), seen
    # without clipping the same gradients are far larger: the bound above is the clipping's
    seen.clear()
    _model(cells.copy()).train(
        **QUICK, precision=precision, gradient_clip_val=None, callbacks=[AfterStep()]
    )
    assert max(norm for norm, _ in seen) > 100 * clip


def test_non_finite_loss_stops_at_once(cells):
    model = _model(cells.copy())
    with torch.no_grad():
        model.module.head.net[-1].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*learning rate .*lr"):
        model.train(**QUICK)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lr": 0}, "lr must be a number > 0"),
        ({"lr": -1e-3}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"lr": "fast"}, "lr must be a number > 0 or 'auto'"),
        ({"weight_decay": -1}, "weight_decay must be"),
        ({"max_epochs": 0}, "max_epochs must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"patience": -1}, "patience must be"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
        ({"monitor": "accuracy"}, "monitor must be one of"),
        ({"early_stopping": "yes"}, "early_stopping must be"),
        ({"class_weights": "equal"}, "class_weights must be"),
        ({"monitor": "validation_donor_qwk"}, "needs donor_key"),
    ],
)
def test_bad_numbers_refused_before_training(cells, kwargs, fragment):
    model = _model(cells.copy())
    with pytest.raises(ValueError, match=fragment):
        model.train(**{**QUICK, **kwargs})
    assert model.history is None  # nothing ran


def test_check_training_numbers_accepts_good_values():
    check_training_numbers(lr=1e-4, max_epochs=3, batch_size=8, weight_decay=0.0, patience=0)


# ------------------------------------------------------------------ 5. donor-level selection
@pytest.fixture(scope="module")
def donor_cells(wu2020_path):
    adata = ad.read_h5ad(wu2020_path)
    patients = sorted(adata.obs["patient"].unique())
    stage = {p: ["low", "mid", "high"][i % 3] for i, p in enumerate(patients)}
    adata.obs["stage"] = adata.obs["patient"].map(stage).astype(str)
    return adata


def test_donor_labels_select_on_donor_score(donor_cells):
    adata = donor_cells.copy()
    CellFMClassifier.setup_anndata(
        adata, labels_key="stage", donor_key="patient", label_order=["low", "mid", "high"]
    )
    model = CellFMClassifier(adata, preset="tiny", max_tokens=64)
    model.train(validation_size=0.3, test_size=0.2, **QUICK)
    assert model.train_settings_["monitor"] == "validation_donor_qwk"
    assert "validation_donor_qwk" in model.history and "validation_donor_qwk" in model.step_history
    assert model.best_score_ == pytest.approx(model.history["validation_donor_qwk"].max())

    cat = donor_cells.copy()
    CellFMClassifier.setup_anndata(cat, labels_key="stage", donor_key="patient")
    model = CellFMClassifier(cat, preset="tiny", max_tokens=64)
    model.train(validation_size=0.3, test_size=0.2, **QUICK)
    assert model.train_settings_["monitor"] == "validation_donor_balanced_acc"


def test_balanced_donor_weights_weigh_donors_equally():
    from cellfm_sc.train._classifier import _class_weights

    donors = np.array(["a"] * 90 + ["b"] * 10)
    codes = np.zeros(100, dtype=np.int64)
    class_w, per_cell = _class_weights("balanced_donors", codes, 2, donors)
    assert torch.equal(class_w, torch.ones(2))
    assert per_cell[:90].sum() == pytest.approx(per_cell[90:].sum())
    assert per_cell.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs donors"):
        _class_weights("balanced_donors", codes, 2, None)


# ------------------------------------------------------------------ 6. logging
def test_csv_logger_gets_what_the_plan_logs(cells, tmp_path):
    model = _model(cells.copy())
    model.train(checkpoint_dir=tmp_path, **QUICK)
    metrics = pd.read_csv(tmp_path / "logs" / "metrics.csv")
    for column in ("train_loss", "validation_loss", "validation_acc", "train_acc"):
        assert column in metrics.columns, column
        assert metrics[column].notna().any(), column
    assert model.train_settings_["log_dir"] is not None


# ------------------------------------------------------------------ 7. conventions
def test_device_load_placement_and_state_that_survives_save(cells, tmp_path):
    adata = cells.copy()
    model = _model(adata)
    assert model.device == torch.device("cpu")
    model.train(class_weights="balanced", **QUICK)
    # this call's class weights do not leak into the module afterwards
    assert torch.equal(model.module.class_weights, torch.ones(len(model.classes_)))
    model.save(tmp_path / "m")
    loaded = CellFMClassifier.load(tmp_path / "m", adata, accelerator="cpu", device="auto")
    assert loaded.device == torch.device("cpu")
    assert loaded.best_epoch == model.best_epoch == 1
    pd.testing.assert_frame_equal(loaded.step_history, model.step_history)
    pd.testing.assert_frame_equal(loaded.history, model.history)
    np.testing.assert_array_equal(loaded.test_indices, model.test_indices)
    assert loaded.train_settings_["class_weights"] == "balanced"


def test_saved_files_are_world_readable(cells, tmp_path):
    from cellfm_sc._atomic import default_mode

    model = _model(cells.copy())
    model.save(tmp_path / "m")
    assert (tmp_path / "m").stat().st_mode & 0o777 == default_mode(directory=True)
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o777 == default_mode(), f


# ------------------------------------------------------------------ 8. the core's layering
def test_report_calls_plotting_never_back():
    src = Path(__file__).resolve().parents[1] / "src" / "cellfm_sc"
    assert "cellfm_sc.report" not in (src / "plotting.py").read_text()
    assert "cellfm_sc.plotting" in (src / "report.py").read_text()
    code = "import cellfm_sc.plotting, sys; print('cellfm_sc.report' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
