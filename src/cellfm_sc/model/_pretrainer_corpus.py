"""The pretrainer's corpus: its members (files read in place), their genes and reading settings."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellfm_sc.data import check_counts
from cellfm_sc.dataloaders._corpus import (
    CorpusMember,
    looks_ensembl,
    member_gene_names,
)
from cellfm_sc.model.base import model_not_set_up

__all__ = ["PretrainerCorpusMixin"]


class PretrainerCorpusMixin:
    """The corpus of :class:`~cellfm_sc.model.CellFMPretrainer`."""

    # ----------------------------------------------------------------- the corpus
    @classmethod
    def _open_corpus(cls, adata: Any) -> list[tuple[Any, str]]:
        """``[(AnnData, name)]`` for one AnnData / path or a list of them (paths set up)."""
        import anndata

        items = list(adata) if isinstance(adata, list | tuple) else [adata]
        if not items:
            raise ValueError("the corpus is empty: pass an AnnData, an .h5ad path or a list")
        out: list[tuple[Any, str]] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            if isinstance(item, str | os.PathLike):
                path = Path(item)
                if not path.is_file():
                    raise FileNotFoundError(f"corpus file {os.fspath(path)!r} does not exist")
                key = os.fspath(path.resolve())
                if key in seen:
                    raise ValueError(f"corpus file {os.fspath(path)!r} is listed twice")
                seen.add(key)
                try:
                    a = anndata.read_h5ad(path, backed="r")
                except (OSError, KeyError, ValueError, TypeError) as exc:
                    raise ValueError(f"cannot read corpus file {os.fspath(path)!r}: {exc}") from exc
                cls.setup_anndata(a)
                out.append((a, path.name))
            elif isinstance(item, anndata.AnnData):
                if model_not_set_up(cls, item):
                    raise ValueError(
                        f"corpus member {i} (an AnnData of {item.n_obs} cells) is not set up: "
                        f"call {cls.__name__}.setup_anndata(adata, ...) first"
                    )
                filename = getattr(item, "filename", None)
                out.append((item, Path(filename).name if filename else f"adata[{i}]"))
            else:
                raise TypeError(
                    f"corpus member {i} must be an AnnData or an .h5ad path, got "
                    f"{type(item).__name__}"
                )
        return out

    @classmethod
    def _member_args(cls, adata: Any) -> dict[str, Any]:
        return dict(cls._get_most_recent_anndata_manager(adata).registry["setup_args"])

    def _member(self, adata: Any, name: str) -> tuple[CorpusMember, np.ndarray]:
        args = self._member_args(adata)
        use_raw = bool(args.get("use_raw", False))
        names = member_gene_names(adata, use_raw=use_raw, gene_symbols=args.get("gene_symbols"))
        member = CorpusMember(
            adata=adata,
            name=name,
            layer=args.get("layer"),
            use_raw=use_raw,
            gene_symbols=args.get("gene_symbols"),
            gene_id_map=np.zeros(len(names), dtype=np.int64),
        )
        return member, names

    @property
    def corpus(self) -> list[str]:
        """Names of the corpus members (file names, or ``adata[i]``)."""
        return list(self.corpus_names_)

    # ----------------------------------------------------------------- genes of other data
    def _settings_of(self, adata: Any) -> tuple[str | None, bool, str | None]:
        """``(layer, use_raw, gene_symbols)`` of ``adata``: its own registration with this
        class, else the model's first member's."""
        if not model_not_set_up(type(self), adata):
            args = self._member_args(adata)
            return args.get("layer"), bool(args.get("use_raw", False)), args.get("gene_symbols")
        return self.layer, self.use_raw, self.gene_symbols_key

    def _gene_id_map(
        self, adata: Any, min_gene_coverage: float = 0.5, *, strict: bool = False
    ) -> np.ndarray | None:
        """Token ids of ``adata``'s columns in the corpus vocabulary (0 = unknown gene).

        The vocabulary is the union of the corpus' genes, so coverage is counted on the
        query's side: below ``min_gene_coverage`` of ``adata``'s genes known to the model is
        an error, below 100% a warning.
        """
        _, use_raw, symbols = self._settings_of(adata)
        names = member_gene_names(adata, use_raw=use_raw, gene_symbols=symbols)
        ids = self.vocab.ids(names, missing="zero")
        known = int((ids > 0).sum())
        share = known / max(len(names), 1)
        if known == 0 or share < min_gene_coverage:
            hint = (
                "; its var_names look like Ensembl ids: set it up with "
                "CellFMPretrainer.setup_anndata(adata, gene_symbols=...)"
                if looks_ensembl(names)
                else ""
            )
            raise ValueError(
                f"only {known:,} of the data's {len(names):,} genes ({100 * share:.1f}%) are in "
                f"the model's vocabulary of {self.vocab.n_genes:,} genes, below "
                f"min_gene_coverage={min_gene_coverage}{hint}"
            )
        if known < len(names):
            warnings.warn(
                f"{len(names) - known:,} of the data's {len(names):,} genes are not in the "
                "model's vocabulary (dropped; they still count toward each cell's total)",
                UserWarning,
                stacklevel=3,
            )
        if len(names) == self.vocab.n_genes and np.array_equal(ids, np.arange(1, known + 1)):
            return None
        return ids

    def _probe_reading(self, adata: Any) -> dict[str, Any]:
        """Where a probe AnnData's counts are (its own settings, else the first member's)."""
        layer, use_raw, _ = self._settings_of(adata)
        return {"layer": layer, "use_raw": use_raw}

    @contextlib.contextmanager
    def _reading(self, adata: Any) -> Iterator[None]:
        """Read ``adata`` with its own settings (layer, raw) for the base's inference loop."""
        before = (self.layer, self.use_raw)
        self.layer, self.use_raw, _ = self._settings_of(adata)
        try:
            yield
        finally:
            self.layer, self.use_raw = before

    # ----------------------------------------------------------------- training
    def _split_members(self, validation_size: float) -> None:
        """Drop cells without counts (warning) and draw each member's validation cells."""
        for i, m in enumerate(self.members_):
            summary = check_counts(m.adata, m.layer, use_raw=m.use_raw, full=True)
            empty = summary.empty if summary.empty is not None else np.zeros(0, np.int64)
            pool = np.setdiff1d(np.arange(m.n_obs, dtype=np.int64), empty)
            if empty.size:
                warnings.warn(
                    f"{m.name}: {empty.size:,} cell(s) without counts are left out of pretraining",
                    UserWarning,
                    stacklevel=3,
                )
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, i, 0x5B17])
            n_val = round(validation_size * pool.size)
            if validation_size > 0 and pool.size > 1:
                n_val = min(max(n_val, 1), pool.size - 1)
            perm = rng.permutation(pool)
            m.validation = np.sort(perm[:n_val])
            m.train = np.sort(perm[n_val:])
        if sum(m.train.size for m in self.members_) == 0:
            raise ValueError("the corpus holds no cell with counts to pretrain on")

    # ----------------------------------------------------------------- inference
    def _adata_or_default(self, adata: Any | None) -> Any:
        """``adata``, else the one AnnData pretrained on (a corpus of several has none)."""
        members = getattr(self, "members_", None) or []
        if adata is None and len(members) > 1:
            raise ValueError(
                f"the model was trained on a corpus of {len(members)} AnnData: pass adata= "
                "(any AnnData with these genes)"
            )
        return super()._adata_or_default(adata)  # type: ignore[misc]
