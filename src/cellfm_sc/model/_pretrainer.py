"""``CellFMPretrainer``: CellFM's masked-value objective on unlabelled cells (module + plan +
user API), over one AnnData or a corpus of several files read in place."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scvi import REGISTRY_KEYS
from scvi.data.fields import LayerField

from cellfm_sc.data import check_count_source, check_counts, get_matrix
from cellfm_sc.dataloaders._corpus import (
    CorpusMember,
    looks_ensembl,
    member_ensembl_ids,
    union_genes,
)
from cellfm_sc.model._pretrain_module import CellFMPretrainModule
from cellfm_sc.model._pretrainer_corpus import PretrainerCorpusMixin
from cellfm_sc.model._pretrainer_training import PretrainerTrainingMixin
from cellfm_sc.model._probe import EmbeddingProbe
from cellfm_sc.model.base import CellFMModel, Saved, model_not_set_up, trunk_args
from cellfm_sc.nn import CellFMConfig, CellFMTrunk
from cellfm_sc.train import PretrainingPlan
from cellfm_sc.vocab import GeneVocab

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FILE", "VOCABULARY_FILE", "CellFMPretrainer", "PretrainingPlan"]

#: file names written by :meth:`CellFMPretrainer.export_mindspore`
CHECKPOINT_FILE = "cellfm.ckpt"
VOCABULARY_FILE = "gene_info.csv"


# --------------------------------------------------------------------------------------------
# the model class
# --------------------------------------------------------------------------------------------


class CellFMPretrainer(PretrainerTrainingMixin, PretrainerCorpusMixin, CellFMModel):
    """Pretrain CellFM (or continue its pretraining) on unlabelled cells.

    The objective is CellFM's masked-value loss (see :doc:`/pretraining`): in every cell,
    ``round(mask_ratio * n_genes)`` expressed genes are selected; 80% of them have their
    value hidden (the gene stays), and the value decoder (per token) and the cellwise
    decoder (from the cell embedding) predict the normalised values of the selected genes.
    :meth:`export_mindspore` writes the result as a CellFM checkpoint + vocabulary that
    :class:`~cellfm_sc.model.CellFMClassifier` fine-tunes from (``embedding_init="transfer"``).

    Parameters
    ----------
    adata
        One AnnData registered with :meth:`setup_anndata`, an ``.h5ad`` path, or a list of
        them: a corpus. Paths are opened ``backed="r"`` and set up with the defaults (raw
        counts in ``X``, gene symbols as ``var_names``); a file that needs other settings
        (a ``layer``, ``use_raw``, a ``gene_symbols`` column because its ``var_names`` are
        Ensembl ids) is opened and set up by you and passed as the AnnData::

            lung = anndata.read_h5ad("delorey.h5ad", backed="r")
            CellFMPretrainer.setup_anndata(lung, gene_symbols="gene_names")
            model = CellFMPretrainer(["liao.h5ad", lung, "pbmc3k.h5ad"], preset="small")

        The vocabulary is the union of every member's gene symbols (first appearance order).
        Members are read in place, batch by batch (never concatenated or copied).
    checkpoint
        A CellFM MindSpore ``.ckpt`` (variant A, with decoders) to continue pretraining from;
        without it a randomly initialised trunk of ``preset`` is pretrained from scratch.
    vocabulary_file
        The checkpoint's gene vocabulary (needed for ``embedding_init="transfer"``).
    embedding_init
        ``"random"`` (default) or ``"transfer"`` (pretrained rows for genes the checkpoint
        knows; continued pretraining usually wants this).
    preset
        Trunk size without a checkpoint: ``"tiny"``, ``"small"``, ``"80M"`` (default),
        ``"800M"`` or a :class:`~cellfm_sc.nn.CellFMConfig`.
    num_heads
        Retention heads of the checkpoint (default: what it records, else 48 at width 1536).
    max_tokens
        Most expressed genes per cell (sampled by ``log1p(count)`` weight above it).
    mask_ratio
        Share of each cell's expressed genes selected for the loss (0.2 as CellFM).
    seed
        Seed of the initialisation, the split, the token draws and the validation masks.
    trainable
        What trains (see :class:`~cellfm_sc.model.CellFMClassifier`); ``"auto"`` (default) is the
        whole trunk the objective uses: gene embedding, value encoder with its mask
        embedding, cls token, retention layers and both decoders.
    dropout
        Dropout of the retention layers.
    hgnc_table
        Optional HGNC table for alias/previous-symbol mapping (``"transfer"``).
    lora_rank, lora_alpha
        LoRA settings for ``trainable="lora"``.

    Examples
    --------
    >>> import anndata, cellfm_sc
    >>> adata = anndata.read_h5ad("atlas.h5ad", backed="r")  # doctest: +SKIP
    >>> cellfm_sc.CellFMPretrainer.setup_anndata(adata)  # doctest: +SKIP
    >>> model = cellfm_sc.CellFMPretrainer(adata, preset="small", max_tokens=1024)  # doctest: +SKIP
    >>> model.train(max_epochs=5, batch_size=32)  # doctest: +SKIP
    >>> ckpt, vocab = model.export_mindspore("pretrained/")  # doctest: +SKIP
    """

    _module_cls = CellFMPretrainModule
    _saved: ClassVar[dict[str, Saved]] = {
        "mask_ratio_": Saved("mask_ratio", float),
        "dropout_": Saved("dropout", float, 0.1),
        "corpus_names_": Saved("corpus_names_", list, []),
    }
    _objective_params = ("value_dec.", "cellwise_dec.", "value_enc.mask_emb")

    def __init__(
        self,
        adata: Any,
        checkpoint: str | os.PathLike[str] | None = None,
        vocabulary_file: str | os.PathLike[str] | None = None,
        embedding_init: str = "random",
        preset: str | CellFMConfig | None = None,
        num_heads: int | None = None,
        max_tokens: int = 2048,
        mask_ratio: float = 0.2,
        seed: int = 0,
        trainable: str = "auto",
        dropout: float = 0.1,
        hgnc_table: str | os.PathLike[str] | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
    ) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if not isinstance(mask_ratio, int | float) or not 0.0 < float(mask_ratio) <= 1.0:
            raise ValueError(f"mask_ratio must be a number in (0, 1], got {mask_ratio!r}")
        members = self._open_corpus(adata)
        super().__init__(members[0][0])
        self._init_common()
        self._read_setup_args()
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.mask_ratio_ = float(mask_ratio)
        corpus = [self._member(a, name) for a, name in members]
        _check_identifiers(corpus)
        genes = union_genes([names for _, names in corpus])
        trunk = self._build_trunk(members[0][0], **trunk_args(locals()), genes=genes)
        self.vocab = _with_ensembl_ids(self.vocab, corpus)
        self.members_ = []
        for member, names in corpus:
            member.gene_id_map = self.vocab.ids(names)
            self.members_.append(member)
        self.corpus_names_ = [m.name for m in self.members_]
        self.dropout_ = float(dropout)
        self._attach(self._make_module(trunk), trainable, lora_rank, lora_alpha)
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------- setup_anndata
    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        layer: str | None = None,
        gene_symbols: str | None = None,
        use_raw: bool = False,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of unlabelled cells (raw counts) for pretraining.

        Parameters
        ----------
        adata
            AnnData with raw counts in ``.X``, ``.layers[layer]`` or ``.raw.X`` (CSR, CSC,
            dense or ``backed="r"``).
        layer
            Layer with the raw counts (default ``.X``).
        gene_symbols
            ``var`` column with gene symbols, when ``var_names`` are not symbols (e.g.
            Ensembl ids with symbols in ``var["gene_names"]``). The vocabulary is over
            symbols; a column without a symbol, or repeating an earlier symbol, keeps its
            ``var_name``.
        use_raw
            Counts in ``adata.raw.X`` (the CELLxGENE layout; genes ``adata.raw.var_names``).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_count_source(layer, use_raw)
        get_matrix(adata, layer, use_raw=use_raw)  # names a missing layer / raw
        var = adata.raw.var if use_raw else adata.var
        if gene_symbols is not None and gene_symbols not in var.columns:
            where = "adata.raw.var" if use_raw else "adata.var"
            raise KeyError(
                f"gene_symbols={gene_symbols!r} is not a column of {where}; columns are: "
                f"{list(map(str, var.columns))}"
            )
        check_counts(adata, layer, use_raw=use_raw)
        fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=not use_raw)]
        cls._register(adata, fields, setup_method_args, **kwargs)

    def train(
        self,
        max_epochs: int = 16,
        batch_size: int = 32,
        lr: float | str = "auto",
        weight_decay: float = 1e-5,
        validation_size: float = 0.05,
        early_stopping: bool = False,
        patience: int = 3,
        check_val_every_n_steps: int | None = None,
        lr_schedule: str = "warmup_cosine",
        warmup_fraction: float = 0.05,
        precision: str | int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        gradient_clip_val: float | None = 1.0,
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 1,
        resume_from: str | os.PathLike[str] | None = None,
        logger: Any = None,
        enable_progress_bar: bool = True,
        verbose: bool = False,
        gradient_checkpointing: bool = False,
        probe: EmbeddingProbe | Mapping[str, EmbeddingProbe] | None = None,
        corpus_sampling: str = "balanced",
        depth_augmentation: float = 0.5,
        **trainer_kwargs: Any,
    ) -> None:
        """Pretrain: AdamW on the masked-value loss; the best validation weights are kept.

        Parameters
        ----------
        max_epochs
            Epochs over the whole corpus (total, also when resuming). Default 16: a tiny
            trunk on ~15,000 cells reached its probe plateau after 12-13 of 16 epochs
            (``benchmarks/shift_transfer.py``; the masked loss kept falling after that).
        batch_size
            Cells per batch (per device); a batch holds cells of one member.
        lr
            AdamW learning rate; ``"auto"`` follows :func:`~cellfm_sc.model.auto_lr` (a
            random trunk: 1e-3; continued pretraining: the checkpoint's fine-tuning rate).
        weight_decay
            AdamW weight decay.
        validation_size
            Fraction of every member's cells held out to score the masked loss (model
            selection and early stopping); 0 keeps the last weights.
        early_stopping, patience
            Stop after ``patience`` validations without a lower validation loss.
        check_val_every_n_steps
            Validate every N training steps instead of every epoch.
        lr_schedule, warmup_fraction
            Schedule (default: linear warm-up over 5% of the steps, then cosine to 0).
        precision, accelerator, devices, strategy
            Lightning settings (bf16 on GPUs that support it; ``devices=N,
            strategy="ddp"`` on several GPUs, see the multi-GPU docs).
        gradient_clip_val
            Gradient-norm clipping.
        num_workers
            DataLoader worker processes (backed files are reopened in each).
        checkpoint_dir, resume_from
            Write a resumable ``checkpoint_epoch_{n}.pth`` after every epoch; continue from one.
        keep_checkpoints
            Epoch checkpoints kept: the newest ``keep_checkpoints`` (default 1) plus the best
            epoch's; -1 keeps all.
        logger, enable_progress_bar
            Lightning logger(s) and the progress bar (with the running loss) on stderr.
        verbose
            Show Lightning's own info lines (off by default).
        gradient_checkpointing
            Recompute activations in the backward pass (less GPU memory for deep trunks).
        probe
            An :class:`~cellfm_sc.model.EmbeddingProbe` (labelled cells): kNN or
            logistic-regression macro-F1 on the cell embeddings, before training
            (``train_settings_["probe"]["probe_macro_f1"]["initial_macro_f1"]``: the start, e.g.
            random) and after every epoch (``history["probe_macro_f1"]``). The masked loss
            keeps falling long after the embeddings stop improving (or before they start):
            the probe says when pretraining helps a downstream task. A dict of named probes
            (e.g. ``{"same": ..., "shifted": ...}``) records ``probe_<name>_macro_f1``.
        corpus_sampling
            ``"balanced"`` (default: every file the same number of batches per epoch, small
            files repeated with other token draws, large ones sub-sampled, the epoch as long
            as a proportional one) or ``"proportional"`` (every training cell once per
            epoch, so files weigh by their size). Measured on 3 files of 10.7k / 1.8k / 2.7k
            cells: balanced raised the kNN probe on PBMC cells from 0.61 to 0.69 macro-F1
            and tied on shifted PBMC cells (0.51 both), for a slightly higher masked
            validation loss (0.318 vs 0.311: validation weighs files by size).
        depth_augmentation
            Chance in [0, 1] that a training cell is read at a random lower depth each epoch
            (counts thinned binomially to 25-100%, :func:`~cellfm_sc.data.thin_depth`), so the
            trunk meets cells as shallow as another lab's; the masked values to predict are
            the thinned cell's. Validation cells are never thinned. The default 0.5 was
            chosen on the shift benchmark's development cells (tiny trunk, 16 epochs on the
            public corpus, then fine-tuned with ``depth_augmentation=1`` on PBMC 3k, 3
            seeds): macro-F1 on shifted cells at 1% / 10% / 100% labels 0.630 / 0.750 /
            0.895 after pretraining at 0, 0.647 / 0.804 / 0.913 at 0.5, 0.616 / 0.704 /
            0.880 at 1.
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        Afterwards ``model.history`` has one row per epoch: ``train_loss``,
        ``train_value_mse``, ``train_cellwise_mse`` and the same for ``validation_``, over
        every selected token of the epoch (and ``probe_macro_f1`` with a ``probe``);
        ``model.best_epoch`` is the epoch whose weights the model holds.
        """
        self._train(locals())

    # ----------------------------------------------------------------- export
    def export_trunk(self) -> CellFMTrunk:
        """The trunk as plain parameters (LoRA adapters merged into a copy), on the CPU."""
        import copy

        from cellfm_sc.nn.trainable import merge_lora

        module = self.module
        if self.trainable_ == "lora":
            module = merge_lora(copy.deepcopy(module))
        trunk = module.trunk
        return trunk if trunk.gene_emb.device.type == "cpu" else copy.deepcopy(trunk).cpu()

    def export_mindspore(
        self, directory: str | os.PathLike[str], overwrite: bool = False
    ) -> tuple[Path, Path]:
        """Write the trunk as a CellFM MindSpore checkpoint and its vocabulary.

        ``directory/cellfm.ckpt``: variant-A names (``gene_emb`` ``(rows, D)`` for this
        model's vocabulary, ``cls_token``, ``zero_emb``, ``value_enc.*`` with ``mask_emb``,
        ``encoder.*``, ``value_dec.*``, ``cellwise_dec.*``), float32, plus an integer
        ``num_heads`` entry (so readers need no ``num_heads=``; MindSpore's loaders leave it
        unloaded). ``directory/gene_info.csv``: the vocabulary in the format of CellFM's
        ``expand_gene_info.csv`` (first column the gene symbol; token id = row + 1). Both
        are written atomically. Then::

            CellFMClassifier(adata, checkpoint=ckpt, vocabulary_file=vocab,
                             embedding_init="transfer")

        fine-tunes from it, and ``cellfm-sc inspect ckpt`` describes it.

        Parameters
        ----------
        directory
            Output folder (created if needed).
        overwrite
            Replace existing ``cellfm.ckpt`` / ``gene_info.csv`` there.

        Returns
        -------
        ``(checkpoint_path, vocabulary_path)``.
        """
        from cellfm_sc.io import save_trunk_mindspore

        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a directory")
        ckpt, vocab = out / CHECKPOINT_FILE, out / VOCABULARY_FILE
        existing = [p.name for p in (ckpt, vocab) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{out} already holds {existing}; pass overwrite=True or another directory"
            )
        if self.global_rank_ != 0:
            return ckpt, vocab
        out.mkdir(parents=True, exist_ok=True)
        save_trunk_mindspore(self.export_trunk(), ckpt, record_num_heads=True)
        self.vocab.save_cellfm_file(vocab)
        return ckpt, vocab

    # ----------------------------------------------------------------- reporting
    @property
    def summary(self) -> str:
        lines = self._summary_lines("continued from", "from scratch")
        lines.append(
            f"  vocabulary: {self.vocab.n_genes:,} genes (union of the corpus), gene_emb "
            f"{tuple(self.module.trunk.gene_emb.shape)}, init '{self.embedding_init_}'"
        )
        members = getattr(self, "members_", None) or []
        if members:
            total = sum(m.n_obs for m in members)
            lines.append(f"  corpus: {len(members)} AnnData, {total:,} cells: {self.corpus}")
        lines.append(f"  objective: masked values, mask_ratio={self.mask_ratio_}")
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- save / load parts
    def _save_attrs(self) -> dict[str, Any]:
        ens = self.vocab.ensembl_ids
        return {"ensembl_ids": None if ens is None else list(ens)}

    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        if attrs.get("ensembl_ids") is not None:
            self.vocab = GeneVocab(self.vocab.names, ensembl_ids=attrs["ensembl_ids"])
        adata = self._adata
        self.members_ = []
        if adata is not None and not model_not_set_up(type(self), adata):
            member, names = self._member(adata, "adata[0]")
            member.gene_id_map = self.vocab.ids(names, missing="zero")
            self.members_ = [member]

    def _make_module(self, trunk: CellFMTrunk) -> CellFMPretrainModule:
        return CellFMPretrainModule(trunk, mask_ratio=self.mask_ratio_)


def _with_ensembl_ids(
    vocab: GeneVocab, corpus: Sequence[tuple[CorpusMember, np.ndarray]]
) -> GeneVocab:
    """``vocab`` with the Ensembl id of every gene some member knows (first one found), so
    the exported vocabulary maps query genes by Ensembl id too; unchanged if none is known."""
    found: dict[str, str] = {}
    for member, names in corpus:
        ids = member_ensembl_ids(
            member.adata, use_raw=member.use_raw, gene_symbols=member.gene_symbols
        )
        if ids is None:
            continue
        for name, ens in zip(names, ids):
            if ens is not None:
                found.setdefault(str(name), ens)
    if not found:
        return vocab
    return GeneVocab(vocab.names, ensembl_ids=[found.get(str(n)) for n in vocab.names])


def _check_identifiers(corpus: Sequence[tuple[CorpusMember, np.ndarray]]) -> None:
    """Refuse a corpus that mixes Ensembl-keyed and symbol-keyed members."""
    kinds = [(m, looks_ensembl(names)) for m, names in corpus]
    ensembl = [m for m, e in kinds if e]
    if ensembl and len(ensembl) < len(kinds):
        m = ensembl[0]
        var = m.adata.raw.var if m.use_raw else m.adata.var
        columns = [
            str(c) for c in var.columns if var[c].dtype == object or str(var[c].dtype) == "category"
        ]
        raise ValueError(
            f"corpus member {m.name!r} names its genes by Ensembl id while other members use "
            "gene symbols, so they would not share a vocabulary: open it and set it up with "
            "CellFMPretrainer.setup_anndata(adata, gene_symbols=COLUMN), COLUMN a var column "
            f"of symbols (its text columns: {columns})"
        )
