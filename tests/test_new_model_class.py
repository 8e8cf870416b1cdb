"""A new model class on the shared machinery: a regression head on the cls embedding.

``CellFMRegressor`` predicts a continuous obs column (say a donor's age or a cell's pathology
score). It provides only its torch module, its training plan and its user methods (setup,
``train``, ``predict``); training (checks, split, data module, runner, best weights),
``save`` / ``load`` and ``get_latent_representation`` are inherited from
:class:`cellfm_sc.model.base.CellFMModel`. CONTRIBUTING.md ("How to add a model class")
walks through it.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, NumericalObsField
from torch import nn

from cellfm_sc.data import check_counts, split_stratified
from cellfm_sc.model.base import CellFMModel, Saved, TrainingRun
from cellfm_sc.nn import CellFMTrunk
from cellfm_sc.train import StepOutput, TrainingPlan


# ------------------------------------------------------------------------------ the module
class RegressionModule(nn.Module):
    """Trunk -> cls embedding ``(B, D)`` -> MLP -> one value per cell ``(B,)``."""

    def __init__(self, trunk: CellFMTrunk, hidden: int, dropout: float) -> None:
        super().__init__()
        self.trunk = trunk
        dim = trunk.config.enc_dims
        self.head = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, batch: Any) -> torch.Tensor:
        cls = self.trunk(batch.values, batch.gene_ids, batch.valid).cls
        return self.head(cls).squeeze(-1)


# ------------------------------------------------------------------------------ the plan
class RegressionPlan(TrainingPlan):
    """Mean squared error over the cells; the base turns the sums into ``*_loss``."""

    def __init__(self, module: nn.Module, *, targets: np.ndarray, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.float32), False)

    def step(self, batch: Any, stage: str) -> StepOutput:
        se = (self.module(batch).float() - self.targets[batch.obs_index]) ** 2
        n = torch.tensor(float(len(se)), device=se.device)
        return StepOutput(loss=se.mean(), sums={"loss": se.detach().sum(), "n": n})


# ------------------------------------------------------------------------------ the class
class CellFMRegressor(CellFMModel):
    """Predict ``obs[target_key]`` (a number per cell) from the cls embedding."""

    _module_cls = RegressionModule
    _saved: ClassVar[dict[str, Saved]] = {
        "head_hidden_": Saved("head_hidden", int),
        "dropout_": Saved("dropout", float),
    }

    @classmethod
    def setup_anndata(cls, adata: ad.AnnData, target_key: str, layer: str | None = None):
        setup_method_args = cls._get_setup_method_args(**locals())
        check_counts(adata, layer)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            NumericalObsField("target", target_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata)
        cls.register_manager(manager)

    def __init__(self, adata: ad.AnnData, preset: str = "tiny", max_tokens: int = 64,
                 head_hidden: int = 32, dropout: float = 0.1, seed: int = 0) -> None:  # fmt: skip
        super().__init__(adata)
        self._init_common()
        self.target_key = self._read_setup_args()["target_key"]
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        trunk = self._build_trunk(
            adata, checkpoint=None, vocabulary_file=None, num_heads=None, preset=preset,
            embedding_init="random", dropout=dropout, seed=seed, hgnc_table=None,
        )  # fmt: skip
        self.head_hidden_, self.dropout_ = int(head_hidden), float(dropout)
        self._attach(self._make_module(trunk), "all", 8, 16)
        self.init_params_ = self._get_init_params(locals())

    def _make_module(self, trunk: CellFMTrunk) -> RegressionModule:
        return RegressionModule(trunk, self.head_hidden_, self.dropout_)

    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        self.target_key = self._read_setup_args()["target_key"]

    def train(self, max_epochs: int = 5, batch_size: int = 16, lr: float | str = "auto",
              weight_decay: float = 1e-5, validation_size: float = 0.2,
              early_stopping: bool = False, patience: int = 3,
              lr_schedule: str = "warmup_cosine", warmup_fraction: float = 0.05,
              precision: Any = None, accelerator: str = "auto", devices: Any = "auto",
              strategy: Any = None, gradient_clip_val: float | None = 1.0,
              num_workers: int = 0, checkpoint_dir: Any = None, keep_checkpoints: int = 1,
              resume_from: Any = None, logger: Any = None, enable_progress_bar: bool = True,
              **trainer_kwargs: Any) -> None:  # fmt: skip
        """Fit the head and trunk to ``obs[target_key]``; keep the best validation weights."""
        self._train(locals())

    def _prepare_training(self, run: TrainingRun) -> None:
        run.adata = self._training_adata()
        run.data["targets"] = run.adata.obs[self.target_key].to_numpy(np.float32)
        bins = pd.qcut(run.data["targets"], 4, labels=False).astype(str)  # stratify by value
        run.adata.obs["_target_bin"] = bins
        run.split = split_stratified(run.adata, "_target_bin", 0.0, run["validation_size"], 0)
        del run.adata.obs["_target_bin"]
        self._check_cells(run.adata, np.concatenate([run.split.train, run.split.validation]))

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> RegressionPlan:
        return RegressionPlan(self.module, targets=run.data["targets"], **plan_kwargs)

    def predict(self, adata: Any = None, allow_untrained: bool = False) -> np.ndarray:
        """One value per cell of ``adata`` (default: the model's), float32 ``(n_cells,)``."""
        adata = self._adata_or_default(adata)
        forward = lambda module, batch: {"value": module(batch)}  # noqa: E731
        out = self._forward_cells(
            adata, self._indices(adata, None), 64, None, {"value": ()}, forward,
            allow_untrained=allow_untrained,
        )  # fmt: skip
        return out["value"]


# ------------------------------------------------------------------------------ the test
def _cells(n: int = 120, genes: int = 40, seed: int = 0) -> ad.AnnData:
    """A score in [0, 1] per cell; genes 0-7 are expressed in proportion to it."""
    rng = np.random.default_rng(seed)
    score = rng.random(n).astype(np.float32)
    x = rng.poisson(1.0, (n, genes)).astype(np.float32)
    x[:, :8] += rng.poisson(12 * score[:, None], (n, 8))
    x[:, -1] += 1
    obs = pd.DataFrame({"score": score}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(genes)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_a_new_model_class_trains_saves_loads_and_embeds(tmp_path):
    torch.set_num_threads(1)
    adata = _cells()
    CellFMRegressor.setup_anndata(adata, target_key="score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellFMRegressor(adata)
    before = model.predict(allow_untrained=True)  # refused without: never trained
    model.train(max_epochs=6, lr=3e-3, enable_progress_bar=False, logger=False, accelerator="cpu")
    hist = model.history
    assert list(hist["epoch"]) == list(range(1, 7)) and hist["validation_loss"].notna().all()
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert len(model.train_indices) == 96 and len(model.validation_indices) == 24
    pred = model.predict()
    assert pred.shape == (120,) and pred.dtype == np.float32 and not np.allclose(pred, before)
    # the kept weights are the best epoch's: their validation MSE is the history's best
    val = model.validation_indices
    mse = float(np.mean((pred[val] - adata.obs["score"].to_numpy()[val]) ** 2))
    assert mse == pytest.approx(hist["validation_loss"].min(), rel=1e-4)
    assert model.train_settings_["lr"] == 3e-3 and model.best_epoch == model.best_epoch_

    model.save(tmp_path / "m")
    loaded = CellFMRegressor.load(tmp_path / "m", adata)
    assert loaded.head_hidden_ == 32 and loaded.target_key == "score" and loaded.is_trained_
    np.testing.assert_allclose(loaded.predict(), pred, atol=1e-5)
    emb = model.get_latent_representation()
    assert emb.shape == (120, 64) and np.isfinite(emb).all()
    np.testing.assert_allclose(loaded.get_latent_representation(), emb, atol=1e-5)
    pd.testing.assert_frame_equal(loaded.history, hist)
