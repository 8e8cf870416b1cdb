"""The pretrainer's steps of the training template: checks, the corpus split, probes, plan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cellfm_sc._constants import CORPUS_SAMPLING
from cellfm_sc.data import DataSplit
from cellfm_sc.dataloaders._corpus import CorpusDataModule
from cellfm_sc.model._probe import EmbeddingProbe
from cellfm_sc.model.base import TrainingRun
from cellfm_sc.train import PretrainingPlan

__all__ = ["PretrainerTrainingMixin"]


def _probe_columns(probe: Any) -> dict[str, EmbeddingProbe]:
    """History column -> probe for ``train(probe=...)`` (one probe or a dict of them)."""
    if probe is None:
        return {}
    if isinstance(probe, EmbeddingProbe):
        return {"probe_macro_f1": probe}
    if isinstance(probe, Mapping) and probe:
        out = {}
        for name, p in probe.items():
            if not isinstance(p, EmbeddingProbe):
                raise TypeError(
                    f"probe[{name!r}] must be an EmbeddingProbe, got {type(p).__name__}"
                )
            out[f"probe_{name}_macro_f1"] = p
        return out
    raise TypeError(
        f"probe must be an EmbeddingProbe or a dict of them, got {type(probe).__name__}"
    )


class PretrainerTrainingMixin:
    """The steps of :meth:`~cellfm_sc.model.base.CellFMModel._train` for the pretrainer."""

    def _check_train(self, run: TrainingRun) -> None:
        validation_size = run["validation_size"]
        if not isinstance(validation_size, int | float) or not 0.0 <= validation_size < 1.0:
            raise ValueError(
                f"validation_size must be a fraction in [0, 1), got {validation_size!r}"
            )
        super()._check_train(run)
        if not getattr(self, "members_", None):
            raise ValueError(
                "this model holds no corpus to train on (a loaded model): create a "
                f"{type(self).__name__} on the data, or load it with adata= set up for it"
            )
        if run["corpus_sampling"] not in CORPUS_SAMPLING:
            raise ValueError(
                f"corpus_sampling must be one of {CORPUS_SAMPLING}, got {run['corpus_sampling']!r}"
            )
        run.data["probes"] = _probe_columns(run["probe"])

    def _prepare_training(self, run: TrainingRun) -> None:
        for p in run.data["probes"].values():  # bad probe cells are named before training
            p.bind(self._probe_reading, self._gene_id_map, self.max_tokens, self.seed)
        self._split_members(float(run["validation_size"]))
        run.has_validation = any(m.validation.size for m in self.members_)

    def _datamodule(self, run: TrainingRun) -> CorpusDataModule:
        return CorpusDataModule(
            self.members_,
            batch_size=run["batch_size"],
            max_tokens=self.max_tokens,
            seed=self.seed,
            num_workers=run["num_workers"],
            sampling=run["corpus_sampling"],
            depth_augmentation=run["depth_augmentation"],
        )

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> PretrainingPlan:
        plan = PretrainingPlan(
            self.module, seed=self.seed, probes=run.data["probes"], **plan_kwargs
        )
        self.module.trunk.gradient_checkpointing = run["gradient_checkpointing"]
        return plan

    def _train_settings(self, run: TrainingRun) -> dict[str, Any]:
        probes = run.data["probes"]
        return {
            "validation_size": run["validation_size"],
            "mask_ratio": self.mask_ratio_,
            "gradient_checkpointing": run["gradient_checkpointing"],
            "corpus_sampling": run["corpus_sampling"],
            "depth_augmentation": run["depth_augmentation"],
            "probe": {c: p.describe() for c, p in probes.items()} or None,
            "corpus": {
                m.name: {"train": int(m.train.size), "validation": int(m.validation.size)}
                for m in self.members_
            },
        }

    def _after_fit(self, run: TrainingRun, plan: Any, settings: dict[str, Any]) -> None:
        for column, score in (plan.probe_initial or {}).items():
            settings["probe"][column]["initial_macro_f1"] = score
        if len(self.members_) == 1:  # "train"/"validation" indices of the one AnnData
            m = self.members_[0]
            self._set_split(m.adata, DataSplit(m.train, m.validation, np.zeros(0, np.int64)))
