"""Save and load, from one declaration per model class (:attr:`SaveLoadMixin._saved`, each
attribute a :class:`Saved`) beside the base's (:data:`BASE_SAVED`); the class's
:meth:`~SaveLoadMixin._make_module` builds its module from them, when created and loaded."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass

from cellfm_sc._atomic import atomic_dir
from cellfm_sc._hardware import check_accelerator, check_device
from cellfm_sc._json import to_plain
from cellfm_sc.data import check_count_source, get_matrix
from cellfm_sc.nn import CellFMConfig, CellFMTrunk
from cellfm_sc.nn.trainable import merge_lora
from cellfm_sc.vocab import GeneVocab

logger = logging.getLogger(__name__)

__all__ = ["REQUIRED", "SaveLoadMixin", "Saved", "model_not_set_up", "saved_rows"]

MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "config.json"
#: the saved attributes that ``config.json`` shows (besides the setup arguments)
CONFIG_KEYS = "class_name config n_genes trainable_ embedding_init_ max_tokens seed".split()
#: the default of a :class:`Saved` attribute that every saved folder holds
REQUIRED = object()


def model_not_set_up(cls: type[BaseModelClass], adata: Any) -> bool:
    """Whether ``adata`` has not been registered with ``cls.setup_anndata``.

    A copy of a registered AnnData carries the original's registration id but no manager of
    its own (scvi-tools raises ``ValueError``): it needs its own setup too.
    """
    try:
        return cls._get_most_recent_anndata_manager(adata, required=False) is None
    except ValueError:
        return True


def saved_rows(value: Any) -> np.ndarray | None:
    """A saved list of rows back as int64 positions (``None`` stays ``None``)."""
    return None if value is None else np.asarray(value, dtype=np.int64)


@dataclass(frozen=True)
class Saved:
    """One saved attribute: its ``key`` in ``model.pt``, the converter ``kind`` that reads
    it back (``int``, ``float``, ``str``, ``list``, :func:`saved_rows`, ...) and the
    ``default`` of folders saved before it existed."""

    key: str
    kind: Callable[[Any], Any] = lambda value: value
    default: Any = REQUIRED


def _frame(value: Any) -> pd.DataFrame | None:
    return None if value is None else pd.DataFrame(value)


#: what the base saves of every model, declared as a class's :attr:`SaveLoadMixin._saved`
BASE_SAVED = {
    "embedding_init_": Saved("embedding_init_"),
    "preset_": Saved("preset_"),
    "max_tokens": Saved("max_tokens", int),
    "seed": Saved("seed", int),
    "pretrained_report_": Saved("pretrained_report_", default=None),
    "is_trained_": Saved("is_trained_", bool),
    "history_": Saved("history_", _frame, None),
    "step_history_": Saved("step_history_", _frame, None),
    "best_epoch_": Saved("best_epoch_", default=None),
    "best_score_": Saved("best_score_", default=None),
    "split_names_": Saved("split_names_", default=None),
    "train_settings_": Saved("train_settings_", default=None),
}


def _tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class SaveLoadMixin:
    """``save`` / ``load`` in the scvi-tools layout, from the class's :attr:`_saved`."""

    #: attribute name -> how it is saved; the class's own state, besides the base's
    _saved: ClassVar[dict[str, Saved]] = {}

    def _saved_values(self) -> dict[str, Any]:
        """The base's and the declared attributes as plain Python, by key, plus
        :meth:`_save_attrs`."""
        saved = {**BASE_SAVED, **self._saved}
        values = {s.key: to_plain(getattr(self, name), finite=False) for name, s in saved.items()}
        return {**values, **self._save_attrs()}

    def _restore_saved(self, attrs: dict[str, Any]) -> None:
        """Set the base's and the declared attributes from a saved attribute dict."""
        for name, s in {**BASE_SAVED, **self._saved}.items():
            if s.key in attrs:
                setattr(self, name, s.kind(attrs[s.key]))
            elif s.default is REQUIRED:
                raise KeyError(f"the saved model lacks {s.key!r}: not a {type(self).__name__}")
            else:
                setattr(self, name, s.kind(s.default))

    def _save_attrs(self) -> dict[str, Any]:
        """Saved values that are not attributes of their own (default: none)."""
        return {}

    def _restore_attrs(self, attrs: dict[str, Any]) -> None:
        """What loading sets besides the declared attributes (default: nothing)."""

    def _make_module(self, trunk: CellFMTrunk) -> torch.nn.Module:
        """The class's torch module around ``trunk``, from its declared attributes."""
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
                **self._saved_values(),
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
            summary = {k: attr[k] for k in CONFIG_KEYS}
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
    ) -> CellFMModel:  # noqa: F821 (the class it is called on)
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
        model._pretrained_report = None
        model._restore_saved(attr)
        model._restore_attrs(attr)  # reads the setup args too
        if layer is not None:
            model.layer, model.use_raw = layer, False
        elif use_raw is not None:
            model.layer, model.use_raw = None, bool(use_raw)
        config = CellFMConfig.from_dict(attr["config"])
        trunk = CellFMTrunk(config, n_genes=int(attr["n_genes"]))
        module = model._make_module(trunk)
        lora = attr.get("lora_") or {"rank": 8, "alpha": 16}
        model._attach(module, attr["trainable_"], lora["rank"], lora["alpha"])
        module.load_state_dict(saved["model_state_dict"], strict=True)
        model.module.eval()
        model.init_params_ = attr["init_params_"]
        if adata is not None:  # genes are aligned (and coverage checked) when cells are read
            # the counts must be where the model reads them (raw / layer / X): say so now
            get_matrix(adata, layer=model.layer, use_raw=model.use_raw)
            split = model._split_for(adata)
            if split is not None:
                model._set_split(adata, split)
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
