"""``CellFMDonorClassifier``: learn donor labels from bags of the donors' cells (DESIGN.md 8).

Labels such as ADNC belong to donors, and most of a donor's cells look like any other donor's.
The donor model learns from **bags** (up to ``bag_size`` cells of one donor): the trunk encodes
the cells, gated attention pooling weighs them into a bag embedding, a head gives the bag's
logits; the loss is ordinal (cumulative link or CORN) when the labels are ordered,
cross-entropy otherwise. A donor's prediction averages the logits of bags that cover all of
its cells, and each cell's attention weight shows which cells drive the call.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField

from cellfm_sc._constants import DONOR_LOSSES, DONOR_MONITORS, POOLINGS
from cellfm_sc.data import (
    DataSplit,
    check_count_source,
    check_counts,
    check_donors_disjoint,
    check_labels,
    get_matrix,
    matrix_gene_symbols,
    obs_column,
    split_by_donor,
)
from cellfm_sc.dataloaders._bags import (
    DonorDataModule,
    ExpressionRows,
    eval_keys,
    partition_bags,
)
from cellfm_sc.metrics._donor import aggregate_bag_logits, donor_metrics
from cellfm_sc.model._classifier import _categories
from cellfm_sc.model._donor_eval import (
    CrossValidationResult,
    DonorEvaluationResult,
    bootstrap_intervals,
    stratified_donor_folds,
)
from cellfm_sc.model._donor_module import CELL_VIEWS, CellFMDonorModule
from cellfm_sc.model.base import CellFMModel, Saved, TrainingRun
from cellfm_sc.nn import CellFMConfig, CellFMTrunk
from cellfm_sc.nn.ordinal import class_probabilities, predict_classes
from cellfm_sc.train import (
    DonorTrainingPlan,
)

logger = logging.getLogger(__name__)

__all__ = ["CellFMDonorClassifier", "DonorTrainingPlan"]

DONOR_FIELD = "donor"
#: cells per head call at inference (bags are never split across calls)
_HEAD_CELLS = 65_536


# --------------------------------------------------------------------------------------------
# training plan
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# inference result (internal)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# the model class
# --------------------------------------------------------------------------------------------


class CellFMDonorClassifier(CellFMModel):
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
        whose embedding carries no biology: on the donor benchmark (``benchmarks/RESULTS.md``)
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
        self.labels_key: str = args["labels_key"]
        self.classes_, self.ordinal_ = _categories(
            obs_column(adata, self.labels_key, keyword="labels_key"), args.get("label_order")
        )
        self.loss_ = _resolve_loss(loss, self.ordinal_)
        self.max_tokens = int(max_tokens)
        self.bag_size = int(bag_size)
        self.seed = int(seed)
        trunk = self._build_trunk(
            adata,
            checkpoint=checkpoint,
            vocabulary_file=vocabulary_file,
            num_heads=num_heads,
            preset=preset,
            embedding_init=embedding_init,
            dropout=dropout,
            seed=seed,
            hgnc_table=hgnc_table,
        )
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
        setup_method_args = cls._get_setup_method_args(**locals())
        labels = obs_column(adata, labels_key, keyword="labels_key")
        donors = obs_column(adata, donor_key, keyword="donor_key")
        check_count_source(layer, use_raw)
        get_matrix(adata, layer, use_raw=use_raw)
        if gene_symbols is not None:
            matrix_gene_symbols(adata, gene_symbols, use_raw=use_raw)  # names a missing column
        present = check_labels(labels, labels_key, label_order)
        check_donor_labels(donors, labels, labels_key=labels_key, donor_key=donor_key)
        check_counts(adata, layer, use_raw=use_raw)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=not use_raw),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalObsField(DONOR_FIELD, donor_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer.*")
            warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ----------------------------------------------------------------- donors and labels
    def _donors(self, adata: Any, donor_key: str | None = None) -> np.ndarray:
        key = donor_key or self.donor_key
        return obs_column(adata, key, keyword="donor_key").astype(str).to_numpy()

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
                _cls_forward,
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
        checkpoint_dir, keep_checkpoints, resume_from, logger, enable_progress_bar
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

    # the steps of the training template (CellFMModel._train)
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
        _, res = self._infer(
            adata,
            indices,
            donor_key,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            allow_untrained,
        )
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
        adata, res = self._infer(
            adata,
            None,
            donor_key,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            allow_untrained,
        )
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

    def evaluate(
        self,
        adata: Any | None = None,
        indices: Any = "test",
        n_bootstrap: int = 1000,
        confidence: float = 0.95,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
        baseline: bool = True,
    ) -> DonorEvaluationResult:
        """Donor-level scores of held-out donors with bootstrap intervals over donors, beside
        the pseudo-bulk baseline.

        Parameters
        ----------
        adata
            Default: the model's AnnData (other data: matched to the split by obs name).
        indices
            ``"test"`` (default), ``"validation"``, ``"train"`` or cells; the donors of
            these cells are scored from these cells.
        n_bootstrap, confidence
            Donor resamples and the level of the percentile intervals (0: no intervals).
        allow_untrained
            Score a model never trained (random predictions); otherwise that is an
            :class:`~cellfm_sc.model.UntrainedModelError`, raised before anything else.
        baseline
            Also fit pseudo-bulk logistic regression
            (:class:`~cellfm_sc.baselines.PseudobulkLogisticRegression`: per-donor summed
            counts -> CPM -> log1p, ``C`` chosen on the validation donors) on the model's
            training + validation donors and score it on the same donors
            (``result.baseline``, printed as "model vs baseline"). One chunked pass over the
            cells, also of backed files. ``False`` skips it.

        Returns
        -------
        DonorEvaluationResult
            ``donor_metrics``: ``qwk`` and ``ordinal_mae`` (ordinal labels), ``accuracy``,
            ``balanced_accuracy``, ``macro_f1``, ``n_donors``; ``intervals`` per metric;
            ``donor_table``; per-cell ``predictions`` (with ``attention``); the cells'
            ``embedding``. Donors whose label the model does not know are not scored
            (``notes`` says which).
        """
        self._require_trained(allow_untrained)  # "untrained" comes before any other complaint
        adata = self._adata_or_default(adata)
        adata, res = self._infer(
            adata,
            indices,
            None,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            allow_untrained,
        )
        truth = self._donor_label_codes(adata, res.idx).reindex(res.donors).to_numpy()
        scored = (truth >= 0) & (res.pred >= 0)
        notes = []
        if not scored.all():
            notes.append(
                f"{int((~scored).sum())} donor(s) not scored (label unknown to the model or "
                f"missing, or no cell with counts): {res.donors[~scored][:10].tolist()}"
            )
        if not scored.any():
            raise ValueError("no donor with a known label and cells with counts: nothing to score")
        k = len(self.classes_)
        t, p = truth[scored], res.pred[scored]
        metrics = donor_metrics(t, p, k, self.ordinal_)
        intervals = bootstrap_intervals(t, p, k, self.ordinal_, n_bootstrap, confidence, self.seed)
        table = self._donor_frame(res)[scored]
        table.insert(0, "true", self._categorical(t))
        table = table[["true", "predicted", "n_cells", *[f"p_{c}" for c in self.classes_]]]
        # cells: each cell carries its donor's prediction
        where = pd.Index(res.donors).get_indexer(res.cell_donor)
        cell_ok = scored[where] & ~np.isnan(res.attention)
        cw = where[cell_ok]
        cells = pd.DataFrame(
            index=pd.Index(np.asarray(adata.obs_names)[res.idx[cell_ok]], name="obs_name")
        )
        cells["donor"] = res.cell_donor[cell_ok]
        cells["true"] = self._categorical(truth[cw])
        cells["predicted"] = self._categorical(res.pred[cw])
        cells["confidence"] = res.probs[cw].max(axis=1)
        cells["attention"] = res.attention[cell_ok]
        for j, c in enumerate(self.classes_):
            cells[f"p_{c}"] = res.probs[cw, j]
        cell_m = donor_metrics(truth[cw], res.pred[cw], k, self.ordinal_)
        cell_m["n_cells"] = cell_m.pop("n_donors")
        from cellfm_sc.metrics import confusion_matrix

        result = DonorEvaluationResult(
            cell_metrics=cell_m,
            donor_metrics=metrics,
            donor_table=table,
            confusion=confusion_matrix(truth[cw], res.pred[cw], n_classes=k),
            classes=list(self.classes_),
            ordinal=bool(self.ordinal_),
            predictions=cells,
            donor_method="mean_bag_logits",
            notes=notes,
            evaluated_on=indices if isinstance(indices, str) else "cells",
            embedding=res.emb[cell_ok],
            intervals=intervals,
            confidence_level=float(confidence),
            n_bootstrap=int(n_bootstrap),
        )
        if baseline:
            from cellfm_sc.model._baseline import split_baseline

            donors = self._donors(adata)
            label_of = self._donor_label_codes(adata, np.arange(adata.n_obs))
            codes = label_of.reindex(donors).fillna(-1).to_numpy().astype(np.int64)
            result.baseline = split_baseline(
                self, adata, res.idx[cell_ok], codes, donors, cells=False
            )
        return result

    def cross_validate(
        self,
        k: int = 5,
        n_bootstrap: int = 1000,
        confidence: float = 0.95,
        batch_size: int = 64,
        **train_kwargs: Any,
    ) -> CrossValidationResult:
        """Donor-level ``k``-fold cross-validation, folds stratified by label.

        Fold ``i``'s donors are the test donors of round ``i``; fold ``i + 1``'s donors
        validate (model selection), the others train. Every round starts from the model's
        current weights, and the model gets them back at the end (it is left as it was).

        Parameters
        ----------
        k
            Folds (>= 3: one tests, one validates, the rest train).
        n_bootstrap, confidence
            Bootstrap intervals of the pooled metrics.
        batch_size
            Inference batch size.
        **train_kwargs
            Passed to :meth:`train` (``max_epochs``, ``lr``, ...; not ``split``).

        Returns
        -------
        CrossValidationResult
            ``per_fold`` metrics, ``pooled`` metrics of all out-of-fold predictions with
            ``intervals``, and the out-of-fold ``donor_table``.
        """
        if "split" in train_kwargs:
            raise ValueError("cross_validate makes its own splits; do not pass split=")
        if not isinstance(k, int | np.integer) or k < 3:
            raise ValueError(f"k must be an integer >= 3 (test, validation, train), got {k!r}")
        adata = self.adata
        if adata is None or self.adata_manager is None:
            raise ValueError("cross_validate needs the model's set-up AnnData")
        all_idx = np.arange(adata.n_obs)
        per_donor = self._donor_label_codes(adata, all_idx)
        folds = stratified_donor_folds(per_donor.to_numpy(), int(k), self.seed)
        fold_of = pd.Series(folds, index=per_donor.index)
        cell_fold = fold_of.reindex(self._donors(adata)).to_numpy()
        saved = self._snapshot()
        rows, tables = [], []
        try:
            for i in range(int(k)):
                split = DataSplit(
                    train=np.flatnonzero((cell_fold != i) & (cell_fold != (i + 1) % k)),
                    validation=np.flatnonzero(cell_fold == (i + 1) % k),
                    test=np.flatnonzero(cell_fold == i),
                    donor_key=self.donor_key,
                )
                self._restore(saved, weights_only=True)
                self.train(split=split, **train_kwargs)
                res = self.evaluate(
                    indices="test", n_bootstrap=0, batch_size=batch_size, baseline=False
                )
                row = {
                    "fold": i,
                    "n_train": int((folds != i).sum() - (folds == (i + 1) % k).sum()),
                    "n_validation": int((folds == (i + 1) % k).sum()),
                    "n_test": int((folds == i).sum()),
                    "best_epoch": self.best_epoch_,
                    **{m: v for m, v in res.donor_metrics.items() if m != "n_donors"},
                }
                rows.append(row)
                table = res.donor_table.copy()
                table.insert(0, "fold", i)
                tables.append(table)
        finally:
            self._restore(saved, weights_only=False)
        donor_table = pd.concat(tables).sort_index()
        t = donor_table["true"].cat.codes.to_numpy()
        p = donor_table["predicted"].cat.codes.to_numpy()
        n_classes = len(self.classes_)
        return CrossValidationResult(
            per_fold=pd.DataFrame(rows),
            pooled=donor_metrics(t, p, n_classes, self.ordinal_),
            intervals=bootstrap_intervals(
                t, p, n_classes, self.ordinal_, n_bootstrap, confidence, self.seed
            ),
            donor_table=donor_table,
            confidence_level=float(confidence),
        )

    def _snapshot(self) -> dict[str, Any]:
        return {
            "state": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
            "attrs": {
                name: copy.deepcopy(getattr(self, name, None))
                for name in (
                    "history_",
                    "step_history_",
                    "best_epoch_",
                    "best_score_",
                    "train_settings_",
                    "split_",
                    "split_names_",
                    "is_trained_",
                )
            },
            "indices": {
                name: getattr(self, name, None)
                for name in ("train_indices_", "validation_indices_", "test_indices_")
            },
        }

    def _restore(self, saved: dict[str, Any], weights_only: bool) -> None:
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                value.copy_(saved["state"][key])
        if weights_only:
            return
        for name, value in {**saved["attrs"], **saved["indices"]}.items():
            setattr(self, name, value)

    # ----------------------------------------------------------------- reporting
    def report_info(self) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report` (``info=``)."""
        cfg = self.module.trunk.config
        info: dict[str, Any] = {
            "level": "donor",
            "n_genes": int(self.vocab.n_genes),
            "gene_embedding": self.embedding_init_,
            "num_classes": len(self.classes_),
            "labels_key": self.labels_key,
            "donor_key": self.donor_key,
            "trainable": self.trainable_,
            "n_trainable_parameters": int(self.trainable_summary.n_trainable),
            "n_parameters": int(self.trainable_summary.n_total),
            "config": cfg.to_dict(),
            "preset": self.preset_,
            "max_tokens": self.max_tokens,
            "bag_size": self.bag_size,
            "pooling": self.pooling_,
            "loss": self.loss_,
            "cell_view": self.cell_view_,
            "expression_genes": self.expression_genes_,
            "seed": self.seed,
            "checkpoint": self.pretrained_report_,
        }
        settings = self.train_settings_
        if settings:
            info.update(
                epochs=settings["epochs_run"],
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                train_settings=settings,
            )
        info["best_epoch"] = self.best_epoch_
        if self.split_names_ is not None:
            info["split_sizes"] = {s: len(v) for s, v in self.split_names_.items()}
        return info

    @property
    def summary(self) -> str:
        cfg = self.module.trunk.config
        rep = self.pretrained_report_
        lines = [f"CellFMDonorClassifier ({'trained' if self.is_trained_ else 'not trained'})"]
        if rep is not None:
            lines.append(f"  pretrained: variant {rep.get('variant')}, {rep.get('source')}")
        else:
            lines.append(
                f"  no pretrained weights: random trunk (preset {self.preset_ or 'custom'})"
            )
        lines.append(
            f"  trunk: enc_dims={cfg.enc_dims}, num_heads={cfg.num_heads}, n_layers={cfg.n_layers}"
        )
        kind = "ordinal" if self.ordinal_ else "categorical"
        lines.append(
            f"  labels: {self.labels_key!r} ({len(self.classes_)} {kind} classes), donors: "
            f"{self.donor_key!r}"
        )
        view = {
            "both": f"trunk embedding + expression view of {self.expression_genes_} genes",
            "trunk": "trunk embedding",
            "expression": f"expression view of {self.expression_genes_} genes (no trunk)",
        }[self.cell_view_]
        lines.append(
            f"  bags of <= {self.bag_size} cells ({view}), {self.pooling_} pooling, "
            f"loss {self.loss_}"
        )
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary

    # ----------------------------------------------------------------- save / load parts
    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        self.labels_key = self._read_setup_args()["labels_key"]
        self._cache = None

    def _make_module(self, trunk: CellFMTrunk) -> CellFMDonorModule:
        return CellFMDonorModule(
            trunk,
            len(self.classes_),
            self.loss_,
            pooling=self.pooling_,
            attention_hidden=self.attention_hidden_,
            head_hidden=self.head_hidden_,
            dropout=self.dropout_,
            view=self.cell_view_,
            expression_genes=self.expression_genes_,
            expression_dim=self.expression_dim_,
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _cls_forward(module: CellFMDonorModule, batch: Any) -> dict[str, torch.Tensor]:
    return {"emb": module.trunk(batch.values, batch.gene_ids, batch.valid, return_hidden=False).cls}


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
