"""What every cellfm-sc model class shares (scvi-tools ``BaseModelClass`` underneath).

A model class = its torch module + its training plan (loss and metrics) + its user methods.
Everything else lives here once: building the trunk (checkpoint or preset, new gene
embedding), the registered data (layer, genes, donors), the split (kept by obs name),
training through :func:`cellfm_sc.model._core.fit`, the inference loop, ``device``, and
``save`` / ``load``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from cellfm_sc._atomic import atomic_dir
from cellfm_sc._constants import EMBEDDING_INITS, TRAINABLE_POLICIES
from cellfm_sc._errors import UntrainedModelError
from cellfm_sc._hardware import check_accelerator, check_device
from cellfm_sc._json import to_plain
from cellfm_sc.data import (
    DataSplit,
    align_genes,
    check_count_source,
    check_counts,
    get_matrix,
    matrix_gene_symbols,
    matrix_var_names,
)
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, apply_trainable
from cellfm_sc.nn.trainable import merge_lora
from cellfm_sc.pretrained import PretrainedReport, load_pretrained_trunk
from cellfm_sc.vocab import GeneVocab, build_gene_embedding

logger = logging.getLogger(__name__)

__all__ = ["CellFMModel", "UntrainedModelError", "auto_lr", "model_not_set_up"]

MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "config.json"
SPLITS = ("train", "validation", "test")

#: learning rate of ``lr="auto"`` for a randomly initialised trunk (measured: see docs)
LR_RANDOM = 1e-3
#: ``lr="auto"`` for a pretrained trunk of the released width (1536; the original scripts')
LR_PRETRAINED_WIDE = 1e-4
#: ``lr="auto"`` for a pretrained trunk narrower than :data:`WIDE` (the rate that kept the
#: pretraining gain in ``benchmarks/pretraining_transfer.py``; see :func:`auto_lr`)
LR_PRETRAINED_NARROW = 1e-3
WIDE = 1024


def auto_lr(pretrained: bool, config: CellFMConfig) -> float:
    """The learning rate ``lr="auto"`` resolves to.

    A randomly initialised trunk: 1e-3. A pretrained trunk: 1e-4 when
    it is as wide as the released CellFM models (``enc_dims >= 1024``: the original scripts'
    rate for the 80M model), 1e-3 for narrower trunks.

    The narrow rate is the fine-tuning recipe that kept the gain of masked-value pretraining
    (:class:`~cellfm_sc.model.CellFMPretrainer`, ``benchmarks/pretraining_transfer.py``): a tiny
    trunk pretrained on ~15k unlabelled cells, fine-tuned on 23 / 217 labelled PBMC cells
    with everything trainable, scored 0.06 / 0.25 macro-F1 at 1e-4, 0.31 / 0.39 at 3e-4,
    0.44 / 0.67 at 1e-3, 0.43 / 0.59 at 2e-3 and 0.34 / 0.58 at 3e-3; a 10x lower rate
    for the trunk than for the head, training the head first, or freezing the gene
    embedding and value encoder were no better than 1e-3 for everything. With few labels
    a small rate leaves the new head untrained within the few optimizer steps there are.

    Examples
    --------
    >>> auto_lr(True, CellFMConfig.from_preset("80M")), auto_lr(False, CellFMConfig.from_preset("80M"))
    (0.0001, 0.001)
    """
    if not pretrained:
        return LR_RANDOM
    return LR_PRETRAINED_WIDE if config.enc_dims >= WIDE else LR_PRETRAINED_NARROW


def model_not_set_up(cls: type[BaseModelClass], adata: Any) -> bool:
    """Whether ``adata`` has not been registered with ``cls.setup_anndata``.

    A copy of a registered AnnData carries the original's registration id but no manager of
    its own (scvi-tools raises ``ValueError``): it needs its own setup too.
    """
    try:
        return cls._get_most_recent_anndata_manager(adata, required=False) is None
    except ValueError:
        return True


def _select(batch: Any, mask: torch.Tensor) -> Any:
    """The cells of a batch where ``mask (B,)`` is true (every per-cell tensor field)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        is_cells = isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == mask.shape[0]
        values[f.name] = v[mask] if is_cells else v
    return type(batch)(**values)


