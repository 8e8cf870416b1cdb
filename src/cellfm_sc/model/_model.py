"""``CellFMClassifier``: the scvi-tools model class (user API, AnnData registry)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass

from cellfm_sc.data import (
    DataSplit,
    batches,
    check_counts,
    check_donors_disjoint,
    empty_cells,
    get_matrix,
    split_by_donor,
    split_stratified,
)
from cellfm_sc.model._module import CellFMClassifierModule
from cellfm_sc.nn import TRAINABLE_POLICIES, CellFMConfig, CellFMTrunk, apply_trainable
from cellfm_sc.nn.trainable import merge_lora
from cellfm_sc.pretrained import EMBEDDING_INITS, PretrainedReport, load_pretrained_trunk
from cellfm_sc.vocab import GeneVocab, build_gene_embedding

logger = logging.getLogger(__name__)

__all__ = ["CellFMClassifier"]

DONOR_KEY = "donor"
MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------- helpers
def _obs_column(adata: Any, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        cols = list(map(str, adata.obs.columns))
        shown = ", ".join(repr(c) for c in cols[:20]) + (" ..." if len(cols) > 20 else "")
        raise KeyError(
            f"{what}={key!r} is not a column of adata.obs; columns are: {shown or '(none)'}"
        )
    return adata.obs[key]


def _plain(obj: Any) -> Any:
    """Convert numpy/pandas values to plain Python for ``torch.load(weights_only=True)``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _plain(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (pd.Index, pd.Series)):
        return _plain(np.asarray(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, CellFMConfig):
        return obj.to_dict()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _unplain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype"}:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unplain(v) for v in obj]
    return obj


def _default_precision(accelerator: str) -> str:
    if accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _class_weights(codes: np.ndarray, n_classes: int, spec: Any) -> torch.Tensor | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a sequence, got {spec!r}")
        counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
        weights = np.where(counts > 0, len(codes) / (n_classes * np.maximum(counts, 1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32)
    weights = np.asarray(spec, dtype=np.float32)
    if weights.shape != (n_classes,):
        raise ValueError(
            f"class_weights has shape {weights.shape}; expected ({n_classes},) (one per class)"
        )
    return torch.from_numpy(weights)


# --------------------------------------------------------------------------- the model
class CellFMClassifier(BaseModelClass):
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
        ``"random"`` (default: re-initialise the table) or ``"transfer"`` (pretrained rows
        for genes CellFM knows).
    trainable
        ``"encoder+head"`` (default), ``"head"``, ``"encoder+head+embedding"``, ``"all"`` or
        ``"lora"``.
    max_tokens
        Most gene tokens per cell (2048 as pretrained); larger cells are sub-sampled.
    head_hidden
        Hidden width of the classification head.
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
    >>> model.train(max_epochs=3, lr=1e-3)  # doctest: +SKIP
    >>> model.annotate()  # obs["cellfm_prediction"], obsm["X_cellfm"]  # doctest: +SKIP
    """

    _module_cls = CellFMClassifierModule

    def __init__(
        self,
        adata: Any,
        checkpoint: str | os.PathLike[str] | None = None,
        vocabulary_file: str | os.PathLike[str] | None = None,
        num_heads: int | None = None,
        preset: str | CellFMConfig | None = None,
        embedding_init: str = "random",
        trainable: str = "encoder+head",
        max_tokens: int = 2048,
        head_hidden: int = 128,
        dropout: float = 0.1,
        seed: int = 0,
        hgnc_table: str | os.PathLike[str] | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
    ) -> None:
        if embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"unknown embedding_init {embedding_init!r}; choose one of {EMBEDDING_INITS}"
            )
        if trainable not in TRAINABLE_POLICIES:
            raise ValueError(f"unknown trainable {trainable!r}; choose one of {TRAINABLE_POLICIES}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        super().__init__(adata)
        #: rank of this process in the last (distributed) training; 0 outside DDP
        self.global_rank_ = 0
        self._set_label_info(adata)
        var_names = [str(v) for v in adata.var_names]
        symbols = self._gene_symbols(adata)
        torch.manual_seed(seed)
        report: PretrainedReport | None = None
        if checkpoint is not None:
            trunk, report = load_pretrained_trunk(
                checkpoint,
                symbols if symbols is not None else var_names,
                vocabulary_file=vocabulary_file,
                embedding_init=embedding_init,
                num_heads=num_heads,
                hgnc_table=hgnc_table,
                seed=seed,
                ensembl_ids=var_names if symbols is not None else None,
            )
            if preset is not None:
                self._check_preset(trunk.config, preset)
            trunk.set_dropout(dropout)
            preset_name = None
        else:
            if embedding_init == "transfer":
                raise ValueError("embedding_init='transfer' needs a checkpoint= to transfer from")
            config = self._resolve_preset(preset, num_heads, dropout)
            preset_name = preset if isinstance(preset, str) else (None if preset else "80M")
            warnings.warn(
                f"no checkpoint given: the CellFM trunk ({config.enc_dims} dims, "
                f"{config.n_layers} layers) is randomly initialised; no pretrained weights are "
                "used",
                UserWarning,
                stacklevel=2,
            )
            trunk = CellFMTrunk(config, n_genes=len(var_names))
            table = build_gene_embedding(
                GeneVocab.from_var_names(var_names), init="random", seed=seed, dim=config.enc_dims
            )
            with torch.no_grad():
                trunk.gene_emb.copy_(table)
        self.vocab = GeneVocab.from_var_names(var_names)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.pretrained_report_ = report.to_dict() if report is not None else None
        self._pretrained_report = report
        self.trainable_ = trainable
        self.embedding_init_ = embedding_init
        self.preset_ = preset_name
        module = CellFMClassifierModule(trunk, len(self.classes_), head_hidden, dropout)
        self._attach(module, trainable, lora_rank=lora_rank, lora_alpha=lora_alpha)
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------- construction parts
    @staticmethod
    def _resolve_preset(
        preset: str | CellFMConfig | None, num_heads: int | None, dropout: float
    ) -> CellFMConfig:
        if isinstance(preset, CellFMConfig):
            config = preset
        else:
            config = CellFMConfig.from_preset(preset or "80M")
        overrides: dict[str, Any] = {"dropout": dropout}
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        return CellFMConfig(**{**config.to_dict(), **overrides})

    @staticmethod
    def _check_preset(config: CellFMConfig, preset: str | CellFMConfig) -> None:
        want = preset if isinstance(preset, CellFMConfig) else CellFMConfig.from_preset(preset)
        for f in ("enc_dims", "n_layers", "num_heads"):
            if getattr(want, f) != getattr(config, f):
                raise ValueError(
                    f"checkpoint contradicts preset {preset!r}: {f} is {getattr(config, f)} in "
                    f"the checkpoint but {getattr(want, f)} in the preset"
                )

    def _attach(self, module: CellFMClassifierModule, trainable: str, **lora: Any) -> None:
        self.module = module
        self.trainable_summary = apply_trainable(
            module, trainable, rank=lora["lora_rank"], alpha=lora["lora_alpha"]
        )
        self.module.eval()
        self.history_ = None
        self.step_history_ = None
        self.split_: DataSplit | None = None

    def _setup_args(self) -> dict[str, Any]:
        return (
            dict(self.adata_manager.registry["setup_args"])
            if self.adata_manager
            else dict(self.registry_["setup_args"])
        )

    def _set_label_info(self, adata: Any) -> None:
        args = self._setup_args()
        self.labels_key = args["labels_key"]
        self.donor_key = args.get("donor_key")
        self.layer = args.get("layer")
        self.gene_symbols_key = args.get("gene_symbols")
        classes, ordinal = self._categories(adata.obs[self.labels_key], args.get("label_order"))
        self.classes_ = classes
        self.ordinal_ = ordinal

    def _gene_symbols(self, adata: Any) -> list[str] | None:
        if self.gene_symbols_key is None:
            return None
        return [str(s) for s in adata.var[self.gene_symbols_key]]

    @staticmethod
    def _categories(labels: pd.Series, label_order: Sequence[str] | None) -> tuple[list[str], bool]:
        if label_order is not None:
            return [str(c) for c in label_order], True
        if isinstance(labels.dtype, pd.CategoricalDtype):
            observed = set(labels.dropna().astype(str))
            classes = [str(c) for c in labels.cat.categories if str(c) in observed]
            return classes, bool(labels.cat.ordered)
        return sorted(set(labels.dropna().astype(str))), False

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
            metrics are reported.
        layer
            Layer with the raw counts (default ``.X``).
        gene_symbols
            ``var`` column with gene symbols when ``var_names`` are Ensembl ids (used for
            the ``"transfer"`` mapping).
        label_order
            Class order (ordinal stages), e.g. ``["Not AD", "Low", "Intermediate", "High"]``.

        Examples
        --------
        >>> CellFMClassifier.setup_anndata(adata, labels_key="ADNC", donor_key="Donor ID",
        ...     label_order=["Not AD", "Low", "Intermediate", "High"])  # doctest: +SKIP
        """
        if label_order is not None:
            label_order = [str(c) for c in label_order]
        setup_method_args = cls._get_setup_method_args(**locals())
        labels = _obs_column(adata, labels_key, "labels_key")
        n_nan = int(labels.isna().sum())
        if n_nan:
            raise ValueError(
                f"labels column {labels_key!r} has {n_nan} missing value(s) (NaN) of "
                f"{adata.n_obs} cells; drop or label those cells first"
            )
        if donor_key is not None:
            donors = _obs_column(adata, donor_key, "donor_key")
            n_nan = int(donors.isna().sum())
            if n_nan:
                raise ValueError(f"donor column {donor_key!r} has {n_nan} missing value(s)")
        if gene_symbols is not None and gene_symbols not in adata.var.columns:
            raise KeyError(
                f"gene_symbols={gene_symbols!r} is not a column of adata.var; columns are: "
                f"{list(map(str, adata.var.columns))}"
            )
        get_matrix(adata, layer)  # names a missing layer and lists the existing ones
        present = sorted(set(labels.astype(str)))
        if label_order is not None:
            if len(set(label_order)) != len(label_order):
                raise ValueError(f"label_order has repeated entries: {label_order}")
            unknown = sorted(set(present) - set(label_order))
            if unknown:
                raise ValueError(
                    f"labels {unknown[:10]} of column {labels_key!r} are not in label_order "
                    f"{label_order}"
                )
        if len(present) < 2:
            raise ValueError(
                f"labels column {labels_key!r} has a single class ({present}); a classifier "
                "needs at least two"
            )
        check_counts(adata, layer)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if donor_key is not None:
            fields.append(CategoricalObsField(DONOR_KEY, donor_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer.*")
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ----------------------------------------------------------------- data access
    def _adata_or_default(self, adata: Any | None) -> Any:
        if adata is None:
            if self.adata is None:
                raise ValueError("this model holds no AnnData: pass adata=")
            return self.adata
        return adata

    def _gene_id_map(self, adata: Any) -> np.ndarray | None:
        """``None`` when ``adata.var_names`` are the vocabulary; a map for a permutation."""
        names = [str(v) for v in adata.var_names]
        if names == list(self.vocab.names):
            return None
        theirs, ours = set(names), set(self.vocab.names)
        if theirs != ours:
            missing = sorted(ours - theirs)
            extra = sorted(theirs - ours)
            raise ValueError(
                f"adata.var_names differ from the model's {self.vocab.n_genes} genes: "
                f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} unknown "
                f"(e.g. {extra[:5]}); subset or reorder the AnnData to the model's genes"
            )
        return self.vocab.ids(names)

    def _label_codes(self, adata: Any) -> np.ndarray:
        labels = _obs_column(adata, self.labels_key, "labels_key").astype(str)
        codes = pd.Categorical(labels, categories=self.classes_).codes.astype(np.int64)
        if (codes < 0).any():
            bad = sorted(set(labels[codes < 0]))[:10]
            raise ValueError(f"labels {bad} are not among the model's classes {self.classes_}")
        return codes

    def _indices(self, adata: Any, indices: Any) -> np.ndarray:
        if indices is None:
            return np.arange(adata.n_obs, dtype=np.int64)
        if isinstance(indices, str):
            table = {
                "train": self.train_indices_,
                "validation": self.validation_indices_,
                "test": self.test_indices_,
            }
            if indices not in table:
                raise ValueError(
                    f"indices must be 'train', 'validation', 'test' or an array, got {indices!r}"
                )
            if table[indices] is None or len(table[indices]) == 0:
                raise ValueError(f"the model has no {indices} cells (train with that split first)")
            return np.asarray(table[indices], dtype=np.int64)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= adata.n_obs):
            raise IndexError(
                f"indices must lie in [0, {adata.n_obs}), got {idx.min()}..{idx.max()}"
            )
        return idx

    @property
    def split(self) -> DataSplit | None:
        return self.split_

    @property
    def step_history(self) -> pd.DataFrame | None:
        """One row per validation run: epoch (0-based), step, train_loss and train_acc (the
        epoch so far), validation_loss, validation_acc, n_validation."""
        return self.step_history_

    # ----------------------------------------------------------------- training
    def _make_split(
        self,
        adata: Any,
        split: DataSplit | None,
        validation_size: float,
        test_size: float,
    ) -> DataSplit:
        if split is None:
            if self.donor_key is not None:
                split = split_by_donor(
                    adata, self.donor_key, self.labels_key, test_size, validation_size, self.seed
                )
            else:
                split = split_stratified(
                    adata, self.labels_key, test_size, validation_size, self.seed
                )
        elif self.donor_key is not None:
            check_donors_disjoint(split, adata.obs[self.donor_key].to_numpy())
        if len(split.train) == 0:
            raise ValueError("the training split is empty")
        return split

    def train(
        self,
        max_epochs: int = 5,
        batch_size: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        validation_size: float = 0.1,
        test_size: float = 0.0,
        split: DataSplit | None = None,
        early_stopping: bool = True,
        patience: int = 3,
        check_val_every_n_steps: int | None = None,
        class_weights: Any = None,
        lr_schedule: str = "step",
        precision: str | int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        gradient_clip_val: float | None = 1.0,
        masked_value_weight: float = 0.0,
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        enable_progress_bar: bool = True,
        monitor: str = "validation_acc",
        gradient_checkpointing: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Fine-tune: AdamW on the trainable parameters, best validation weights kept.

        Parameters
        ----------
        max_epochs
            Epochs (total, also when resuming).
        batch_size
            Cells per batch (per device).
        lr, weight_decay
            AdamW settings.
        validation_size, test_size
            Fractions of donors (with ``donor_key``) or cells (stratified by label) held out
            for validation (model selection, early stopping) and test (:meth:`evaluate`).
        split
            Explicit :class:`~cellfm_sc.data.DataSplit` (``split_from_obs``,
            ``split_from_json``, ``split_by_donor``); overrides the sizes.
        early_stopping, patience
            Stop after ``patience`` validation runs without improvement of ``monitor``.
        check_val_every_n_steps
            Validate every N training steps instead of every epoch.
        class_weights
            ``None``, ``"balanced"`` or one weight per class.
        lr_schedule
            ``"step"`` (x0.95 per epoch, as the original scripts), ``"cosine"`` or
            ``"constant"``.
        precision
            Lightning precision; default ``"bf16-mixed"`` on a GPU that supports it, 32 else.
        accelerator, devices, strategy
            Lightning settings; ``devices=N, strategy="ddp"`` trains on N processes (run it
            as a script; see the multi-GPU docs).
        gradient_clip_val
            Gradient-norm clipping.
        masked_value_weight
            Weight of an auxiliary masked-value loss (CellFM's pretraining objective, value
            decoder part): 15% of each training cell's token values are hidden (replaced by
            ``mask_emb``) and predicted by the value decoder (MSE on normalised values), added
            to the cross-entropy with this weight. The value decoder then trains too. 0
            (default) turns it off; variant A' checkpoints have no decoder.
        num_workers
            DataLoader worker processes.
        checkpoint_dir
            Where ``checkpoint_epoch_{n}.pth`` (resumable) is written after every epoch.
        resume_from
            A ``checkpoint_epoch_{n}.pth`` to continue from (model, optimizer, scheduler,
            epoch, history, RNG state).
        enable_progress_bar
            Show Lightning's progress bar.
        monitor
            ``"validation_acc"`` (default) or ``"validation_loss"``.
        gradient_checkpointing
            Recompute layer activations in the backward pass: much less GPU memory for deep
            trunks (800M preset) for about one extra forward pass of time.
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        Afterwards ``model.history`` has one row per epoch (``epoch``, ``train_loss``,
        ``train_acc``, ``validation_loss``, ``validation_acc``, ``lr``; cell-weighted, over all
        cells), ``model.step_history`` one row per validation run, and
        ``model.train_indices`` / ``validation_indices`` / ``test_indices`` the split.
        """
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import EarlyStopping

        from cellfm_sc.model._trainingplan import (
            LR_SCHEDULES,
            BestStateCallback,
            CellFMDataModule,
            CellFMTrainingPlan,
            EpochCheckpoint,
        )

        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if monitor not in ("validation_acc", "validation_loss"):
            raise ValueError(
                f"monitor must be 'validation_acc' or 'validation_loss', got {monitor!r}"
            )
        if masked_value_weight < 0:
            raise ValueError(f"masked_value_weight must be >= 0, got {masked_value_weight}")
        if masked_value_weight > 0 and not hasattr(self.module.trunk, "value_dec"):
            raise ValueError(
                "masked_value_weight > 0 needs the value decoder, which this trunk lacks "
                "(annotation-Backbone checkpoint, variant A'); use masked_value_weight=0"
            )
        if max_epochs < 1 or batch_size < 1:
            raise ValueError(
                f"max_epochs and batch_size must be >= 1, got {max_epochs}, {batch_size}"
            )
        if resume_from is not None and not Path(resume_from).is_file():
            raise FileNotFoundError(f"resume_from={os.fspath(resume_from)!r} does not exist")
        adata = self.adata
        gene_id_map = self._gene_id_map(adata)
        codes = self._label_codes(adata)
        split = self._make_split(adata, split, validation_size, test_size)
        used = np.concatenate([split.train, split.validation, split.test])
        empty = empty_cells(adata, self.layer, used)
        if len(empty):
            names = [str(adata.obs_names[i]) for i in empty[:5]]
            raise ValueError(
                f"{len(empty)} cell(s) have no counts (e.g. {names}); remove them before "
                "training (a cell without expressed genes has no embedding)"
            )
        weights = _class_weights(codes[split.train], len(self.classes_), class_weights)
        if weights is not None:
            self.module.class_weights = weights
        has_val = len(split.validation) > 0
        if precision is None:
            precision = _default_precision(accelerator)
        if masked_value_weight > 0:  # the auxiliary objective trains its decoder too
            for p in self.module.trunk.value_dec.parameters():
                p.requires_grad_(True)
        plan = CellFMTrainingPlan(
            self.module,
            masked_value_weight=masked_value_weight,
            lr=lr,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            max_epochs=max_epochs,
        )
        datamodule = CellFMDataModule(
            adata,
            split.train,
            split.validation,
            codes,
            batch_size=batch_size,
            layer=self.layer,
            max_tokens=self.max_tokens,
            seed=self.seed,
            num_workers=num_workers,
            gene_id_map=gene_id_map,
        )
        mode = "max" if monitor == "validation_acc" else "min"
        best = BestStateCallback(monitor=monitor, mode=mode)
        callbacks: list[Any] = [best]
        if early_stopping and has_val:
            callbacks.append(
                EarlyStopping(
                    monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False
                )
            )
        if checkpoint_dir is not None:
            callbacks.append(EpochCheckpoint(checkpoint_dir))
        val_kwargs: dict[str, Any] = {}
        if not has_val:
            val_kwargs["limit_val_batches"] = 0
        elif check_val_every_n_steps is not None:
            val_kwargs.update(
                val_check_interval=int(check_val_every_n_steps), check_val_every_n_epoch=None
            )
        self.module.trunk.gradient_checkpointing = gradient_checkpointing
        self.module.train()  # Lightning keeps the module's mode; frozen parts still use dropout
        with tempfile.TemporaryDirectory(prefix="cellfm_sc_") as root:
            trainer = pl.Trainer(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                strategy=strategy or "auto",
                precision=precision,
                gradient_clip_val=gradient_clip_val,
                callbacks=callbacks,
                logger=False,
                enable_checkpointing=checkpoint_dir is not None,
                enable_progress_bar=enable_progress_bar,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                use_distributed_sampler=False,
                default_root_dir=root,
                **val_kwargs,
                **trainer_kwargs,
            )
            logger.info("%s", self.trainable_summary)
            trainer.fit(
                plan,
                datamodule=datamodule,
                ckpt_path=os.fspath(resume_from) if resume_from else None,
                weights_only=True,  # our checkpoints hold tensors and plain Python only
            )
        best.restore(self.module)
        self.module.eval()
        self.history_ = pd.DataFrame(plan.history)
        self.step_history_ = pd.DataFrame(plan.step_history)
        self.best_epoch_ = best.best_epoch
        self.best_score_ = best.best_score
        self.split_ = split
        self.train_indices_ = split.train
        self.validation_indices_ = split.validation
        self.test_indices_ = split.test
        self.train_settings_ = {
            "max_epochs": max_epochs,
            "epochs_run": len(plan.history),
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "lr_schedule": lr_schedule,
            "precision": str(precision),
            "class_weights": None if weights is None else weights.tolist(),
            "monitor": monitor,
            "gradient_checkpointing": gradient_checkpointing,
            "masked_value_weight": masked_value_weight,
            "best_epoch": best.best_epoch,
            "world_size": int(trainer.world_size),
        }
        self.global_rank_ = int(trainer.global_rank)
        self.is_trained_ = True

    # ----------------------------------------------------------------- inference
    def _device(self, device: str | torch.device | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.inference_mode()
    def _infer(
        self,
        adata: Any | None,
        indices: Any,
        batch_size: int,
        device: str | torch.device | None = None,
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """Probabilities ``(n, K)`` and embeddings ``(n, D)`` (NaN for cells without counts)."""
        adata = self._adata_or_default(adata)
        gene_id_map = self._gene_id_map(adata)
        idx = self._indices(adata, indices)
        if len(np.unique(idx)) != len(idx):
            raise ValueError("indices hold repeated cells")
        dev = self._device(device)
        module = self.module.to(dev).eval()
        k, d = len(self.classes_), module.trunk.config.enc_dims
        probs = np.full((len(idx), k), np.nan, dtype=np.float32)
        emb = np.full((len(idx), d), np.nan, dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        )
        for batch in batches(
            adata,
            batch_size=batch_size,
            layer=self.layer,
            max_tokens=self.max_tokens,
            train=False,
            shuffle=False,
            seed=self.seed,
            indices=idx,
            gene_id_map=gene_id_map,
        ):
            ok = batch.n_tokens > 0
            rows = order[np.searchsorted(sorted_idx, batch.obs_index.numpy())]
            if not bool(ok.all()):
                rows = rows[ok.numpy()]
                batch = type(batch)(
                    values=batch.values[ok],
                    gene_ids=batch.gene_ids[ok],
                    valid=batch.valid[ok],
                    n_tokens=batch.n_tokens[ok],
                    obs_index=batch.obs_index[ok],
                )
                if len(rows) == 0:
                    continue
            batch = batch.to(dev, non_blocking=True)
            with autocast:
                out = module(batch)
            probs[rows] = torch.softmax(out.logits.float(), dim=-1).cpu().numpy()
            emb[rows] = out.cls.float().cpu().numpy()
        n_empty = int(np.isnan(probs[:, 0]).sum())
        if n_empty:
            warnings.warn(
                f"{n_empty} cell(s) have no counts: their prediction, probabilities and "
                "embedding are NaN",
                UserWarning,
                stacklevel=3,
            )
        return adata, idx, probs, emb

    def predict(
        self,
        adata: Any | None = None,
        indices: Any = None,
        soft: bool = False,
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted labels ``(n,)``, or with ``soft=True`` a DataFrame of class probabilities.

        Columns of the DataFrame are the classes (category order), its index the obs names.
        Cells without counts get NaN probabilities and label ``None``.
        """
        adata, idx, probs, _ = self._infer(adata, indices, batch_size, device)
        if soft:
            return pd.DataFrame(probs, index=adata.obs_names[idx], columns=self.classes_)
        labels = np.asarray(self.classes_, dtype=object)[np.nan_to_num(probs).argmax(1)]
        labels[np.isnan(probs[:, 0])] = None
        return labels

    def get_latent_representation(
        self,
        adata: Any | None = None,
        indices: Any = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Cell embeddings (the cls token), float32 ``(n_cells, D)``."""
        return self._infer(adata, indices, batch_size, device)[3]

    def annotate(
        self,
        adata: Any | None = None,
        key_added: str = "cellfm",
        batch_size: int = 64,
        device: str | torch.device | None = None,
    ) -> None:
        """Write predictions and the embedding into the AnnData (all cells).

        Adds ``obs[f"{key_added}_prediction"]`` (categorical in class order),
        ``obs[f"{key_added}_confidence"]``, ``obsm[f"{key_added}_probabilities"]``
        ``(n, K)`` (columns in ``uns[key_added]["classes"]``) and ``obsm[f"X_{key_added}"]``
        ``(n, D)``. Works on ``backed="r"`` AnnData without loading ``X``.
        """
        adata, _, probs, emb = self._infer(adata, None, batch_size, device)
        empty = np.isnan(probs[:, 0])
        codes = np.where(empty, -1, np.nan_to_num(probs).argmax(1))
        adata.obs[f"{key_added}_prediction"] = pd.Categorical.from_codes(
            codes, categories=self.classes_
        )
        adata.obs[f"{key_added}_confidence"] = np.nanmax(
            np.where(empty[:, None], 0.0, probs), axis=1
        ).astype(np.float32)
        adata.obs.loc[empty, f"{key_added}_confidence"] = np.nan
        adata.obsm[f"{key_added}_probabilities"] = probs
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
                "variant": self._pretrained_report.variant if self._pretrained_report else None,
            },
        }

    def evaluate(
        self,
        adata: Any | None = None,
        indices: Any = "test",
        batch_size: int = 64,
        donor_method: str = "mean_probability",
        device: str | torch.device | None = None,
    ):
        """Cell- and donor-level metrics on held-out cells.

        Returns a :class:`~cellfm_sc.metrics.EvaluationResult` (accuracy, balanced accuracy,
        macro/weighted F1; QWK, ordinal MAE and Spearman for ordinal labels; per-donor table
        when a ``donor_key`` was registered). ``indices``: ``"test"`` (default),
        ``"validation"``, ``"train"`` or an array.
        """
        from cellfm_sc.metrics import evaluate_predictions

        adata = self._adata_or_default(adata)
        if (
            isinstance(indices, str)
            and indices == "test"
            and (self.test_indices_ is None or len(self.test_indices_) == 0)
        ):
            logger.info("no test cells: evaluating on the validation cells")
            indices = "validation"
        adata, idx, probs, _ = self._infer(adata, indices, batch_size, device)
        codes = self._label_codes(adata)[idx]
        donors = adata.obs[self.donor_key].to_numpy()[idx] if self.donor_key else None
        return evaluate_predictions(
            probs,
            codes,
            list(self.classes_),
            obs_names=np.asarray(adata.obs_names[idx]),
            donors=donors,
            ordinal=bool(self.ordinal_),
            donor_method=donor_method,
        )

    # ----------------------------------------------------------------- reporting
    def report_info(self) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report_files` (``info=``)."""
        cfg = self.module.trunk.config
        info: dict[str, Any] = {
            "n_genes": int(self.vocab.n_genes),
            "gene_embedding": self.embedding_init_,
            "gene_embedding_shape": list(self.module.trunk.gene_emb.shape),
            "num_classes": len(self.classes_),
            "labels_key": self.labels_key,
            "donor_key": self.donor_key,
            "trainable": self.trainable_,
            "n_trainable_parameters": int(self.trainable_summary.n_trainable),
            "n_parameters": int(self.trainable_summary.n_total),
            "config": cfg.to_dict(),
            "preset": self.preset_,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "checkpoint": self.pretrained_report_,
            "checkpoint_variant": self.pretrained_report_["variant"]
            if self.pretrained_report_
            else None,
            "embedding_coverage": (self.pretrained_report_ or {}).get("coverage"),
        }
        settings = getattr(self, "train_settings_", None)
        if settings:
            info.update(
                epochs=settings["epochs_run"],
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                train_settings=settings,
            )
        if self.split_ is not None:
            info["split_sizes"] = {
                "train": len(self.split_.train),
                "validation": len(self.split_.validation),
                "test": len(self.split_.test),
            }
        return info

    @property
    def summary(self) -> str:
        cfg = self.module.trunk.config
        rep = self._pretrained_report
        lines = [f"CellFMClassifier ({'trained' if self.is_trained_ else 'not trained'})"]
        if rep is not None:
            lines.append(
                f"  pretrained: variant {rep.variant} ({rep.load.variant_description}), {rep.load.source}"
            )
        else:
            lines.append(
                f"  no pretrained weights: random trunk (preset {self.preset_ or 'custom'})"
            )
        lines.append(
            f"  trunk: enc_dims={cfg.enc_dims}, num_heads={cfg.num_heads}, n_layers={cfg.n_layers}"
        )
        emb = tuple(self.module.trunk.gene_emb.shape)
        line = f"  vocabulary: {self.vocab.n_genes:,} genes, gene_emb {emb}, init '{self.embedding_init_}'"
        if rep is not None and rep.mapping is not None:
            line += f", coverage {rep.mapping.n_mapped:,}/{self.vocab.n_genes:,} ({100 * rep.mapping.coverage:.1f}%)"
        lines.append(line)
        kind = "ordinal" if self.ordinal_ else "categorical"
        lines.append(f"  labels: {self.labels_key!r}, {len(self.classes_)} {kind} classes")
        if self.donor_key:
            lines.append(f"  donors: {self.donor_key!r}")
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary

    # ----------------------------------------------------------------- save / load
    def _state_for_saving(self) -> dict[str, torch.Tensor]:
        module = self.module
        if self.trainable_ == "lora":
            module = merge_lora(copy.deepcopy(module))
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save(
        self,
        dir_path: str | os.PathLike[str],
        overwrite: bool = False,
        save_anndata: bool = False,
        prefix: str | None = None,
        **anndata_write_kwargs: Any,
    ) -> None:
        """Save in the scvi-tools layout: ``model.pt`` (state dict, var_names, attributes),
        plus ``vocab.txt`` and ``config.json``; optionally ``adata.h5ad``.

        Everything is written to a temporary folder first and moved into place, so a failed
        save leaves no half-written model. After distributed training only the first process
        (rank 0) writes. Loading needs neither the original checkpoint nor
        MindSpore.
        """
        if self.global_rank_ != 0:
            logger.info("not saving on rank %d: the first process saves", self.global_rank_)
            return
        out = Path(dir_path)
        if out.exists() and not overwrite:
            raise ValueError(f"{out} already exists; pass overwrite=True or another directory")
        prefix = prefix or ""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            attr = {
                "init_params_": _plain(self.init_params_),
                "registry_": _plain(self.registry_),
                "classes_": list(self.classes_),
                "ordinal_": bool(self.ordinal_),
                "config": self.module.trunk.config.to_dict(),
                "n_genes": int(self.vocab.n_genes),
                "head_hidden": int(self.init_params_["non_kwargs"]["head_hidden"]),
                "dropout": float(self.init_params_["non_kwargs"]["dropout"]),
                "trainable_": self.trainable_,
                "embedding_init_": self.embedding_init_,
                "preset_": self.preset_,
                "max_tokens": self.max_tokens,
                "seed": self.seed,
                "pretrained_report_": _plain(self.pretrained_report_),
                "is_trained_": bool(self.is_trained_),
                "history_": None
                if self.history_ is None
                else _plain(self.history_.to_dict("list")),
                "train_indices_": _plain(self.train_indices_),
                "validation_indices_": _plain(self.validation_indices_),
                "test_indices_": _plain(self.test_indices_),
                "train_settings_": _plain(getattr(self, "train_settings_", None)),
            }
            torch.save(
                {
                    "model_state_dict": self._state_for_saving(),
                    "var_names": [str(v) for v in self.vocab.names],
                    "attr_dict": attr,
                },
                tmp / f"{prefix}{MODEL_FILE}",
            )
            self.vocab.save(tmp / f"{prefix}{VOCAB_FILE}")
            (tmp / f"{prefix}{CONFIG_FILE}").write_text(
                json.dumps(
                    {
                        k: attr[k]
                        for k in (
                            "config",
                            "classes_",
                            "ordinal_",
                            "trainable_",
                            "embedding_init_",
                            "max_tokens",
                            "seed",
                        )
                    }
                    | {
                        "n_genes": attr["n_genes"],
                        "setup_args": attr["registry_"].get("setup_args"),
                    },
                    indent=2,
                    default=str,
                )
            )
            if save_anndata:
                self.adata.write_h5ad(tmp / f"{prefix}adata.h5ad", **anndata_write_kwargs)
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike[str],
        adata: Any | None = None,
        prefix: str | None = None,
    ) -> CellFMClassifier:
        """Load a model saved with :meth:`save` (``torch.load(weights_only=True)``).

        ``adata``: data to attach (set up with the saved ``setup_anndata`` arguments when it
        was not set up); its var_names must be the model's genes (a permutation is
        reordered). Without it, ``adata.h5ad`` in the folder is used if present.
        """
        folder = Path(dir_path)
        prefix = prefix or ""
        path = folder / f"{prefix}{MODEL_FILE}"
        if not path.is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in {folder}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        attr = saved["attr_dict"]
        registry = _unplain(attr["registry_"])
        if adata is None and (folder / f"{prefix}adata.h5ad").is_file():
            import anndata

            adata = anndata.read_h5ad(folder / f"{prefix}adata.h5ad")
        setup_args = dict(registry["setup_args"])
        model = cls.__new__(cls)
        model.global_rank_ = 0
        if adata is not None:
            if model_not_set_up(cls, adata) and setup_args["labels_key"] in adata.obs.columns:
                cls.setup_anndata(adata, **setup_args)
            if setup_args["labels_key"] in adata.obs.columns:
                BaseModelClass.__init__(model, adata)
            else:  # prediction-only data without the labels column
                BaseModelClass.__init__(model, registry=registry)
                model._adata = adata
        else:
            BaseModelClass.__init__(model, registry=registry)
        model.labels_key = setup_args["labels_key"]
        model.donor_key = setup_args.get("donor_key")
        model.layer = setup_args.get("layer")
        model.gene_symbols_key = setup_args.get("gene_symbols")
        model.classes_ = list(attr["classes_"])
        model.ordinal_ = bool(attr["ordinal_"])
        model.vocab = GeneVocab.from_var_names(saved["var_names"])
        model.max_tokens = int(attr["max_tokens"])
        model.seed = int(attr["seed"])
        model.trainable_ = attr["trainable_"]
        model.embedding_init_ = attr["embedding_init_"]
        model.preset_ = attr["preset_"]
        model.pretrained_report_ = _unplain(attr["pretrained_report_"])
        model._pretrained_report = None
        config = CellFMConfig.from_dict(attr["config"])
        trunk = CellFMTrunk(config, n_genes=int(attr["n_genes"]))
        module = CellFMClassifierModule(
            trunk, len(model.classes_), attr["head_hidden"], attr["dropout"]
        )
        policy = "encoder+head" if model.trainable_ == "lora" else model.trainable_
        model._attach(module, policy, lora_rank=8, lora_alpha=16)
        module.load_state_dict(saved["model_state_dict"], strict=True)
        model.module.eval()
        model.init_params_ = _unplain(attr["init_params_"])
        model.is_trained_ = bool(attr["is_trained_"])
        hist = attr.get("history_")
        model.history_ = pd.DataFrame(hist) if hist is not None else None
        for key in ("train_indices_", "validation_indices_", "test_indices_"):
            val = _unplain(attr.get(key))
            setattr(model, key, None if val is None else np.asarray(val, dtype=np.int64))
        model.train_settings_ = _unplain(attr.get("train_settings_"))
        if adata is not None:
            model._gene_id_map(adata)  # raises now when the genes differ
        return model


def model_not_set_up(cls: type[CellFMClassifier], adata: Any) -> bool:
    """Whether ``adata`` has not been registered with ``cls.setup_anndata``.

    A copy of a registered AnnData carries the original's registration id but no manager of
    its own (scvi-tools raises ``ValueError``): it needs its own setup too.
    """
    try:
        return cls._get_most_recent_anndata_manager(adata, required=False) is None
    except ValueError:
        return True
