"""``CellFMDonorClassifier``: learn donor labels from bags of the donors' cells.

Labels such as ADNC belong to donors, and most of a donor's cells look like any other donor's.
The donor model learns from **bags** (up to ``bag_size`` cells of one donor): the trunk encodes
the cells, gated attention pooling weighs them into a bag embedding, a head gives the bag's
logits; the loss is ordinal (cumulative link or CORN) when the labels are ordered,
cross-entropy otherwise. A donor's prediction averages the logits of bags that cover all of
its cells, and each cell's attention weight shows which cells drive the call.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from cellfm_sc._constants import DONOR_LOSSES, POOLINGS
from cellfm_sc.data import (
    DataSplit,
    obs_column,
)
from cellfm_sc.model._donor_evaluate import DonorEvaluationMixin
from cellfm_sc.model._donor_inference import DonorInferenceMixin
from cellfm_sc.model._donor_module import CELL_VIEWS, CellFMDonorModule
from cellfm_sc.model._donor_training import DonorTrainingMixin
from cellfm_sc.model.base import CellFMModel, Saved, trunk_args
from cellfm_sc.model.base._inference import cls_embedding
from cellfm_sc.nn import CellFMConfig, CellFMTrunk
from cellfm_sc.train import DonorTrainingPlan

logger = logging.getLogger(__name__)

__all__ = ["CellFMDonorClassifier", "DonorTrainingPlan"]


# --------------------------------------------------------------------------------------------
# the model class
# --------------------------------------------------------------------------------------------


class CellFMDonorClassifier(
    DonorTrainingMixin, DonorInferenceMixin, DonorEvaluationMixin, CellFMModel
):
    """Predict donor-level labels (e.g. ADNC stage) from bags of each donor's cells.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts; in memory or
        ``backed="r"``).
    checkpoint, vocabulary_file, num_heads, preset, embedding_init, hgnc_table
        The trunk, as for :class:`~cellfm_sc.model.CellFMClassifier`: a pretrained MindSpore
        checkpoint, or a random trunk of ``preset`` (with a warning).
    max_tokens
        Most gene tokens per cell.
    bag_size
        Most cells per bag. Training bags are redrawn every epoch; at inference every cell of
        a donor is in one of ``ceil(n / bag_size)`` bags.
    pooling
        ``"gated_attention"`` (Ilse et al. 2018; each cell gets a weight) or ``"mean"``.
    trainable
        ``"auto"`` (default): with a pretrained trunk (``checkpoint=``), ``"head"``, the
        frozen-trunk fast path: every cell is encoded once (cached), and only the views,
        pooling and head train (seconds per epoch, whatever the bag size). A *random* trunk
        is never frozen by default (its features carry little of the signal: measured on a
        donor task where pseudo-bulk reached QWK 0.80, a head on frozen random tiny-trunk
        features scored -0.28): it trains end to end with the head (the classifier's
        ``"auto"`` policy). ``"head"``, ``"encoder+head"``, ``"encoder+head+embedding"``,
        ``"all"`` or ``"lora"`` choose explicitly; with a trainable trunk a bag is encoded in
        chunks of cells (with gradient checkpointing on GPUs, so the bag size does not set
        the memory). With ``cell_view="expression"`` the trunk is not used and stays frozen.
    loss
        ``"auto"`` (default): ``"cumulative_link"`` (an ordinal model: one score and ordered
        thresholds) when the labels are ordered (``label_order``), ``"cross_entropy"``
        otherwise. ``"corn"`` is the other ordinal choice.
    attention_hidden
        Width of the attention network.
    head_hidden
        Width of the head's hidden layer (0: linear head).
    cell_view
        What represents a cell in a bag. ``"both"``: the trunk's (standardised) cls
        embedding beside an **expression view**, a learned linear map (+ GELU) of the cell's
        log-normalised counts over the ``expression_genes`` most variable genes of the
        training cells (standardised with their statistics), so the pooled model sees at
        least what pseudo-bulk sees, at cell resolution. ``"expression"``: the expression
        view only (the trunk is not used). ``"trunk"``: the embedding only. ``"auto"``
        (default): ``"both"`` with a pretrained trunk or an explicitly trained one
        (``trainable="all"`` ...); ``"expression"`` with a random one otherwise,
        whose embedding carries no biology: on the donor benchmark (:doc:`/benchmarks`)
        the expression view alone matched or beat a random tiny trunk trained end to end
        beside it, at a small fraction of the time. ``cell_view="both"`` with a random trunk
        trains it end to end (``trainable="auto"``).
    expression_genes, expression_dim
        Genes of the expression view (at most the number of genes) and its width. 500 won
        on the donor benchmark: 2,000 genes fitted noise when the signal sat in a minority
        of one cell type (pooled QWK 0.56 vs 0.84), and 250 or 1,000 did no better.
    dropout
        Dropout of the head, the attention network and the retention layers.
    seed
        Seed of the initialisation, the splits, the bags and the token draws.
    lora_rank, lora_alpha
        LoRA settings for ``trainable="lora"``.

    Examples
    --------
    >>> import cellfm_sc
    >>> cellfm_sc.CellFMDonorClassifier.setup_anndata(
    ...     adata, labels_key="ADNC", donor_key="Donor ID",
    ...     label_order=["Not AD", "Low", "Intermediate", "High"])  # doctest: +SKIP
    >>> model = cellfm_sc.CellFMDonorClassifier(adata, preset="tiny", max_tokens=256)  # doctest: +SKIP
    >>> model.train(max_epochs=10)  # doctest: +SKIP
    >>> model.predict_donors(adata)  # predicted, p_<class>, n_cells  # doctest: +SKIP
    """

    _module_cls = CellFMDonorModule
    _saved: ClassVar[dict[str, Saved]] = {
        "classes_": Saved("classes_", list),
        "ordinal_": Saved("ordinal_", bool),
        "loss_": Saved("loss_", str),
        "bag_size": Saved("bag_size", int),
        "pooling_": Saved("pooling_", str),
        "attention_hidden_": Saved("attention_hidden", int),
        "head_hidden_": Saved("head_hidden", int),
        "dropout_": Saved("dropout", float),
        # models saved before the expression view: the trunk alone
        "cell_view_": Saved("cell_view", str, "trunk"),
        "expression_genes_": Saved("expression_genes", int, 0),
        "expression_dim_": Saved("expression_dim", int, 64),
    }

    def __init__(
        self,
        adata: Any,
        checkpoint: str | os.PathLike[str] | None = None,
        vocabulary_file: str | os.PathLike[str] | None = None,
        preset: str | CellFMConfig | None = None,
        num_heads: int | None = None,
        embedding_init: str = "random",
        max_tokens: int = 2048,
        bag_size: int = 128,
        pooling: str = "gated_attention",
        trainable: str = "auto",
        loss: str = "auto",
        attention_hidden: int = 128,
        head_hidden: int = 128,
        dropout: float = 0.1,
        seed: int = 0,
        hgnc_table: str | os.PathLike[str] | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        cell_view: str = "auto",
        expression_genes: int = 500,
        expression_dim: int = 64,
    ) -> None:
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("bag_size", bag_size, 1),
            ("attention_hidden", attention_hidden, 1),
            ("head_hidden", head_hidden, 0),
            ("expression_genes", expression_genes, 1),
            ("expression_dim", expression_dim, 1),
        ):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if loss not in DONOR_LOSSES:
            raise ValueError(f"loss must be one of {DONOR_LOSSES}, got {loss!r}")
        if cell_view not in ("auto", *CELL_VIEWS):
            raise ValueError(f"cell_view must be one of {('auto', *CELL_VIEWS)}, got {cell_view!r}")
        super().__init__(adata)
        self._init_common()
        args = self._read_setup_args()
        if self.donor_key is None:
            raise ValueError(
                "the AnnData is not set up for a donor model: call "
                "CellFMDonorClassifier.setup_anndata(adata, labels_key=..., donor_key=...)"
            )
        self._read_classes(adata, args)
        self.loss_ = _resolve_loss(loss, self.ordinal_)
        self.max_tokens = int(max_tokens)
        self.bag_size = int(bag_size)
        self.seed = int(seed)
        trunk = self._build_trunk(adata, **trunk_args(locals()))
        self.pooling_ = pooling
        self.attention_hidden_ = int(attention_hidden)
        self.head_hidden_ = int(head_hidden)
        self.dropout_ = float(dropout)
        #: the view asked for (``cell_view_`` holds the one used)
        self.cell_view_requested_ = cell_view
        if cell_view == "auto":
            # a random trunk is used only when asked to train (a frozen one carries nothing)
            trains_trunk = trainable not in ("auto", "head")
            cell_view = "both" if self.pretrained or trains_trunk else "expression"
        self.cell_view_ = cell_view
        self.expression_genes_ = (
            0 if cell_view == "trunk" else min(int(expression_genes), int(self.vocab.n_genes))
        )
        self.expression_dim_ = int(expression_dim)
        module = self._make_module(trunk)
        #: the policy asked for (``trainable_`` holds the one applied)
        self.trainable_requested_ = trainable
        self._attach(
            module, _resolve_trainable(trainable, self.pretrained, cell_view), lora_rank, lora_alpha
        )
        self._cache: dict[str, Any] | None = None
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------- setup_anndata
    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        labels_key: str,
        donor_key: str,
        label_order: Sequence[str] | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        use_raw: bool = False,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData: raw counts, donors and their labels (one label per donor).

        Parameters
        ----------
        adata
            AnnData with raw counts in ``.X``, ``.layers[layer]`` or ``.raw.X``.
        labels_key
            ``obs`` column of the donor-level label. Every cell of a donor must carry the
            same label (the error names the first donor with two).
        donor_key
            ``obs`` column of donor ids.
        label_order
            Class order, lowest first (e.g. ``["Not AD", "Low", "Intermediate", "High"]``):
            the labels are then ordinal (ordinal loss, QWK). An ordered categorical column
            is ordinal too.
        layer
            Layer with the raw counts (default ``.X``).
        gene_symbols
            ``var`` column of gene symbols when ``var_names`` are Ensembl ids.
        use_raw
            Counts in ``adata.raw.X`` (genes: ``adata.raw.var_names``).
        """
        if label_order is not None:
            label_order = [str(c) for c in label_order]
        cls._register_labelled(
            adata,
            cls._get_setup_method_args(**locals()),
            partial(check_donor_labels, labels_key=labels_key, donor_key=donor_key),
            **kwargs,
        )

    # ----------------------------------------------------------------- donors and labels
    def _donor_label_codes(self, adata: Any, idx: np.ndarray) -> pd.Series:
        """Label code of each donor of cells ``idx`` (-1: a label the model does not know)."""
        labels = obs_column(adata, self.labels_key, keyword="labels_key", allow_missing=True)
        donors = self._donors(adata)[idx]
        values = labels.to_numpy()[idx]
        check_donor_labels(
            pd.Series(donors),
            pd.Series(values),
            labels_key=self.labels_key,
            donor_key=self.donor_key,
        )
        first = pd.Series(values, index=donors).groupby(level=0, sort=True).first()
        codes = pd.Categorical(first.astype(str), categories=self.classes_).codes
        codes = np.where(first.isna().to_numpy(), -1, codes)
        return pd.Series(codes.astype(np.int64), index=first.index)

    # ----------------------------------------------------------------- cell embeddings
    def _trunk_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.module.trunk.parameters())

    def _cache_token(self, adata: Any) -> tuple[Any, ...]:
        version = sum(int(p._version) for p in self.module.trunk.parameters())
        return (adata.n_obs, adata.n_vars, version, self.max_tokens, self.seed)

    def clear_embedding_cache(self) -> None:
        """Forget the cached cell embeddings of the frozen trunk (``trainable="head"``).

        The cache belongs to one AnnData object and the trunk's weights; it is rebuilt when
        either changes. Counts edited in place are not noticed: clear the cache then.
        """
        self._cache = None

    @property
    def embedding_cache_info(self) -> dict[str, int]:
        """Counts of the frozen-trunk cache (zeros when there is none).

        Keys: ``cached`` (cells held), ``computed`` (cells encoded), ``reused`` (cells
        served from the cache).
        """
        c = self._cache
        if c is None:
            return {"cached": 0, "computed": 0, "reused": 0}
        return {
            "cached": int(c["have"].sum()),
            "computed": int(c["computed"]),
            "reused": int(c["reused"]),
        }

    def _cell_embeddings(
        self,
        adata: Any,
        idx: np.ndarray,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
    ) -> np.ndarray:
        """Cell embeddings (the trunk's cls) ``(len(idx), D)`` float32, NaN rows for cells
        without counts; with a frozen trunk, computed once per cell and cached. Training
        (which embeds before the model is trained) passes ``allow_untrained``."""
        d = self.module.trunk.config.enc_dims
        self._require_trained(allow_untrained, head=False)

        def compute(rows: np.ndarray) -> np.ndarray:
            return self._forward_cells(
                adata,
                rows,
                batch_size,
                device,
                {"emb": (d,)},
                cls_embedding,
                enable_progress_bar,
                min_gene_coverage,
                allow_untrained=True,  # checked above
                head=False,
            )["emb"]

        if not self._trunk_frozen():
            return compute(idx)
        token = self._cache_token(adata)
        c = self._cache
        if c is None or c["adata"]() is not adata or c["token"] != token:
            c = self._cache = {
                "adata": weakref.ref(adata),
                "token": token,
                "emb": np.zeros((adata.n_obs, d), np.float32),
                "have": np.zeros(adata.n_obs, bool),
                "computed": 0,
                "reused": 0,
            }
        need = idx[~c["have"][idx]]
        c["reused"] += int(idx.size - need.size)
        if need.size:
            c["emb"][need] = compute(need)
            c["have"][need] = True
            c["computed"] += int(need.size)
            c["token"] = self._cache_token(adata)
        return c["emb"][idx]

    def train(
        self,
        max_epochs: int = 10,
        split: DataSplit | None = None,
        validation_size: float = 0.1,
        test_size: float = 0.1,
        lr: float | str = "auto",
        batch_size: int = 1,
        weight_decay: float = 1e-5,
        monitor: str = "auto",
        early_stopping: bool = False,
        patience: int = 5,
        cell_loss_weight: float = 0.0,
        lr_schedule: str = "warmup_cosine",
        warmup_fraction: float = 0.05,
        chunk_size: int = 32,
        gradient_checkpointing: bool | str = "auto",
        precision: str | int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        gradient_clip_val: float | None = 1.0,
        num_workers: int = 0,
        embedding_batch_size: int = 64,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 1,
        resume_from: str | os.PathLike[str] | None = None,
        logger: Any = None,
        enable_progress_bar: bool = True,
        verbose: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Train on bags of the training donors' cells; keep the best validation weights.

        One epoch partitions every training donor's cells into bags of at most
        ``bag_size`` cells at random, so each training cell is in exactly one bag.

        Parameters
        ----------
        max_epochs
            Epochs.
        split
            A :class:`~cellfm_sc.data.DataSplit` by donor (``split_from_obs(adata, "split",
            donor_key=...)``, ``split_by_donor``, ``split_from_json``); a donor in two
            splits is an error. Default: :func:`~cellfm_sc.data.split_by_donor` with
            ``validation_size`` / ``test_size`` (fractions or counts of donors, stratified
            by label).
        lr
            AdamW learning rate; ``"auto"``: :func:`~cellfm_sc.model.auto_lr` (1e-3 for a
            random trunk, for a pretrained one 1e-4 at the released width) when the trunk
            trains, 1e-3 for the head alone.
        batch_size
            Bags per optimizer step.
        weight_decay
            AdamW weight decay.
        monitor
            What model selection follows: ``"auto"`` = ``"validation_donor_score"``, the
            validation donors' QWK (ordinal) or balanced accuracy, ties broken by the lower
            donor loss; also ``"validation_donor_qwk"``, ``"validation_donor_balanced_acc"``,
            ``"validation_donor_acc"``, ``"validation_donor_loss"``, ``"validation_loss"``
            (per bag).
        early_stopping, patience
            Stop after ``patience`` epochs without improvement of ``monitor`` (off by
            default: the best epoch's weights are kept either way).
        cell_loss_weight
            Weight of an auxiliary cell-level loss: every cell of a bag classified by the
            same head with its donor's label (0 = off, the plain bag model).
        lr_schedule, warmup_fraction
            Learning-rate schedule (see :class:`~cellfm_sc.model.CellFMClassifier`).
        chunk_size
            Cells the trunk encodes at once within a bag (trainable trunk).
        gradient_checkpointing
            Recompute each chunk's activations in the backward pass, so a bag's memory is
            that of one chunk plus its ``(n, D)`` embeddings. ``"auto"``: on GPUs.
        precision, accelerator, devices, strategy, gradient_clip_val
            Lightning settings. Under DDP (``strategy="ddp"``) each process takes every
            N-th step of bags; validation bags are split across the processes and gathered,
            so the validation donors' scores are exact.
        num_workers
            DataLoader workers (trainable trunk).
        embedding_batch_size
            Cells per batch when the frozen trunk's embeddings are computed.
        checkpoint_dir, keep_checkpoints, resume_from, logger, enable_progress_bar, verbose
            As for :meth:`CellFMClassifier.train <cellfm_sc.model.CellFMClassifier.train>`.
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        With ``trainable="head"`` the trunk is frozen: every training and validation cell
        is encoded once (cached on the model, see :attr:`embedding_cache_info`) and the
        epochs only train pooling + head. ``model.history`` has one row per epoch
        (``train_loss``, ``train_acc`` over bags, the validation metrics).
        """
        self._train(locals())

    # ----------------------------------------------------------------- save / load parts
    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        self._cache = None

    def _make_module(self, trunk: CellFMTrunk) -> CellFMDonorModule:
        return CellFMDonorModule(
            trunk,
            len(self.classes_),
            self.loss_,
            pooling=self.pooling_,
            attention_hidden=self.attention_hidden_,
            hidden=self.head_hidden_,
            dropout=self.dropout_,
            view=self.cell_view_,
            expression_genes=self.expression_genes_,
            expression_dim=self.expression_dim_,
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _resolve_trainable(trainable: str, pretrained: bool, cell_view: str) -> str:
    """The policy applied for ``trainable``: ``"auto"`` freezes a pretrained trunk only (a
    random one trains end to end); a trunk the head does not read is always frozen."""
    if cell_view == "expression":
        return "head"
    if trainable == "auto":
        return "head" if pretrained else "auto"
    return trainable


def _resolve_loss(loss: str, ordinal: bool) -> str:
    if loss == "auto":
        return "cumulative_link" if ordinal else "cross_entropy"
    if loss in ("cumulative_link", "corn") and not ordinal:
        raise ValueError(
            f"loss={loss!r} needs ordered labels: pass label_order= to setup_anndata (or use "
            "loss='cross_entropy')"
        )
    return loss


def check_donor_labels(
    donors: pd.Series, labels: pd.Series, *, labels_key: str, donor_key: str
) -> None:
    """Raise ``ValueError`` naming the first donor (in obs order) whose cells carry two or more
    labels; missing labels are ignored here."""
    frame = pd.DataFrame(
        {"donor": np.asarray(donors).astype(str), "label": np.asarray(labels, dtype=object)}
    ).dropna()
    frame["label"] = frame["label"].astype(str)
    n_labels = frame.groupby("donor", sort=False)["label"].nunique()
    mixed = n_labels[n_labels > 1]
    if len(mixed):
        first = mixed.index[0]
        values = sorted(frame.loc[frame["donor"] == first, "label"].unique())
        more = f" ({len(mixed) - 1} more donor(s) have several labels)" if len(mixed) > 1 else ""
        raise ValueError(
            f"labels_key={labels_key!r} is not constant within donors: donor {first!r} "
            f"(donor_key={donor_key!r}) has labels {values}{more}. A donor-level model needs "
            "one label per donor; fix the labels, or use CellFMClassifier for cell labels"
        )
