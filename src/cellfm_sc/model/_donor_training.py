"""The donor model's steps of the training template: split by donor, monitor, bags, plan."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from cellfm_sc._constants import DONOR_MONITORS
from cellfm_sc.data import (
    DataSplit,
    check_donors_disjoint,
    split_by_donor,
)
from cellfm_sc.dataloaders._bags import (
    DonorDataModule,
    ExpressionRows,
    eval_keys,
)
from cellfm_sc.model.base import TrainingRun
from cellfm_sc.train import DonorTrainingPlan

__all__ = ["DonorTrainingMixin"]


class DonorTrainingMixin:
    """The steps of :meth:`~cellfm_sc.model.base.CellFMModel._train` for the donor model."""

    # ----------------------------------------------------------------- training
    def _make_split(
        self, adata: Any, split: DataSplit | None, validation_size: float, test_size: float
    ) -> DataSplit:
        if split is None:
            split = split_by_donor(
                adata, self.donor_key, self.labels_key, test_size, validation_size, self.seed
            )
        else:
            check_donors_disjoint(split, self._donors(adata))
        if len(split.train) == 0:
            raise ValueError("the training split is empty")
        return split

    def _resolve_monitor(self, monitor: str) -> tuple[str, str]:
        if monitor not in DONOR_MONITORS:
            raise ValueError(f"monitor must be one of {DONOR_MONITORS}, got {monitor!r}")
        if monitor == "auto":
            monitor = "validation_donor_score"
        if monitor == "validation_donor_qwk" and not self.ordinal_:
            raise ValueError(
                "monitor='validation_donor_qwk' needs ordinal labels (label_order= in "
                "setup_anndata)"
            )
        return monitor, "min" if monitor.endswith("loss") else "max"

    def _check_train(self, run: TrainingRun) -> None:
        for name in ("chunk_size", "embedding_batch_size"):
            value = run[name]
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        weight = run["cell_loss_weight"]
        if not isinstance(weight, int | float) or not weight >= 0:
            raise ValueError(f"cell_loss_weight must be a number >= 0, got {weight!r}")
        if run["gradient_checkpointing"] not in (True, False, "auto"):
            raise ValueError(
                "gradient_checkpointing must be True, False or 'auto', got "
                f"{run['gradient_checkpointing']!r}"
            )
        super()._check_train(run)
        run.monitor, run.mode = self._resolve_monitor(run["monitor"])

    def _prepare_training(self, run: TrainingRun) -> None:
        adata = run.adata = self._training_adata()
        run.data["gene_id_map"] = self._gene_id_map(adata, strict=True)
        split = run.split = self._make_split(
            adata, run["split"], run["validation_size"], run["test_size"]
        )
        cells = np.concatenate([split.train, split.validation])
        donor_names = self._donors(adata)
        per_donor = self._donor_label_codes(adata, cells)
        if (per_donor < 0).any():
            bad = per_donor.index[per_donor.to_numpy() < 0][:5].tolist()
            raise ValueError(
                f"donors {bad} of labels_key={self.labels_key!r} have a missing label or one "
                f"that is not among the classes {self.classes_}"
            )
        self._check_cells(adata, np.concatenate([split.train, split.validation, split.test]))
        donor_codes = np.full(adata.n_obs, -1, np.int64)
        donor_codes[cells] = pd.Index(np.asarray(per_donor.index)).get_indexer(donor_names[cells])
        run.data.update(cells=cells, donor_codes=donor_codes, labels=per_donor.to_numpy())
        accelerator = run["accelerator"]
        on_gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        wanted = run["gradient_checkpointing"]
        run.data["checkpointing"] = on_gpu if wanted == "auto" else bool(wanted)

    def _auto_lr(self) -> float:
        return 1e-3 if self._trunk_frozen() else super()._auto_lr()

    def _datamodule(self, run: TrainingRun) -> DonorDataModule:
        adata, split, cells = run.adata, run.split, run.data["cells"]
        data_kwargs: dict[str, Any] = {}
        expression = None
        if self.module.expression_view is not None:
            expression = self._set_expression_genes(adata, split.train)
        if not self.module.uses_trunk:
            pass  # the expression view alone: no trunk, no embeddings
        elif self._trunk_frozen():
            emb = self._cell_embeddings(
                adata,
                cells,
                run["embedding_batch_size"],
                None,
                run["enable_progress_bar"],
                allow_untrained=True,
            )
            emb_index = np.full(adata.n_obs, -1, np.int64)
            emb_index[cells] = np.arange(cells.size)
            # exact statistics of the training cells (the trunk will not change them)
            self.module.head.norm.reset_from(torch.from_numpy(emb[: split.train.size]))
            data_kwargs = {"embeddings": torch.from_numpy(emb), "emb_index": emb_index}
        else:
            data_kwargs = {
                "cell_kwargs": {
                    "adata": adata,
                    "max_tokens": self.max_tokens,
                    "seed": self.seed,
                    "gene_id_map": run.data["gene_id_map"],
                    **self._data_kwargs(),
                }
            }
        return DonorDataModule(
            {"train": split.train, "validation": split.validation},
            run.data["donor_codes"],
            run.data["labels"],
            bag_size=self.bag_size,
            bags_per_step=int(run["batch_size"]),
            seed=self.seed,
            eval_keys=eval_keys(adata.obs_names, self.seed),
            chunk_size=int(run["chunk_size"]),
            num_workers=run["num_workers"],
            expression=expression,
            **data_kwargs,
        )

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> DonorTrainingPlan:
        return DonorTrainingPlan(
            self.module,
            n_classes=len(self.classes_),
            ordinal=self.ordinal_,
            chunk_size=int(run["chunk_size"]),
            gradient_checkpointing=run.data["checkpointing"],
            cell_loss_weight=float(run["cell_loss_weight"]),
            **plan_kwargs,
        )

    def _train_settings(self, run: TrainingRun) -> dict[str, Any]:
        return {
            "bag_size": self.bag_size,
            "monitor": run.monitor,
            "cell_loss_weight": float(run["cell_loss_weight"]),
            "chunk_size": int(run["chunk_size"]),
            "gradient_checkpointing": run.data["checkpointing"],
            "frozen_trunk": self._trunk_frozen(),
            "loss": self.loss_,
            "pooling": self.pooling_,
            "cell_view": self.cell_view_,
            "expression_genes": self.expression_genes_,
        }

    # ----------------------------------------------------------------- expression view
    def _set_expression_genes(self, adata: Any, train_rows: np.ndarray) -> ExpressionRows:
        """Choose the expression view's genes (the most variable, log-normalised, over at
        most 20,000 training cells; one chunked pass) and set their statistics; return the
        reader of ``adata``."""
        from cellfm_sc.baselines import top_variable_genes

        view = self.module.expression_view
        cols, mean, var = top_variable_genes(
            adata, train_rows, view.n_genes, seed=self.seed, **self._data_kwargs()
        )
        names = np.asarray(self._gene_names(adata), dtype=object)
        genes = pd.Index(list(self.vocab.names)).get_indexer(names[cols])
        view.set_genes(
            torch.from_numpy(genes.astype(np.int64)),
            torch.from_numpy(mean).float(),
            torch.from_numpy(var).float(),
        )
        return self._expression_rows(adata)

    def _expression_rows(self, adata: Any) -> ExpressionRows | None:
        """The expression view's reader of ``adata`` (its genes matched by name), or None."""
        view = self.module.expression_view
        if view is None:
            return None
        wanted = np.asarray(list(self.vocab.names), dtype=object)[view.genes.cpu().numpy()]
        columns = pd.Index(self._gene_names(adata)).get_indexer(wanted)
        return ExpressionRows(adata, columns, **self._data_kwargs())
