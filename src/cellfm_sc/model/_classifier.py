"""``CellFMClassifier``: classify cells with a fine-tuned CellFM (module + plan + user API)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField

from cellfm_sc._constants import MONITORS
from cellfm_sc.data import (
    DataSplit,
    TokenBatch,
    check_count_source,
    check_counts,
    check_donors_disjoint,
    check_labels,
    donor_labels,
    matrix_gene_symbols,
    obs_column,
    split_by_donor,
    split_stratified,
)
from cellfm_sc.model._module import CellFMClassifierModule
from cellfm_sc.model.base import CellFMModel, Saved, TrainingRun, saved_rows
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, FinetuneRecipe
from cellfm_sc.nn.trainable import resolve_recipe
from cellfm_sc.train import (
    ClassifierTrainingPlan,
)
from cellfm_sc.train._classifier import _class_weights

logger = logging.getLogger(__name__)

__all__ = ["CellFMClassifier", "ClassifierTrainingPlan"]

DONOR_KEY = "donor"
#: early_stopping="auto" turns early stopping on from this many validation cells ...
EARLY_STOPPING_MIN_CELLS = 1000
#: ... or, for donor labels, from this many validation donors
EARLY_STOPPING_MIN_DONORS = 10


# --------------------------------------------------------------------------------------------
# training plan: loss and metrics of the classifier
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the model class
# --------------------------------------------------------------------------------------------


class CellFMClassifier(CellFMModel):
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
        args = self._read_setup_args()
        self.labels_key: str = args["labels_key"]
        self.classes_, self.ordinal_ = _categories(
            obs_column(adata, self.labels_key, keyword="labels_key"), args.get("label_order")
        )
        self.max_tokens = int(max_tokens)
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
        setup_method_args = cls._get_setup_method_args(**locals())
        check_count_source(layer, use_raw)
        check_counts(adata, layer, use_raw=use_raw)  # also names an empty matrix or a bad layer
        labels = obs_column(adata, labels_key, keyword="labels_key")
        if donor_key is not None:
            obs_column(adata, donor_key, keyword="donor_key")
        if gene_symbols is not None:
            matrix_gene_symbols(adata, gene_symbols, use_raw=use_raw)  # names a missing column
        present = check_labels(labels, labels_key, label_order)
        fields = [
            # the registry's X field (raw counts are checked by cellfm-sc itself, also in raw)
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=not use_raw),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if donor_key is not None:
            fields.append(CategoricalObsField(DONOR_KEY, donor_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer.*")
            warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

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

    def _donors(self, adata: Any) -> np.ndarray | None:
        if self.donor_key is None:
            return None
        return obs_column(adata, self.donor_key, keyword="donor_key").astype(str).to_numpy()

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

    # ----------------------------------------------------------------- training
    def _make_split(
        self, adata: Any, split: DataSplit | None, validation_size: float, test_size: float
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
            check_donors_disjoint(split, self._donors(adata))
        if len(split.train) == 0:
            raise ValueError("the training split is empty")
        return split

    def _resolve_monitor(self, monitor: str, adata: Any) -> tuple[str, str]:
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
        if monitor == "auto":
            if self._donor_level_labels(adata):
                monitor = (
                    "validation_donor_qwk" if self.ordinal_ else "validation_donor_balanced_acc"
                )
            else:
                monitor = "validation_loss"
        if monitor.startswith("validation_donor") and self.donor_key is None:
            raise ValueError(f"monitor={monitor!r} needs donor_key= in setup_anndata")
        if monitor == "validation_donor_qwk" and not self.ordinal_:
            raise ValueError(
                "monitor='validation_donor_qwk' needs ordinal labels (label_order= in "
                "setup_anndata)"
            )
        return monitor, "min" if monitor == "validation_loss" else "max"

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
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 1,
        resume_from: str | os.PathLike[str] | None = None,
        logger: Any = None,
        enable_progress_bar: bool = True,
        gradient_checkpointing: bool = False,
        **trainer_kwargs: Any,
    ) -> None:
        """Fine-tune: AdamW on the trainable parameters, the best validation weights kept.

        Parameters
        ----------
        max_epochs
            Epochs (total, also when resuming). Default 20: with ~200 labelled cells
            (pbmc3k, 10% of the labels) 10 epochs left a random tiny trunk under-trained
            (held-out macro-F1 0.58 vs 0.71 with 20; ``benchmarks/learning_curves.py``);
            with early stopping on (large validation sets) training usually ends sooner.
        batch_size
            Cells per batch (per device).
        lr
            AdamW learning rate; ``"auto"`` (default) follows :func:`~cellfm_sc.model.auto_lr`:
            1e-3 for a random trunk, for a pretrained one 1e-4 at the released width (1536)
            and 1e-3 for narrower trunks.
        weight_decay
            AdamW weight decay.
        validation_size, test_size
            Fractions (or counts) of donors (with ``donor_key``) or cells (stratified by
            label) held out for validation (model selection) and test (:meth:`evaluate`).
        split
            Explicit :class:`~cellfm_sc.data.DataSplit` (``split_from_obs``,
            ``split_from_json``, ``split_by_donor``); overrides the sizes.
        recipe
            How the trunk is fine-tuned (which parameters train in which phase, at which
            rate; ``lr`` is the head's): ``"auto"`` (default; see
            :func:`~cellfm_sc.nn.resolve_recipe`), ``"full"`` (everything at
            ``lr`` from the first step), ``"lp-ft"`` (the head alone on frozen features for
            the first quarter of the steps, then everything, the trunk at 0.3 ``lr``),
            ``"llrd"`` (trunk at 0.3 ``lr``, x0.7 per layer towards the input),
            ``"lp-ft+llrd"``, ``"frozen-rows"`` (the gene-embedding rows transferred from
            the checkpoint frozen), or a :class:`~cellfm_sc.nn.FinetuneRecipe` of your
            own. The head and re-initialised gene rows always train at ``lr``. The
            pretraining page of the documentation shows what each scored on shifted data.
        early_stopping, patience
            Stop after ``patience`` validations without improvement of ``monitor``.
            ``"auto"`` (default): on when the validation set is large enough for its score
            to mean something (at least 1,000 cells, or 10 donors when labels belong to
            donors), off otherwise; the best validation weights are kept either way. On
            pbmc3k, patience 3 on 22 or 217 validation cells stopped runs after 3-6 of 20
            epochs and cost 0.12-0.19 held-out macro-F1.
        monitor
            What model selection (and early stopping) follow: ``"auto"`` (default) is the
            validation donors' QWK (ordinal) or balanced accuracy when labels belong to
            donors, else the validation loss. Also ``"validation_loss"``,
            ``"validation_acc"``, ``"validation_macro_f1"``, ``"validation_donor_qwk"``,
            ``"validation_donor_balanced_acc"``.
        check_val_every_n_steps
            Validate every N training steps instead of every epoch.
        class_weights
            ``None``, ``"balanced"`` (classes weigh the same), ``"balanced_donors"``
            (donors weigh the same) or one weight per class. They hold for this call only.
        lr_schedule
            ``"warmup_cosine"`` (default: linear warm-up over ``warmup_fraction`` of the
            steps, then cosine to 0, per step), ``"cosine"`` (per epoch), ``"step"`` (x0.95
            per epoch, as the original scripts) or ``"constant"``.
        warmup_fraction
            Share of the optimizer steps spent warming up (``"warmup_cosine"``).
        precision
            Lightning precision; default ``"bf16-mixed"`` on a GPU that supports it, 32 else.
        accelerator, devices, strategy
            Lightning settings; ``devices=N, strategy="ddp"`` trains on N processes (run it
            as a script; see the multi-GPU docs).
        gradient_clip_val
            Gradient-norm clipping.
        masked_value_weight
            Weight of an auxiliary masked-value loss (CellFM's pretraining objective, value
            decoder part) added to the cross-entropy; 0 (default) turns it off.
        num_workers
            DataLoader worker processes.
        checkpoint_dir
            Where ``checkpoint_epoch_{n}.pth`` (resumable) is written after every epoch,
            and the CSV log (``logs/metrics.csv``).
        keep_checkpoints
            Epoch checkpoints kept there: the newest ``keep_checkpoints`` (default 1, what
            ``resume_from`` needs) plus the best epoch's; -1 keeps every epoch's (each holds
            the model and the optimizer state: about 3x the model's size).
        resume_from
            A ``checkpoint_epoch_{n}.pth`` to continue from (model, optimizer, scheduler,
            epoch, history, RNG state).
        logger
            Lightning logger(s): ``None`` (default: CSV under ``checkpoint_dir`` when given),
            ``False``, ``"csv"``, ``"tensorboard"``, or logger objects.
        enable_progress_bar
            Show the progress bar (on stderr).
        gradient_checkpointing
            Recompute layer activations in the backward pass: much less GPU memory for deep
            trunks (800M preset) for about one extra forward pass of time.
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        Afterwards ``model.history`` has one row per epoch (``epoch``, ``train_loss``,
        ``train_acc``, the validation metrics, ``lr``; over all cells, each counted once),
        ``model.step_history`` one row per validation run, ``model.best_epoch`` the epoch
        whose weights the model holds, and ``model.train_indices`` /
        ``validation_indices`` / ``test_indices`` the split (kept by obs name).
        """
        self._train(locals())

    # the steps of the training template (CellFMModel._train)
    def _check_train(self, run: TrainingRun) -> None:
        run.data["recipe"] = resolve_recipe(run["recipe"], self.pretrained)
        if run["early_stopping"] not in (True, False, "auto"):
            raise ValueError(
                f"early_stopping must be True, False or 'auto', got {run['early_stopping']!r}"
            )
        if run["masked_value_weight"] > 0 and not hasattr(self.module.trunk, "value_dec"):
            raise ValueError(
                "masked_value_weight > 0 needs the value decoder, which this trunk lacks "
                "(annotation-Backbone checkpoint, variant A'); use masked_value_weight=0"
            )

    def _prepare_training(self, run: TrainingRun) -> None:
        adata = run.adata = self._training_adata()
        run.data["gene_id_map"] = self._gene_id_map(adata, strict=True)
        codes = run.data["labels"] = self._label_codes(adata)
        donors = run.data["donors"] = self._donors(adata)
        split = run.split = self._make_split(
            adata, run["split"], run["validation_size"], run["test_size"]
        )
        run.monitor, run.mode = self._resolve_monitor(run["monitor"], adata)
        self._check_cells(adata, np.concatenate([split.train, split.validation, split.test]))
        class_w, per_cell = _class_weights(
            run["class_weights"],
            codes[split.train],
            len(self.classes_),
            None if donors is None else donors[split.train],
        )
        sample_weight = None
        if per_cell is not None:
            sample_weight = np.zeros(adata.n_obs, dtype=np.float32)
            sample_weight[split.train] = per_cell
        run.data["sample_weight"] = sample_weight
        self.module.class_weights = class_w  # this call's weights only
        early_stopping = run["early_stopping"]
        if early_stopping == "auto":
            if self._donor_level_labels(adata):
                n_val_donors = len(np.unique(donors[split.validation]))
                early_stopping = n_val_donors >= EARLY_STOPPING_MIN_DONORS
            else:
                early_stopping = len(split.validation) >= EARLY_STOPPING_MIN_CELLS
        run.early_stopping = bool(early_stopping)
        if run.data["recipe"].head_phase > 0:  # under DDP the trunk is unused then
            run.find_unused_parameters = True

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> ClassifierTrainingPlan:
        objective_params: tuple[str, ...] = ()
        if run["masked_value_weight"] > 0:  # the auxiliary objective trains its decoder too
            objective_params = ("value_dec.", "value_enc.mask_emb")
        run.data["trained_before"] = {
            n for n, p in self.module.named_parameters() if p.requires_grad
        }
        for name, p in self.module.trunk.named_parameters():
            if name.startswith(objective_params):
                p.requires_grad_(True)
        plan = ClassifierTrainingPlan(
            self.module,
            classes=self.classes_,
            ordinal=self.ordinal_,
            labels=run.data["labels"],
            donors=run.data["donors"],
            sample_weight=run.data["sample_weight"],
            masked_value_weight=run["masked_value_weight"],
            recipe=run.data["recipe"],
            transferred_rows=self.transferred_rows_,
            **plan_kwargs,
        )
        self.module.trunk.gradient_checkpointing = run["gradient_checkpointing"]
        return plan

    def _train_settings(self, run: TrainingRun) -> dict[str, Any]:
        class_weights = run["class_weights"]
        return {
            "class_weights": class_weights
            if isinstance(class_weights, str | None)
            else list(class_weights),
            "monitor": run.monitor,
            "gradient_checkpointing": run["gradient_checkpointing"],
            "masked_value_weight": run["masked_value_weight"],
            "recipe": run.data["recipe"].to_dict(),
        }

    def _run_fit(self, run: TrainingRun, plan: Any, datamodule: Any, settings: dict) -> None:
        try:
            super()._run_fit(run, plan, datamodule, settings)
            plan.interpolate_weights()
        finally:
            self.module.class_weights = torch.ones(len(self.classes_))
            for name, p in self.module.named_parameters():
                p.requires_grad_(name in run.data["trained_before"])

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
        self._require_trained(allow_untrained)  # before any other complaint
        adata = self._adata_or_default(adata)
        idx = self._indices(adata, indices)
        out = self._forward_cells(
            adata,
            idx,
            batch_size,
            device,
            {"probs": (len(self.classes_),), "emb": (self.module.trunk.config.enc_dims,)},
            _probs_and_embedding,
            enable_progress_bar,
            min_gene_coverage,
            sinks=None if embedding_out is None else {"emb": embedding_out},
            allow_untrained=allow_untrained,
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
        adata, idx, probs, _ = self._infer(
            adata,
            indices,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            allow_untrained=allow_untrained,
        )
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
            adata,
            None,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            embedding_out,
            allow_untrained=allow_untrained,
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

    def evaluate(
        self,
        adata: Any | None = None,
        indices: Any = "test",
        batch_size: int = 64,
        donor_method: str = "mean_probability",
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
        baseline: bool = True,
    ):
        """Cell- and donor-level metrics on held-out cells, beside the baselines.

        Parameters
        ----------
        adata
            Default: the model's AnnData. Other data are matched to the saved split by obs
            name (an error when the split's cells are not all there).
        indices
            ``"test"`` (default), ``"validation"``, ``"train"``, or cells (positions, a
            boolean mask or obs names). With no test cells, ``"test"`` is an error: the
            validation cells chose the model, so their score is optimistic; pass
            ``indices="validation"`` knowingly.
        batch_size, device, enable_progress_bar
            Inference settings (a progress bar over the cells on stderr).
        donor_method
            How a donor's cells are aggregated (see :func:`~cellfm_sc.metrics.aggregate_by_donor`).
        allow_untrained
            Score a model that was never trained (random predictions, e.g. as a floor);
            otherwise that is an :class:`~cellfm_sc.model.UntrainedModelError`, raised
            before anything else is checked.
        baseline
            Also fit the baselines on the model's training (+ validation) cells and score
            them on the same cells (``result.baseline``, printed as "model vs baseline"):
            logistic regression on log-normalised counts
            (:class:`~cellfm_sc.baselines.CellLogisticRegression`), and with donor-level labels
            pseudo-bulk logistic regression
            (:class:`~cellfm_sc.baselines.PseudobulkLogisticRegression`). Chunked reads, also
            of backed files; seconds to a few minutes on large data. ``False`` skips them.

        Returns
        -------
        EvaluationResult
            Accuracy, balanced accuracy, macro/weighted F1; QWK, ordinal MAE and Spearman
            for ordinal labels; the per-donor table when a ``donor_key`` was registered; the
            cells' embedding (``result.embedding``); the baselines (``result.baseline``).
            Cells whose label the model does not know (or is missing) are not scored;
            ``result.notes`` says how many.
        """
        from cellfm_sc.metrics import evaluate_predictions

        self._require_trained(allow_untrained)  # "untrained" comes before any other complaint
        adata = self._adata_or_default(adata)
        adata, idx, probs, emb = self._infer(
            adata,
            indices,
            batch_size,
            device,
            enable_progress_bar,
            min_gene_coverage,
            allow_untrained=allow_untrained,
        )
        all_codes = self._label_codes(adata, strict=False)
        codes = all_codes[idx]
        known = (codes >= 0) & ~np.isnan(probs[:, 0])
        notes = []
        if not known.all():
            labels = obs_column(adata, self.labels_key, keyword="labels_key", allow_missing=True)
            unknown = labels.iloc[idx[~known]].astype(str)
            counts = unknown.value_counts()
            shown = ", ".join(f"{k} ({v})" for k, v in counts.head(10).items())
            notes.append(
                f"{int((~known).sum())} cell(s) not scored: label unknown to the model, missing, "
                f"or no counts: {shown}"
            )
            if not known.any():
                raise ValueError(
                    f"none of the {len(idx)} cells has a label the model knows "
                    f"({self.classes_}): nothing to score"
                )
        donors = self._donors(adata)
        result = evaluate_predictions(
            probs[known],
            codes[known],
            list(self.classes_),
            obs_names=np.asarray(adata.obs_names[idx[known]]),
            donors=None if donors is None else donors[idx[known]],
            ordinal=bool(self.ordinal_),
            donor_method=donor_method,
        )
        result.notes.extend(notes)
        result.embedding = emb[known]
        result.evaluated_on = indices if isinstance(indices, str) else "cells"
        if baseline:
            from cellfm_sc.model._baseline import split_baseline

            result.baseline = split_baseline(
                self, adata, idx[known], all_codes, donors, cells=True, donor_method=donor_method
            )
        return result

    # ----------------------------------------------------------------- reporting
    def report_info(self) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report` (``info=``)."""
        cfg = self.module.trunk.config
        report = self.pretrained_report_ or {}
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
            "checkpoint_variant": report.get("variant"),
            "embedding_coverage": report.get("coverage"),
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
        info["best_validation_acc"] = self._history_at_best("validation_acc")
        if self.split_names_ is not None:
            info["split_sizes"] = {s: len(v) for s, v in self.split_names_.items()}
        return info

    def _history_at_best(self, column: str) -> float | None:
        hist = self.history_
        if hist is None or self.best_epoch_ is None or column not in hist:
            return None
        rows = hist.loc[hist["epoch"] == self.best_epoch_, column]
        return None if rows.empty else float(rows.iloc[-1])

    @property
    def summary(self) -> str:
        """A few lines on the model (pretrained or random trunk, gene coverage, what trains)."""
        cfg = self.module.trunk.config
        rep = self.pretrained_report_
        lines = [f"CellFMClassifier ({'trained' if self.is_trained_ else 'not trained'})"]
        if rep is not None:
            lines.append(f"  pretrained: variant {rep.get('variant')}, {rep.get('source')}")
        else:
            lines.append(
                f"  no pretrained weights: random trunk (preset {self.preset_ or 'custom'})"
            )
        lines.append(
            f"  trunk: enc_dims={cfg.enc_dims}, num_heads={cfg.num_heads}, n_layers={cfg.n_layers}"
        )
        emb = tuple(self.module.trunk.gene_emb.shape)
        line = f"  vocabulary: {self.vocab.n_genes:,} genes, gene_emb {emb}, init '{self.embedding_init_}'"
        if rep is not None and rep.get("coverage") is not None:
            line += (
                f", coverage {rep['n_mapped']:,}/{self.vocab.n_genes:,} "
                f"({100 * rep['coverage']:.1f}%)"
            )
        lines.append(line)
        kind = "ordinal" if self.ordinal_ else "categorical"
        lines.append(f"  labels: {self.labels_key!r}, {len(self.classes_)} {kind} classes")
        if self.donor_key:
            lines.append(f"  donors: {self.donor_key!r}")
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary

    # ----------------------------------------------------------------- save / load parts
    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        self.labels_key = self._read_setup_args()["labels_key"]

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


def _categories(labels: pd.Series, label_order: Sequence[str] | None) -> tuple[list[str], bool]:
    if label_order is not None:
        return [str(c) for c in label_order], True
    if isinstance(labels.dtype, pd.CategoricalDtype):
        observed = set(labels.dropna().astype(str))
        classes = [str(c) for c in labels.cat.categories if str(c) in observed]
        return classes, bool(labels.cat.ordered)
    return sorted(set(labels.dropna().astype(str))), False
