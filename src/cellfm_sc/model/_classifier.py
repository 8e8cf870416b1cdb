"""``CellFMClassifier``: classify cells with a fine-tuned CellFM (module + plan + user API)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from cellfm_sc.data import (
    DataSplit,
    TokenBatch,
    donor_labels,
    obs_column,
)
from cellfm_sc.model._classifier_evaluate import ClassifierEvaluationMixin
from cellfm_sc.model._classifier_training import TRAIN_DOC, ClassifierTrainingMixin
from cellfm_sc.model._module import CellFMClassifierModule
from cellfm_sc.model.base import (
    CellFMModel,
    Saved,
    inference_args,
    saved_rows,
    train_doc,
    trunk_args,
)
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, FinetuneRecipe
from cellfm_sc.train import ClassifierTrainingPlan

logger = logging.getLogger(__name__)

__all__ = ["CellFMClassifier", "ClassifierTrainingPlan"]


# --------------------------------------------------------------------------------------------
# the model class
# --------------------------------------------------------------------------------------------


class CellFMClassifier(ClassifierTrainingMixin, ClassifierEvaluationMixin, CellFMModel):
    """Fine-tune CellFM to classify cells (or donors' cells) of an AnnData.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts; in memory or
        ``backed="r"``).
    checkpoint
        A CellFM MindSpore ``.ckpt``. Every layer but the gene embedding is loaded from it;
        the gene embedding is built for ``adata.var_names``. Without a checkpoint a randomly
        initialised trunk of ``preset`` is used (with a warning).
    vocabulary_file
        The checkpoint's gene vocabulary (CellFM's ``expand_gene_info.csv``); needed for
        ``embedding_init="transfer"`` and for the coverage report.
    num_heads
        Retention heads (default 48 for the released 1536-wide checkpoints).
    preset
        A preset name (``"80M"``, ``"800M"``, ``"small"``, ``"tiny"``) or a
        :class:`~cellfm_sc.nn.CellFMConfig`. Without a checkpoint it defines the trunk
        (default ``"80M"``); with one it must agree with the checkpoint.
    embedding_init
        ``"random"`` (default: a new table for the data's genes) or ``"transfer"``
        (pretrained rows for genes CellFM knows).
    trainable
        ``"auto"`` (default): every parameter the classification uses (gene embedding,
        value encoder, cls token, retention layers, head). ``"encoder+head"`` is the
        original scripts' policy (gene embedding and value encoder frozen): with a
        re-initialised embedding the genes then stay random vectors, which cost 0.86 ->
        0.28 macro-F1 in our measurements. Also ``"head"``,
        ``"encoder+head+embedding"``, ``"all"`` and ``"lora"``.
    max_tokens
        Most gene tokens per cell (2048 as pretrained); larger cells are sub-sampled.
    head_hidden
        Hidden width of the classification head (0: one linear layer).
    dropout
        Dropout of the head and the retention layers.
    seed
        Seed of every random initialisation, of the splits and of the token draws.
    hgnc_table
        Optional HGNC table for alias/previous-symbol mapping (``"transfer"``).
    lora_rank, lora_alpha
        LoRA settings for ``trainable="lora"``.

    Examples
    --------
    >>> import cellfm_sc
    >>> adata = cellfm_sc.datasets.pbmc3k()
    >>> cellfm_sc.CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    >>> model = cellfm_sc.CellFMClassifier(adata, preset="tiny")  # doctest: +SKIP
    >>> model.train(max_epochs=5)  # doctest: +SKIP
    >>> model.annotate()  # obs["cellfm_prediction"], obsm["X_cellfm"]  # doctest: +SKIP
    """

    _module_cls = CellFMClassifierModule
    _saved: ClassVar[dict[str, Saved]] = {
        "classes_": Saved("classes_", list),
        "ordinal_": Saved("ordinal_", bool),
        "head_hidden_": Saved("head_hidden", int),
        "dropout_": Saved("dropout", float),
        "transferred_rows_": Saved("transferred_rows", saved_rows),
    }

    def __init__(
        self,
        adata: Any,
        checkpoint: str | os.PathLike[str] | None = None,
        vocabulary_file: str | os.PathLike[str] | None = None,
        num_heads: int | None = None,
        preset: str | CellFMConfig | None = None,
        embedding_init: str = "random",
        trainable: str = "auto",
        max_tokens: int = 2048,
        head_hidden: int = 128,
        dropout: float = 0.1,
        seed: int = 0,
        hgnc_table: str | os.PathLike[str] | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
    ) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0, got {head_hidden}")
        super().__init__(adata)
        self._init_common()
        self._read_classes(adata, self._read_setup_args())
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        trunk = self._build_trunk(adata, **trunk_args(locals()))
        self.head_hidden_ = int(head_hidden)
        self.dropout_ = float(dropout)
        self.transferred_rows_ = _transferred_rows(self._pretrained_report)
        self._attach(self._make_module(trunk), trainable, lora_rank, lora_alpha)
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------- setup_anndata
    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        labels_key: str,
        donor_key: str | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        label_order: Sequence[str] | None = None,
        use_raw: bool = False,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData: raw counts, labels (and their order), donors.

        Parameters
        ----------
        adata
            AnnData with raw counts in ``.X`` or ``.layers[layer]`` (CSR, CSC, dense or
            ``backed="r"``).
        labels_key
            ``obs`` column with the labels. An ordered categorical column, or
            ``label_order``, makes the task ordinal (QWK is reported).
        donor_key
            ``obs`` column with donor ids: splits keep donors whole and donor-level
            metrics are reported; when every donor's cells share one label, model
            selection follows the validation donors' score.
        layer
            Layer with the raw counts (default ``.X``).
        gene_symbols
            ``var`` column with gene symbols when ``var_names`` are Ensembl ids (used for
            the ``"transfer"`` mapping; ``raw.var`` with ``use_raw``, or ``var`` when it
            lists every gene of ``raw``, as CELLxGENE files do).
        label_order
            Class order (ordinal stages), e.g. ``["Not AD", "Low", "Intermediate", "High"]``.
        use_raw
            Counts in ``adata.raw.X`` (scanpy's keyword; the CELLxGENE layout, where ``X``
            holds normalised values of a gene subset): the genes are ``adata.raw.var_names``.
            The matrix is read in place, never copied.

        Examples
        --------
        >>> CellFMClassifier.setup_anndata(adata, labels_key="ADNC", donor_key="Donor ID",
        ...     label_order=["Not AD", "Low", "Intermediate", "High"])  # doctest: +SKIP
        """
        if label_order is not None:
            label_order = [str(c) for c in label_order]
        cls._register_labelled(adata, cls._get_setup_method_args(**locals()), **kwargs)

    # ----------------------------------------------------------------- labels
    def _label_codes(self, adata: Any, strict: bool = True) -> np.ndarray:
        """Label code of every cell (-1 for a label the model does not know, if not strict)."""
        labels = obs_column(adata, self.labels_key, keyword="labels_key", allow_missing=True)
        codes = pd.Categorical(labels.astype(str), categories=self.classes_).codes.astype(np.int64)
        codes[labels.isna().to_numpy()] = -1
        if strict and (codes < 0).any():
            bad = sorted(set(labels[codes < 0].astype(str)))[:10]
            raise ValueError(
                f"labels {bad} of labels_key={self.labels_key!r} are not among the model's "
                f"classes {self.classes_}"
            )
        return codes

    def _donor_level_labels(self, adata: Any) -> bool:
        """Whether labels belong to donors (every donor's cells share one label)."""
        if self.donor_key is None:
            return False
        try:
            donor_labels(
                self._donors(adata), obs_column(adata, self.labels_key, keyword="labels_key")
            )
        except ValueError:
            return False
        return True

    @train_doc(TRAIN_DOC)
    def train(
        self,
        max_epochs: int = 20,
        batch_size: int = 16,
        lr: float | str = "auto",
        weight_decay: float = 1e-5,
        validation_size: float = 0.1,
        test_size: float = 0.1,
        split: DataSplit | None = None,
        recipe: str | FinetuneRecipe = "auto",
        early_stopping: bool | str = "auto",
        patience: int = 3,
        monitor: str = "auto",
        check_val_every_n_steps: int | None = None,
        class_weights: Any = None,
        lr_schedule: str = "warmup_cosine",
        warmup_fraction: float = 0.05,
        precision: str | int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        gradient_clip_val: float | None = 1.0,
        masked_value_weight: float = 0.0,
        depth_augmentation: float | str = "auto",
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 1,
        resume_from: str | os.PathLike[str] | None = None,
        logger: Any = None,
        enable_progress_bar: bool = True,
        verbose: bool = False,
        gradient_checkpointing: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        self._train(locals())

    # ----------------------------------------------------------------- inference
    def _infer(
        self,
        adata: Any | None,
        indices: Any,
        batch_size: int,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        embedding_out: Any = None,
        allow_untrained: bool = False,
    ) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """``(adata, idx, probabilities (n, K), embeddings (n, D))``; NaN rows for cells
        without counts. The embeddings go to ``embedding_out`` when given (streamed)."""
        adata, idx, out = self._forward_over(
            adata,
            indices,
            {"probs": (len(self.classes_),), "emb": (self.module.trunk.config.enc_dims,)},
            _probs_and_embedding,
            sinks=None if embedding_out is None else {"emb": embedding_out},
            **inference_args(locals()),
        )
        return adata, idx, out["probs"], out["emb"]

    def _predicted(self, probs: np.ndarray) -> pd.Categorical:
        """The predicted class of each row of ``probs (n, K)``, a categorical over the
        model's classes in order; NaN where the row is NaN (a cell without counts)."""
        codes = np.where(np.isnan(probs[:, 0]), -1, np.nan_to_num(probs).argmax(1))
        return pd.Categorical.from_codes(codes, categories=self.classes_)

    def predict(
        self,
        adata: Any | None = None,
        indices: Any = None,
        soft: bool = False,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
    ) -> pd.Categorical | pd.DataFrame:
        """Predicted labels, or with ``soft=True`` a DataFrame of class probabilities.

        Parameters
        ----------
        adata
            Default: the model's AnnData; query data may lack the labels column (it is never
            read) and hold another gene set (see ``min_gene_coverage``).
        indices
            Cells (positions, a boolean mask, obs names, or ``"train"`` / ``"validation"`` /
            ``"test"``); default all, in ``adata``'s order.
        soft
            Return the class probabilities instead of the labels.
        batch_size, device, enable_progress_bar
            Inference settings.
        min_gene_coverage
            Least share of the model's genes ``adata`` must hold.
        allow_untrained
            Predict with a model that was never trained (random outputs); otherwise that is
            an :class:`~cellfm_sc.model.UntrainedModelError`.

        Returns
        -------
        pandas.Categorical or pandas.DataFrame
            ``(n,)`` categorical whose categories are the model's classes in order (so
            ``adata.obs["pred"] = model.predict()`` colours like the labels in scanpy);
            cells without counts are NaN. With ``soft=True``, ``(n, K)`` probabilities: the
            columns are the classes in order, the index the obs names (as scvi-tools'
            ``predict(soft=True)``); cells without counts get NaN rows.
        """
        adata, idx, probs, _ = self._infer(adata, indices, **inference_args(locals()))
        if soft:
            return pd.DataFrame(probs, index=adata.obs_names[idx], columns=self.classes_)
        return self._predicted(probs)

    def annotate(
        self,
        adata: Any | None = None,
        key_added: str = "cellfm",
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        embedding_out: Any = None,
        allow_untrained: bool = False,
    ) -> None:
        """Write predictions and the embedding into the AnnData (all cells).

        Adds ``obs[f"{key_added}_prediction"]`` (categorical in class order),
        ``obs[f"{key_added}_confidence"]``, ``obs[f"{key_added}_split"]`` (``train`` /
        ``validation`` / ``test`` / ``none``, matched by obs name), ``obsm[f"{key_added}_probabilities"]``
        ``(n, K)`` (columns in ``uns[key_added]["classes"]``) and ``obsm[f"X_{key_added}"]``
        ``(n, D)``. Works on ``backed="r"`` AnnData without loading ``X``; the labels column
        is never read. With ``embedding_out`` (an array-like ``(n, D)``, e.g. an h5py or
        zarr dataset) the embedding is streamed there instead of ``obsm``, so memory does
        not grow with ``n`` times ``D``. A model never trained is refused
        (:class:`~cellfm_sc.model.UntrainedModelError`) unless ``allow_untrained=True``.
        """
        adata, _, probs, emb = self._infer(
            adata, None, embedding_out=embedding_out, **inference_args(locals())
        )
        empty = np.isnan(probs[:, 0])
        adata.obs[f"{key_added}_prediction"] = self._predicted(probs)
        confidence = np.where(empty, np.nan, np.nan_to_num(probs).max(axis=1)).astype(np.float32)
        adata.obs[f"{key_added}_confidence"] = confidence
        adata.obs[f"{key_added}_split"] = pd.Categorical(
            self.split_labels(adata), categories=["train", "validation", "test", "none"]
        )
        adata.obsm[f"{key_added}_probabilities"] = probs
        if embedding_out is None:
            adata.obsm[f"X_{key_added}"] = emb
        adata.uns[key_added] = {
            "classes": list(self.classes_),
            "ordinal": bool(self.ordinal_),
            "labels_key": self.labels_key,
            "embedding_key": f"X_{key_added}",
            "settings": {
                "max_tokens": self.max_tokens,
                "seed": self.seed,
                "trainable": self.trainable_,
                "embedding_init": self.embedding_init_,
                "variant": (self.pretrained_report_ or {}).get("variant"),
            },
        }

    # ----------------------------------------------------------------- save / load parts
    def _make_module(self, trunk: CellFMTrunk) -> CellFMClassifierModule:
        return CellFMClassifierModule(trunk, len(self.classes_), self.head_hidden_, self.dropout_)


def _transferred_rows(report: Any) -> np.ndarray | None:
    """Gene-embedding rows (token ids) that ``embedding_init="transfer"`` filled from the
    checkpoint, or None (no checkpoint, or every row re-initialised)."""
    if report is None or report.embedding_init != "transfer" or report.mapping is None:
        return None
    return (np.flatnonzero(report.mapping.pretrained_ids) + 1).astype(np.int64)


def _probs_and_embedding(module: CellFMClassifierModule, batch: TokenBatch) -> dict[str, Any]:
    out = module(batch)
    return {"probs": torch.softmax(out.logits.float(), dim=-1), "emb": out.cls}
