""":class:`CellFMModel`: construction, data access and the split every model class shares."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass

from cellfm_sc._constants import EMBEDDING_INITS, TRAINABLE_POLICIES
from cellfm_sc._errors import UntrainedModelError
from cellfm_sc._hardware import check_device
from cellfm_sc.data import (
    DataSplit,
    align_genes,
    check_count_source,
    check_counts,
    check_labels,
    matrix_gene_symbols,
    matrix_var_names,
    obs_column,
)
from cellfm_sc.model.base._inference import InferenceMixin
from cellfm_sc.model.base._saving import SaveLoadMixin, model_not_set_up
from cellfm_sc.model.base._training import TrainingMixin, auto_lr
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, apply_trainable
from cellfm_sc.pretrained import PretrainedReport, load_pretrained_trunk
from cellfm_sc.vocab import GeneVocab, build_gene_embedding

logger = logging.getLogger(__name__)

__all__ = ["CellFMModel", "UntrainedModelError", "auto_lr", "model_not_set_up"]

SPLITS = ("train", "validation", "test")

#: the registry field of the donor column (``setup_anndata(donor_key=...)``)
DONOR_FIELD = "donor"


class CellFMModel(TrainingMixin, InferenceMixin, SaveLoadMixin, BaseModelClass):
    """Base of :class:`~cellfm_sc.model.CellFMClassifier` and the other model classes.

    A subclass provides its torch module (:meth:`_make_module`, from the attributes that
    :attr:`_saved` declares), its training plan (:meth:`_training_plan`), its
    ``setup_anndata`` and its user methods; its ``train`` calls :meth:`_train` (one line),
    which runs the checks, the split, the data module, the plan and the fit. It inherits
    construction (:meth:`_build_trunk`, :meth:`_attach`), data access, the split
    bookkeeping, ``save`` / ``load``, the inference loop and
    :meth:`get_latent_representation`.
    """

    _module_cls: ClassVar[type[torch.nn.Module]]
    #: name prefixes (relative to the trunk) that the class's loss trains beside the policy
    _objective_params: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ construction
    def _read_setup_args(self) -> dict[str, Any]:
        manager = self.adata_manager
        args = dict((manager.registry if manager is not None else self.registry_)["setup_args"])
        self.layer: str | None = args.get("layer")
        self.use_raw: bool = bool(args.get("use_raw", False))
        self.gene_symbols_key: str | None = args.get("gene_symbols")
        self.donor_key: str | None = args.get("donor_key")
        self.labels_key: str | None = args.get("labels_key")
        return args

    def _read_classes(self, adata: Any, args: dict[str, Any]) -> None:
        """The classes of a labelled model (``classes_``, ``ordinal_``) from the registered
        labels column of ``adata`` and the setup's ``label_order``."""
        self.classes_, self.ordinal_ = _categories(
            obs_column(adata, self.labels_key, keyword="labels_key"), args.get("label_order")
        )

    def _init_common(self) -> None:
        #: rank of this process in the last (distributed) training; 0 outside DDP
        self.global_rank_ = 0
        self.history_ = None
        self.step_history_ = None
        self.best_epoch_: int | None = None
        self.best_score_: float | None = None
        self.train_settings_: dict[str, Any] | None = None
        self.split_: DataSplit | None = None
        self.split_names_: dict[str, list[str]] | None = None

    def _build_trunk(
        self,
        adata: Any,
        *,
        checkpoint: str | os.PathLike[str] | None,
        vocabulary_file: str | os.PathLike[str] | None,
        num_heads: int | None,
        preset: str | CellFMConfig | None,
        embedding_init: str,
        dropout: float,
        seed: int,
        hgnc_table: str | os.PathLike[str] | None,
        genes: list[str] | None = None,
    ) -> CellFMTrunk:
        """The trunk for ``adata``'s genes: from a checkpoint, or random of ``preset``.

        ``genes`` overrides the vocabulary (default: the genes of ``adata``'s count matrix,
        with ``gene_symbols`` used for the transfer mapping); the pretrainer passes the union
        of its corpus' gene symbols.
        """
        if embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"embedding_init must be one of {EMBEDDING_INITS}, got {embedding_init!r}"
            )
        if genes is None:
            var_names = self._gene_names(adata)
            symbols = self._gene_symbols(adata)
        else:
            var_names, symbols = [str(g) for g in genes], None
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
                _check_preset(trunk.config, preset)
            trunk.set_dropout(dropout)
            preset_name = None
        else:
            if embedding_init == "transfer":
                raise ValueError("embedding_init='transfer' needs a checkpoint= to transfer from")
            if vocabulary_file is not None:
                raise ValueError("vocabulary_file= belongs to a checkpoint=; pass both")
            config = _resolve_preset(preset, num_heads, dropout)
            preset_name = preset if isinstance(preset, str) else (None if preset else "80M")
            warnings.warn(
                f"no checkpoint given: the CellFM trunk ({config.enc_dims} dims, "
                f"{config.n_layers} layers) is randomly initialised; no pretrained weights are "
                "used",
                UserWarning,
                stacklevel=3,
            )
            trunk = CellFMTrunk(config, n_genes=len(var_names))
            table = build_gene_embedding(
                GeneVocab.from_var_names(var_names), init="random", seed=seed, dim=config.enc_dims
            )
            with torch.no_grad():
                trunk.gene_emb.copy_(table)
        self.vocab = GeneVocab.from_var_names(var_names)
        self.pretrained_report_ = report.to_dict() if report is not None else None
        self._pretrained_report = report
        self.embedding_init_ = embedding_init
        self.preset_ = preset_name
        return trunk

    def _attach(
        self, module: torch.nn.Module, trainable: str, lora_rank: int, lora_alpha: int
    ) -> None:
        """Set the module and what trains (the policy plus the objective's parameters)."""
        if trainable not in TRAINABLE_POLICIES:
            raise ValueError(f"trainable must be one of {TRAINABLE_POLICIES}, got {trainable!r}")
        self.module = module
        self.trainable_ = trainable
        self.lora_ = {"rank": int(lora_rank), "alpha": int(lora_alpha)}
        self.trainable_summary = apply_trainable(
            module, trainable, rank=lora_rank, alpha=lora_alpha, also=self._objective_params
        )
        self.module.eval()

    @property
    def pretrained(self) -> bool:
        """Whether the trunk came from a checkpoint (not randomly initialised)."""
        return self.pretrained_report_ is not None

    def _require_trained(self, allow_untrained: bool = False, *, head: bool = True) -> None:
        """Refuse inference whose outputs would be random (the one home of this rule).

        A model is trained once :meth:`train` has run, or when it was loaded from the save
        of a trained model. Outputs that need no head (cell embeddings, ``head=False``) are
        also meaningful from a trunk loaded from a pretrained checkpoint whose gene
        embedding was transferred (``embedding_init="transfer"``).

        Raises
        ------
        UntrainedModelError
            Not trained and not ``allow_untrained``; the message names ``train()`` and
            ``load()``.
        """
        if allow_untrained or self.is_trained_:
            return
        if not head and self.pretrained and self.embedding_init_ == "transfer":
            return
        name = type(self).__name__
        what = "predictions" if head else "embeddings"
        why = (
            "its gene embedding is new (embedding_init='random') and "
            if self.pretrained and not head
            else ""
        )
        raise UntrainedModelError(
            f"this {name} has not been trained: {why}its {what} would be random. Call "
            f"model.train() first, or load a trained model with {name}.load(dir); pass "
            "allow_untrained=True to compute them anyway (random features on purpose)"
        )

    # ------------------------------------------------------------------ data access
    def _data_kwargs(self) -> dict[str, Any]:
        """Where the counts are, for the data path."""
        return {"layer": self.layer, "use_raw": self.use_raw}

    def _gene_names(self, adata: Any) -> list[str]:
        """Genes of the count matrix in use (``adata.raw.var_names`` with ``use_raw``)."""
        return [str(v) for v in matrix_var_names(adata, use_raw=self.use_raw)]

    def _gene_symbols(self, adata: Any) -> list[str] | None:
        if self.gene_symbols_key is None:
            return None
        symbols = matrix_gene_symbols(adata, self.gene_symbols_key, use_raw=self.use_raw)
        return [str(s) for s in symbols]

    def _donors(self, adata: Any, donor_key: str | None = None) -> np.ndarray | None:
        """The donor of every cell of ``adata`` as str (``obs[donor_key]``, default the
        registered donor column), or None for a model without donors."""
        key = donor_key or self.donor_key
        if key is None:
            return None
        return obs_column(adata, key, keyword="donor_key").astype(str).to_numpy()

    def _adata_or_default(self, adata: Any | None) -> Any:
        if adata is None:
            if self.adata is None:
                raise ValueError("this model holds no AnnData: pass adata=")
            return self.adata
        return adata

    def _gene_id_map(
        self, adata: Any, min_gene_coverage: float = 0.5, *, strict: bool = False
    ) -> np.ndarray | None:
        """Map ``adata``'s genes onto the model's vocabulary (``None`` when identical).

        Query data may hold another gene set: genes the model does not know are dropped,
        the model's genes absent from ``adata`` count as not expressed; a warning gives the
        coverage, and below ``min_gene_coverage`` it is an error. With ``strict`` (training)
        the genes must be the model's, in any order.
        """
        names = self._gene_names(adata)
        if names == list(self.vocab.names):
            return None
        if strict and set(names) != set(self.vocab.names):
            raise ValueError(
                f"adata's {len(names)} genes are not the model's {self.vocab.n_genes} genes; "
                "training needs the genes the model was built for (query data can be predicted)"
            )
        alignment = align_genes(
            self.vocab,
            names,
            min_gene_coverage=min_gene_coverage,
            what="adata.raw.var_names" if self.use_raw else "adata.var_names",
        )
        return None if alignment.is_identity else alignment.gene_id_map

    @property
    def device(self) -> torch.device:
        """The device the module's parameters are on."""
        return next(self.module.parameters()).device

    def _inference_device(self, device: str | torch.device | None) -> torch.device:
        if device is not None:
            check_device(device)
            return torch.device(device)
        here = self.device
        if here.type != "cpu":
            return here
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ------------------------------------------------------------------ the split
    def _set_split(self, adata: Any, split: DataSplit) -> None:
        self.split_ = split
        self.train_indices_ = split.train
        self.validation_indices_ = split.validation
        self.test_indices_ = split.test
        names = np.asarray(adata.obs_names)
        self.split_names_ = {s: [str(n) for n in names[split[s]]] for s in SPLITS}

    def _split_positions(self, adata: Any, name: str) -> np.ndarray | None:
        """Positions in ``adata`` of the split ``name``, matched by obs name (or an error)."""
        if self.split_names_ is None:
            return None
        if adata is self.adata and self.split_ is not None:
            return self.split_[name]
        names = self.split_names_[name]
        pos = adata.obs_names.get_indexer(pd.Index(names))
        missing = int((pos < 0).sum())
        if missing:
            shown = [names[i] for i in np.flatnonzero(pos < 0)[:3]]
            raise ValueError(
                f"{missing} of the model's {len(names)} {name} cells are not in this AnnData "
                f"(by obs name, e.g. {shown}); score these data with indices= instead"
            )
        return pos.astype(np.int64)

    def _split_for(self, adata: Any) -> DataSplit | None:
        """The whole split as positions in ``adata``, or None when a split cell is absent."""
        try:
            parts = [self._split_positions(adata, s) for s in SPLITS]
        except ValueError:
            return None
        return None if parts[0] is None else DataSplit(*parts)

    def split_labels(self, adata: Any | None = None) -> np.ndarray:
        """Per cell of ``adata``: ``"train"``, ``"validation"``, ``"test"`` or ``"none"``.

        Cells are matched by obs name, so any AnnData works (cells the model never split
        are ``"none"``).
        """
        adata = self._adata_or_default(adata)
        out = np.full(adata.n_obs, "none", dtype=object)
        if self.split_names_ is None:
            return out
        for s in SPLITS:
            pos = adata.obs_names.get_indexer(pd.Index(self.split_names_[s]))
            out[pos[pos >= 0]] = s
        return out

    def _indices(self, adata: Any, indices: Any) -> np.ndarray:
        if indices is None:
            return np.arange(adata.n_obs, dtype=np.int64)
        if isinstance(indices, str):
            if indices not in SPLITS:
                raise ValueError(
                    f"indices must be 'train', 'validation', 'test' or an array, got {indices!r}"
                )
            pos = self._split_positions(adata, indices)
            if pos is None or len(pos) == 0:
                raise ValueError(
                    f"the model has no {indices} cells (train with a {indices} split first, or "
                    "pass indices=)"
                )
            return np.asarray(pos, dtype=np.int64)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (adata.n_obs,):
                raise ValueError(
                    f"a boolean indices mask needs shape ({adata.n_obs},), got {idx.shape}"
                )
            idx = np.flatnonzero(idx)
        if idx.dtype.kind in "OUS":  # obs names
            pos = adata.obs_names.get_indexer(pd.Index(idx.astype(str)))
            if (pos < 0).any():
                raise KeyError(f"obs names not in the AnnData: {list(idx[pos < 0][:5])}")
            idx = pos
        idx = idx.astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= adata.n_obs):
            raise IndexError(
                f"indices must lie in [0, {adata.n_obs}), got {idx.min()}..{idx.max()}"
            )
        if len(np.unique(idx)) != len(idx):
            raise ValueError("indices hold repeated cells")
        return idx

    # ------------------------------------------------------------------ registration, report
    @classmethod
    def _register(
        cls, adata: Any, fields: list[Any], setup_method_args: dict[str, Any], **kwargs: Any
    ) -> None:
        """Register ``adata``'s ``fields`` with a new :class:`~scvi.data.AnnDataManager`
        (scvi-tools' warnings about counts and small categories held back: cellfm-sc
        checks the counts itself)."""
        from scvi.data import AnnDataManager

        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer.*")
            warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    def _register_labelled(
        cls,
        adata: Any,
        setup_method_args: dict[str, Any],
        check_donors: Callable[[pd.Series, pd.Series], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """Check and register a labelled AnnData (the ``setup_args`` of ``setup_method_args``:
        ``labels_key``, ``donor_key``, ``layer``, ``gene_symbols``, ``label_order``,
        ``use_raw``): the count source and the counts, the columns, the labels
        (``check_donors(donors, labels)`` when given), in this order."""
        args = setup_method_args["setup_args"]
        labels_key, donor_key = args["labels_key"], args["donor_key"]
        layer, use_raw = args["layer"], args["use_raw"]
        check_count_source(layer, use_raw)
        check_counts(adata, layer, use_raw=use_raw)  # also names an empty matrix or a bad layer
        labels = obs_column(adata, labels_key, keyword="labels_key")
        donors = None if donor_key is None else obs_column(adata, donor_key, keyword="donor_key")
        if args["gene_symbols"] is not None:  # names a missing column
            matrix_gene_symbols(adata, args["gene_symbols"], use_raw=use_raw)
        check_labels(labels, labels_key, args["label_order"])
        if check_donors is not None:
            check_donors(donors, labels)
        fields = [
            # the registry's X field (raw counts are checked by cellfm-sc itself, also in raw)
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=not use_raw),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if donor_key is not None:
            fields.append(CategoricalObsField(DONOR_FIELD, donor_key))
        cls._register(adata, fields, setup_method_args, **kwargs)

    def __repr__(self) -> str:
        """The class's ``summary`` (a class without one: scvi-tools' representation)."""
        return self.summary if hasattr(type(self), "summary") else super().__repr__()

    def _summary_lines(self, pretrained: str, random: str) -> list[str]:
        """The first lines of ``summary``: the class and whether it is trained, the trunk's
        source (``pretrained`` / ``random`` name it) and its size."""
        cfg = self.module.trunk.config
        rep = self.pretrained_report_
        lines = [f"{type(self).__name__} ({'trained' if self.is_trained_ else 'not trained'})"]
        if rep is not None:
            lines.append(f"  {pretrained}: variant {rep.get('variant')}, {rep.get('source')}")
        else:
            lines.append(f"  {random}: random trunk (preset {self.preset_ or 'custom'})")
        lines.append(
            f"  trunk: enc_dims={cfg.enc_dims}, num_heads={cfg.num_heads}, n_layers={cfg.n_layers}"
        )
        return lines

    def _report_facts(self, **facts: Any) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report` (``info=``) of a labelled
        model: the model's, then ``facts``, then those of its training."""
        info: dict[str, Any] = {
            "n_genes": int(self.vocab.n_genes),
            "gene_embedding": self.embedding_init_,
            "num_classes": len(self.classes_),
            "labels_key": self.labels_key,
            "donor_key": self.donor_key,
            "trainable": self.trainable_,
            "n_trainable_parameters": int(self.trainable_summary.n_trainable),
            "n_parameters": int(self.trainable_summary.n_total),
            "config": self.module.trunk.config.to_dict(),
            "preset": self.preset_,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "checkpoint": self.pretrained_report_,
            **facts,
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

    # ------------------------------------------------------------------ checks
    def _check_cells(self, adata: Any, indices: np.ndarray) -> None:
        """Every cell that training will read holds counts and is not empty (one pass)."""
        check_counts(adata, indices=indices, full=True, forbid_empty=True, **self._data_kwargs())

    @property
    def step_history(self) -> pd.DataFrame | None:
        """A table with one row per validation run, with ``epoch`` (0-based), ``step``, the epoch-to-date
        training metrics and the validation metrics."""
        return self.step_history_

    @property
    def split(self) -> DataSplit | None:
        """The split of the last training, as row positions in the model's AnnData."""
        return self.split_

    @property
    def best_epoch(self) -> int | None:
        """The (1-based) epoch whose weights the model holds after training."""
        return self.best_epoch_


def trunk_args(args: dict[str, Any]) -> dict[str, Any]:
    """What a model's ``__init__`` passes to :meth:`CellFMModel._build_trunk` as it is: its
    keywords (``genes`` aside), taken from ``args`` (the ``__init__``'s ``locals()``)."""
    params = inspect.signature(CellFMModel._build_trunk).parameters
    return {k: args[k] for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "genes"}


def _resolve_preset(
    preset: str | CellFMConfig | None, num_heads: int | None, dropout: float
) -> CellFMConfig:
    config = (
        preset if isinstance(preset, CellFMConfig) else CellFMConfig.from_preset(preset or "80M")
    )
    overrides: dict[str, Any] = {"dropout": dropout}
    if num_heads is not None:
        overrides["num_heads"] = num_heads
    return CellFMConfig(**{**config.to_dict(), **overrides})


def _check_preset(config: CellFMConfig, preset: str | CellFMConfig) -> None:
    want = preset if isinstance(preset, CellFMConfig) else CellFMConfig.from_preset(preset)
    for f in ("enc_dims", "n_layers", "num_heads"):
        if getattr(want, f) != getattr(config, f):
            raise ValueError(
                f"checkpoint contradicts preset {preset!r}: {f} is {getattr(config, f)} in "
                f"the checkpoint but {getattr(want, f)} in the preset"
            )


def _categories(labels: pd.Series, label_order: Sequence[str] | None) -> tuple[list[str], bool]:
    if label_order is not None:
        return [str(c) for c in label_order], True
    if isinstance(labels.dtype, pd.CategoricalDtype):
        observed = set(labels.dropna().astype(str))
        classes = [str(c) for c in labels.cat.categories if str(c) in observed]
        return classes, bool(labels.cat.ordered)
    return sorted(set(labels.dropna().astype(str))), False
