"""The donor model's inference: donor predictions from bags of all of a donor's cells, attention."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellfm_sc.dataloaders._bags import (
    eval_keys,
    partition_bags,
)
from cellfm_sc.metrics._donor import aggregate_bag_logits
from cellfm_sc.model.base import inference_args
from cellfm_sc.nn.ordinal import class_probabilities, predict_classes

#: cells per head call at inference (bags are never split across calls)
_HEAD_CELLS = 65_536


__all__ = ["DonorInferenceMixin"]


@dataclass
class _DonorInference:
    idx: np.ndarray  # (m,) AnnData rows
    cell_donor: np.ndarray  # (m,) donor name of each cell
    emb: np.ndarray  # (m, D)
    attention: np.ndarray  # (m,) weight within the donor (NaN: cell without counts)
    donors: np.ndarray  # (n_d,) donor names, sorted
    logits: np.ndarray  # (n_d, n_out)
    probs: np.ndarray  # (n_d, K)
    pred: np.ndarray  # (n_d,) codes (-1: donor without usable cells)
    n_cells: np.ndarray  # (n_d,)


class DonorInferenceMixin:
    """``predict_donors`` and ``annotate`` of :class:`~cellfm_sc.model.CellFMDonorClassifier`."""

    # ----------------------------------------------------------------- inference
    def _infer(
        self,
        adata: Any | None,
        indices: Any,
        donor_key: str | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
    ) -> tuple[Any, _DonorInference]:
        self._require_trained(allow_untrained)  # before any other complaint
        adata = self._adata_or_default(adata)
        idx = self._indices(adata, indices)
        cell_donor = self._donors(adata, donor_key)[idx]
        reader = self._expression_rows(adata)
        if self.module.uses_trunk:
            emb = self._cell_embeddings(
                adata, idx, batch_size, device, enable_progress_bar, min_gene_coverage, True
            )
            ok = ~np.isnan(emb[:, 0]) if len(idx) else np.zeros(0, bool)
        else:
            # no trunk: the embedding reported is the expression view's output
            emb = np.full((len(idx), self.expression_dim_), np.nan, np.float32)
            ok = reader.source.row_nnz()[idx] > 0
        max_cells = _HEAD_CELLS if reader is None else _HEAD_CELLS // 8
        codes, donors = pd.factorize(cell_donor, sort=True)
        donors = np.asarray(donors, dtype=object)
        keys = eval_keys(np.asarray(adata.obs_names)[idx], self.seed)
        pos = np.flatnonzero(ok)
        bags = partition_bags(pos, codes[pos], self.bag_size, keys=keys[pos])
        attention = np.full(len(idx), np.nan, np.float32)
        bag_logits, bag_donor, bag_size = [], [], []
        module = self.module.eval()
        dev = self.device
        with torch.inference_mode():
            start = 0
            while start < len(bags):
                group, n = [], 0
                while start < len(bags) and (not group or n + bags[start].rows.size <= max_cells):
                    group.append(bags[start])
                    n += bags[start].rows.size
                    start += 1
                rows = np.concatenate([b.rows for b in group])
                bag = np.repeat(np.arange(len(group)), [b.rows.size for b in group])
                expr = None if reader is None else torch.from_numpy(reader(idx[rows])).to(dev)
                out = module(
                    torch.from_numpy(emb[rows]).to(dev) if self.module.uses_trunk else None,
                    torch.from_numpy(bag).to(dev),
                    len(group),
                    expr,
                )
                if not self.module.uses_trunk:
                    emb[rows] = out.cells.float().cpu().numpy()
                attention[rows] = out.attention.float().cpu().numpy()
                bag_logits.append(out.logits.float().cpu().numpy())
                bag_donor.extend(b.donor for b in group)
                bag_size.extend(b.rows.size for b in group)
        n_d, k = len(donors), len(self.classes_)
        logits = np.full((n_d, k if self.loss_ == "cross_entropy" else k - 1), np.nan)
        probs = np.full((n_d, k), np.nan)
        pred = np.full(n_d, -1, np.int64)
        n_cells = np.zeros(n_d, np.int64)
        if bags:
            have, z, total = aggregate_bag_logits(
                np.concatenate(bag_logits), np.asarray(bag_donor), np.asarray(bag_size)
            )
            p = class_probabilities(self.loss_, torch.from_numpy(z))
            logits[have] = z
            probs[have] = p.double().numpy()
            pred[have] = predict_classes(p, self.ordinal_).numpy()
            n_cells[have] = total
            # a bag's weights sum to 1; scaled by its share of the donor's cells, a donor's
            # weights sum to 1 (the same weights that average the bags' logits)
            share = (
                np.asarray(bag_size, np.float64)
                / np.bincount(
                    np.asarray(bag_donor), weights=np.asarray(bag_size, np.float64), minlength=n_d
                )[np.asarray(bag_donor)]
            )
            for b, s in zip(bags, share):
                attention[b.rows] *= s
        missing = np.flatnonzero(n_cells == 0)
        if missing.size:
            warnings.warn(
                f"{missing.size} donor(s) have no cell with counts and get no prediction: "
                f"{donors[missing[:5]].tolist()}",
                UserWarning,
                stacklevel=3,
            )
        return adata, _DonorInference(
            idx=idx,
            cell_donor=cell_donor,
            emb=emb,
            attention=attention,
            donors=donors,
            logits=logits,
            probs=probs,
            pred=pred,
            n_cells=n_cells,
        )

    def _categorical(self, codes: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(
            np.asarray(codes, dtype=np.int64), categories=self.classes_, ordered=self.ordinal_
        )

    def predict_donors(
        self,
        adata: Any | None = None,
        indices: Any = None,
        donor_key: str | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
    ) -> pd.DataFrame:
        """One prediction per donor, from all of the donor's cells.

        The donor's cells are cut into ``ceil(n / bag_size)`` fixed bags (ordered by a hash
        of their obs names, so the result does not depend on the AnnData's row order), and
        the bags' logits are averaged, weighted by their cell counts.

        Parameters
        ----------
        adata
            Default: the model's AnnData. Query data need the donor column (the labels
            column is not read); other gene sets are aligned as in
            :meth:`CellFMClassifier.predict <cellfm_sc.model.CellFMClassifier.predict>`.
        indices
            Cells to use (positions, a boolean mask, obs names, or ``"train"`` /
            ``"validation"`` / ``"test"``); default all.
        donor_key
            Donor column of ``adata`` (default: the one set up).
        batch_size, device, enable_progress_bar, min_gene_coverage
            Inference settings.
        allow_untrained
            Predict with a model never trained (random outputs); otherwise that is an
            :class:`~cellfm_sc.model.UntrainedModelError`.

        Returns
        -------
        DataFrame indexed by donor (sorted, index name ``"donor"``): ``predicted``
        (categorical, in class order), ``p_<class>`` per class, ``n_cells`` (cells used).
        """
        _, res = self._infer(adata, indices, donor_key, **inference_args(locals()))
        return self._donor_frame(res)

    def _donor_frame(self, res: _DonorInference) -> pd.DataFrame:
        out = pd.DataFrame(index=pd.Index(res.donors, name="donor"))
        out["predicted"] = self._categorical(res.pred)
        for j, c in enumerate(self.classes_):
            out[f"p_{c}"] = res.probs[:, j]
        out["n_cells"] = res.n_cells
        return out

    def annotate(
        self,
        adata: Any | None = None,
        key_added: str = "cellfm",
        donor_key: str | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
    ) -> pd.DataFrame:
        """Write per-cell results into the AnnData; return :meth:`predict_donors`' table.

        Adds ``obs[f"{key_added}_attention"]`` (each cell's weight within its donor; a
        donor's weights sum to 1; NaN for cells without counts),
        ``obs[f"{key_added}_donor_prediction"]`` (the cell's donor's prediction,
        categorical), ``obs[f"{key_added}_split"]`` and ``obsm[f"X_{key_added}"]`` (the cell
        embeddings ``(n, D)``); ``uns[key_added]`` holds the classes and settings. A model
        never trained is refused (:class:`~cellfm_sc.model.UntrainedModelError`) unless
        ``allow_untrained=True``.
        """
        adata, res = self._infer(adata, None, donor_key, **inference_args(locals()))
        where = pd.Index(res.donors).get_indexer(res.cell_donor)
        adata.obs[f"{key_added}_attention"] = res.attention
        adata.obs[f"{key_added}_donor_prediction"] = self._categorical(res.pred[where])
        adata.obs[f"{key_added}_split"] = pd.Categorical(
            self.split_labels(adata), categories=["train", "validation", "test", "none"]
        )
        adata.obsm[f"X_{key_added}"] = res.emb
        adata.uns[key_added] = {
            "classes": list(self.classes_),
            "ordinal": bool(self.ordinal_),
            "labels_key": self.labels_key,
            "donor_key": donor_key or self.donor_key,
            "attention_key": f"{key_added}_attention",
            "embedding_key": f"X_{key_added}",
            "settings": {
                "bag_size": self.bag_size,
                "pooling": self.pooling_,
                "loss": self.loss_,
                "max_tokens": self.max_tokens,
                "seed": self.seed,
                "trainable": self.trainable_,
                "cell_view": self.cell_view_,
                "expression_genes": self.expression_genes_,
            },
        }
        return self._donor_frame(res)