class _BlockWriter:
    """Collects output rows in blocks of consecutive rows and writes each block once, whole.

    ``target`` takes ``target[lo:hi] = block`` (an h5py / zarr dataset or an array); rows
    arrive in any order within a few blocks (bucketing windows), each exactly once. Memory:
    the blocks not yet complete (a window spans at most two).
    """

    def __init__(self, target: Any, n_rows: int, shape: tuple[int, ...]) -> None:
        self.target, self.n_rows, self.shape = target, int(n_rows), tuple(shape)
        chunk = getattr(target, "chunks", None)
        step = int(chunk[0]) if chunk else 1
        self.block = max(step, -(-4096 // step) * step)
        self.open: dict[int, np.ndarray] = {}
        self.filled: dict[int, int] = {}

    def _size(self, b: int) -> int:
        return min(self.block, self.n_rows - b * self.block)

    def write(self, rows: np.ndarray, values: np.ndarray | None) -> None:
        """Rows ``rows`` (positions) get ``values`` (``(len(rows), *shape)``; None: NaN)."""
        blocks = rows // self.block
        for b in np.unique(blocks):
            sel = blocks == b
            buf = self.open.get(int(b))
            if buf is None:
                buf = np.full((self._size(int(b)), *self.shape), np.nan, np.float32)
                self.open[int(b)] = buf
            if values is not None:
                buf[rows[sel] - b * self.block] = values[sel]
            self.filled[int(b)] = self.filled.get(int(b), 0) + int(sel.sum())
            if self.filled[int(b)] == len(buf):
                self._flush(int(b))

    def _flush(self, b: int) -> None:
        buf = self.open.pop(b)
        self.filled.pop(b, None)
        lo = b * self.block
        self.target[lo : lo + len(buf)] = buf.astype(getattr(self.target, "dtype", np.float32))

    def close(self) -> None:
        """Write what is left (rows never visited stay NaN)."""
        for b in sorted(self.open):
            self._flush(b)


def _progress(total: int, enable: bool) -> Any:
    """A tqdm bar over cells on stderr (disabled unless ``enable``)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enable, file=sys.stderr, unit="cells", desc="cells")


def _tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class CellFMModel(BaseModelClass):
    """Base of :class:`~cellfm_sc.model.CellFMClassifier` and the other model classes.

    Subclasses set ``_module_cls`` and implement ``_make_module(trunk, attrs)`` (build the
    torch module around a trunk from saved attributes), ``_save_attrs()`` /
    ``_restore_attrs(attrs)`` for their own state, their ``setup_anndata``, ``train`` and
    user methods.
    """

    _module_cls: ClassVar[type[torch.nn.Module]]
    #: name prefixes (relative to the trunk) that the class's loss trains beside the policy
    _objective_params: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ construction
    def _read_setup_args(self) -> dict[str, Any]:
        args = (
            dict(self.adata_manager.registry["setup_args"])
            if self.adata_manager is not None
            else dict(self.registry_["setup_args"])
        )
        self.layer: str | None = args.get("layer")
        self.use_raw: bool = bool(args.get("use_raw", False))
        self.gene_symbols_key: str | None = args.get("gene_symbols")
        self.donor_key: str | None = args.get("donor_key")
        return args

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

    # ------------------------------------------------------------------ checks
    def _check_cells(self, adata: Any, indices: np.ndarray) -> None:
        """Every cell that training will read holds counts and is not empty (one pass)."""
        check_counts(adata, indices=indices, full=True, forbid_empty=True, **self._data_kwargs())

    # ------------------------------------------------------------------ training
    def _fit(
        self,
        plan: Any,
        adata: Any,
        split: DataSplit,
        *,
        loader_kwargs: dict[str, Any] | None = None,
        settings: dict[str, Any],
        datamodule: Any = None,
        **fit_kwargs: Any,
    ) -> Any:
        """Train ``plan`` on ``split`` through the core; store history, split and settings.

        The data come from a :class:`~cellfm_sc.model._core.CellFMDataModule` over ``split``
        built with ``loader_kwargs``, or from ``datamodule`` (a Lightning data module of the
        class's own batches, e.g. the donor model's bags).
        """
        from cellfm_sc.model._core import CellFMDataModule, fit

        if datamodule is None:
            datamodule = CellFMDataModule(adata, split, **(loader_kwargs or {}))
        logger.info("%s", self.trainable_summary)
        result = fit(plan, datamodule, has_validation=len(split.validation) > 0, **fit_kwargs)
        self._set_split(adata, split)
        self._record_fit(result, settings)
        return result

    #: ``train()`` arguments every model class passes through to the runner unchanged
    _RUNNER_ARGS = (
        "precision",
        "accelerator",
        "devices",
        "strategy",
        "gradient_clip_val",
        "checkpoint_dir",
        "keep_checkpoints",
        "resume_from",
        "logger",
        "enable_progress_bar",
    )

    def _runner_options(self, train_args: dict[str, Any]) -> dict[str, Any]:
        """The runner's options from a ``train()`` call's arguments (its ``locals()``)."""
        options = {key: train_args[key] for key in self._RUNNER_ARGS}
        options["find_unused_parameters"] = self.trainable_ == "all"
        return options

    def _record_fit(self, result: Any, settings: dict[str, Any]) -> None:
        """Keep what a finished :func:`~cellfm_sc.model._core.fit` run tells: history, best
        epoch, the settings it ran with; the model is trained from now on."""
        self.history_ = pd.DataFrame(result.history)
        self.step_history_ = pd.DataFrame(result.step_history)
        self.best_epoch_ = result.best_epoch
        self.best_score_ = result.best_score
        self.train_settings_ = {
            **settings,
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "precision": result.precision,
            "world_size": result.world_size,
            "log_dir": result.log_dir,
        }
        self.global_rank_ = result.global_rank
        self.is_trained_ = True

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

    # ------------------------------------------------------------------ inference
    def _loader(
        self,
        adata: Any,
        idx: np.ndarray,
        batch_size: int,
        gene_id_map: np.ndarray | None,
        num_workers: int = 0,
    ) -> Any:
        """Evaluation batches over ``idx``, bucketed by length (each cell once)."""
        from cellfm_sc.data import make_dataloader

        return make_dataloader(
            adata,
            idx,
            batch_size,
            max_tokens=self.max_tokens,
            train=False,
            shuffle=False,
            seed=self.seed,
            gene_id_map=gene_id_map,
            bucket=True,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            check=False,  # checked once, in full, by the caller
            **self._data_kwargs(),
        )

    @torch.inference_mode()
    def _forward_cells(
        self,
        adata: Any,
        idx: np.ndarray,
        batch_size: int,
        device: str | torch.device | None,
        outputs: dict[str, tuple[int, ...]],
        forward: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]],
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        sinks: dict[str, Any] | None = None,
        num_workers: int = 0,
        *,
        allow_untrained: bool = False,
        head: bool = True,
    ) -> dict[str, Any]:
        """Run ``forward(module, batch)`` over cells ``idx``; rows in the order of ``idx``.

        ``outputs`` maps each output name to its per-cell shape. By default each output is a
        float32 array ``(len(idx), *shape)``; a ``sinks`` entry instead receives the rows as
        they are computed (any array-like that takes ``sink[sorted_rows] = values``: a numpy
        array or memmap, an h5py or zarr dataset), so no ``(n, D)`` array is ever held.
        Cells without counts get NaN rows (with a warning). Every cell's counts are checked
        first, in one pass, so a bad cell is named before any work. ``num_workers`` loader
        processes read and tokenise ahead of the model; ``enable_progress_bar`` shows a bar
        over the cells on stderr. An untrained model is refused first
        (``_require_trained``: ``allow_untrained``, ``head`` whether ``forward`` uses the
        model's head).
        """
        self._require_trained(allow_untrained, head=head)
        sinks = dict(sinks or {})
        gene_id_map = self._gene_id_map(adata, min_gene_coverage)
        summary = check_counts(adata, indices=idx, full=True, **self._data_kwargs())
        dev = self._inference_device(device)
        module = self.module.to(dev).eval()
        arrays: dict[str, Any] = {}
        for key, shape in outputs.items():
            if key in sinks:
                want = (len(idx), *shape)
                if tuple(sinks[key].shape) != want:
                    raise ValueError(
                        f"the output for {key!r} has shape {tuple(sinks[key].shape)}, "
                        f"expected {want}"
                    )
                arrays[key] = sinks[key]
            else:
                arrays[key] = np.full((len(idx), *shape), np.nan, np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        )
        # sinks (h5py / zarr datasets) get whole blocks of consecutive rows: a bucketed batch
        # scatters over a window of cells, and fancy-indexed writes into chunked files are slow
        writers = {
            key: _BlockWriter(arrays[key], len(idx), outputs[key]) for key in arrays if key in sinks
        }
        bar = _progress(len(idx), enable_progress_bar)
        for batch in self._loader(adata, idx, batch_size, gene_id_map, num_workers):
            bar.update(len(batch))
            ok = (batch.n_tokens > 0).numpy()
            rows = order[np.searchsorted(sorted_idx, batch.obs_index.numpy())]
            if not ok.all():
                for writer in writers.values():  # NaN rows: written as they are
                    writer.write(rows[~ok], None)
                rows = rows[ok]
                if len(rows) == 0:
                    continue
                batch = _select(batch, torch.from_numpy(ok))
            batch = batch.to(dev, non_blocking=True)
            with autocast:
                result = forward(module, batch)
            for key, value in result.items():
                values = value.float().cpu().numpy()
                if key in writers:
                    writers[key].write(rows, values)
                else:
                    arrays[key][rows] = values
        bar.close()
        for writer in writers.values():
            writer.close()
        n_empty = len(summary.empty) if summary.empty is not None else 0
        if n_empty:
            warnings.warn(
                f"{n_empty} cell(s) have no counts: their outputs are NaN",
                UserWarning,
                stacklevel=3,
            )
        return arrays

    # ------------------------------------------------------------------ save / load
    def _save_attrs(self) -> dict[str, Any]:
        """Class-specific attributes to save (plain Python)."""
        return {}

    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        """Set class-specific attributes from :meth:`_save_attrs`' dict."""

    @classmethod
    def _make_module(cls, trunk: CellFMTrunk, attrs: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

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

        Everything is written into a temporary folder first and moved into place, so a
        failed save leaves no half-written model. After distributed training only the first
        process (rank 0) writes. A LoRA model is saved with its adapters (it reloads as
        LoRA). Loading needs neither the original checkpoint nor MindSpore.
        """
        if self.global_rank_ != 0:
            logger.info("not saving on rank %d: the first process saves", self.global_rank_)
            return
        prefix = prefix or ""
        out = Path(dir_path)
        if out.exists() and not overwrite:
            raise ValueError(f"{out} already exists; pass overwrite=True or another directory")
        with atomic_dir(out, overwrite=True) as tmp:
            attr = {
                "class_name": type(self).__name__,
                "init_params_": to_plain(self.init_params_, finite=False),
                "registry_": to_plain(self.registry_, finite=False),
                "config": self.module.trunk.config.to_dict(),
                "n_genes": int(self.vocab.n_genes),
                "trainable_": self.trainable_,
                "lora_": dict(self.lora_),
                "embedding_init_": self.embedding_init_,
                "preset_": self.preset_,
                "max_tokens": int(self.max_tokens),
                "seed": int(self.seed),
                "pretrained_report_": to_plain(self.pretrained_report_, finite=False),
                "is_trained_": bool(self.is_trained_),
                "history_": None
                if self.history_ is None
                else to_plain(self.history_.to_dict("list"), finite=False),
                "step_history_": None
                if self.step_history_ is None
                else to_plain(self.step_history_.to_dict("list"), finite=False),
                "best_epoch_": self.best_epoch_,
                "best_score_": self.best_score_,
                "split_names_": self.split_names_,
                "train_settings_": to_plain(self.train_settings_, finite=False),
                **self._save_attrs(),
            }
            torch.save(
                {
                    "model_state_dict": _tensor_state(self.module),
                    "var_names": [str(v) for v in self.vocab.names],
                    "attr_dict": attr,
                },
                tmp / f"{prefix}{MODEL_FILE}",
            )
            self.vocab.save(tmp / f"{prefix}{VOCAB_FILE}")
            summary = {
                k: attr[k]
                for k in (
                    "class_name",
                    "config",
                    "n_genes",
                    "trainable_",
                    "embedding_init_",
                    "max_tokens",
                    "seed",
                )
            }
            summary["setup_args"] = attr["registry_"].get("setup_args")
            (tmp / f"{prefix}{CONFIG_FILE}").write_text(
                json.dumps(to_plain(summary), indent=2) + "\n", encoding="utf-8"
            )
            if save_anndata:
                self.adata.write_h5ad(tmp / f"{prefix}adata.h5ad", **anndata_write_kwargs)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors of the module (LoRA adapters merged into their base weights)."""
        module = self.module
        if self.trainable_ == "lora":
            import copy

            module = merge_lora(copy.deepcopy(module))
        return _tensor_state(module)

    @classmethod
    def _read_saved(cls, folder: Path, prefix: str) -> dict[str, Any]:
        path = folder / f"{prefix}{MODEL_FILE}"
        if not folder.is_dir():
            raise FileNotFoundError(f"no saved model at {folder} (not a folder)")
        if not path.is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in {folder}: not a saved cellfm-sc model")
        from cellfm_sc.io import load_torch_file

        saved = load_torch_file(path, what="saved model")
        name = saved.get("attr_dict", {}).get("class_name", "CellFMClassifier")
        if name != cls.__name__:
            raise ValueError(f"{folder} holds a {name}, not a {cls.__name__}: use {name}.load")
        return saved

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike[str],
        adata: Any | None = None,
        accelerator: str = "auto",
        device: int | str | torch.device = "auto",
        prefix: str | None = None,
        *,
        layer: str | None = None,
        use_raw: bool | None = None,
    ) -> CellFMModel:
        """Load a model saved with :meth:`save` (``torch.load(weights_only=True)``).

        Parameters
        ----------
        dir_path
            The folder :meth:`save` wrote.
        adata
            Data to attach. Set up data are used as they are; other data are attached for
            inference without validating any labels column (query data may lack it or hold
            other classes). Without it, ``adata.h5ad`` in the folder is used if present.
        accelerator, device
            Where to put the module (scvi-tools' keywords): ``accelerator="cpu"`` /
            ``"gpu"`` / ``"auto"``, ``device`` an index, ``"cuda:1"`` or ``"auto"``.
        prefix
            File-name prefix used at save time.
        layer, use_raw
            Where ``adata``'s counts are when they are not where the model's training data
            had them (default: as the model was set up): ``layer="counts"`` reads
            ``adata.layers["counts"]``, ``use_raw=True`` reads ``adata.raw.X`` (the CELLxGENE
            layout), ``use_raw=False`` without ``layer`` reads ``adata.X``. A model trained on
            ``adata.raw`` can so annotate a query whose counts are in ``X``, and the reverse.

        Examples
        --------
        >>> model = CellFMClassifier.load("runs/adnc/model", query)  # doctest: +SKIP
        >>> model = CellFMClassifier.load("runs/adnc/model", query, use_raw=False)  # doctest: +SKIP
        """
        check_count_source(layer, use_raw)
        folder = Path(dir_path)
        prefix = prefix or ""
        saved = cls._read_saved(folder, prefix)
        attr = saved["attr_dict"]
        registry = attr["registry_"]
        if adata is None and (folder / f"{prefix}adata.h5ad").is_file():
            import anndata

            adata = anndata.read_h5ad(folder / f"{prefix}adata.h5ad")
        model = cls.__new__(cls)
        if adata is not None and not model_not_set_up(cls, adata):
            BaseModelClass.__init__(model, adata)
        else:
            BaseModelClass.__init__(model, registry=registry)
            model._adata = adata
        model._init_common()
        model._read_setup_args()
        model.vocab = GeneVocab.from_var_names(saved["var_names"])
        model.max_tokens = int(attr["max_tokens"])
        model.seed = int(attr["seed"])
        model.embedding_init_ = attr["embedding_init_"]
        model.preset_ = attr["preset_"]
        model.pretrained_report_ = attr.get("pretrained_report_")
        model._pretrained_report = None
        model._restore_attrs(attr)  # reads the setup args too
        if layer is not None:
            model.layer, model.use_raw = layer, False
        elif use_raw is not None:
            model.layer, model.use_raw = None, bool(use_raw)
        config = CellFMConfig.from_dict(attr["config"])
        trunk = CellFMTrunk(config, n_genes=int(attr["n_genes"]))
        module = cls._make_module(trunk, attr)
        lora = attr.get("lora_") or {"rank": 8, "alpha": 16}
        model._attach(module, attr["trainable_"], lora["rank"], lora["alpha"])
        module.load_state_dict(saved["model_state_dict"], strict=True)
        model.module.eval()
        model.init_params_ = attr["init_params_"]
        model.is_trained_ = bool(attr["is_trained_"])
        for key in ("history_", "step_history_"):
            value = attr.get(key)
            setattr(model, key, pd.DataFrame(value) if value is not None else None)
        model.best_epoch_ = attr.get("best_epoch_")
        model.best_score_ = attr.get("best_score_")
        model.train_settings_ = attr.get("train_settings_")
        model.split_names_ = attr.get("split_names_")
        if adata is not None:  # genes are aligned (and coverage checked) when cells are read
            # the counts must be where the model reads them (raw / layer / X): say so now
            get_matrix(adata, layer=model.layer, use_raw=model.use_raw)
            split = model._split_for(adata)
            if split is not None:
                model.split_ = split
                model.train_indices_ = split.train
                model.validation_indices_ = split.validation
                model.test_indices_ = split.test
        model._place(accelerator, device)
        return model

    def _place(self, accelerator: str, device: int | str | torch.device) -> None:
        check_accelerator(accelerator)
        if accelerator != "cpu" and not isinstance(device, int) and device != "auto":
            check_device(device)
        if accelerator == "cpu":
            target = torch.device("cpu")
        elif isinstance(device, torch.device):
            target = device
        elif isinstance(device, int):
            target = torch.device(f"cuda:{device}")
        elif device != "auto":
            target = torch.device(device)
        elif accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        ):
            if not torch.cuda.is_available():
                raise ValueError(f"accelerator={accelerator!r} but no CUDA GPU is available")
            target = torch.device("cuda")
        else:
            target = torch.device("cpu")
        self.module.to(target)


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


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
