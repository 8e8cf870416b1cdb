"""The inference engine every model class shares: evaluation batches over cells, the forward
pass into arrays or sinks (:class:`_BlockWriter`), the cls embedding."""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cellfm_sc.data import check_counts

__all__ = ["INFERENCE_ARGS", "InferenceMixin", "cls_embedding", "eval_loader", "inference_args"]

#: the inference settings every user method passes on unchanged (to ``_infer`` / ``_latent``)
INFERENCE_ARGS = (
    "batch_size",
    "device",
    "enable_progress_bar",
    "min_gene_coverage",
    "allow_untrained",
)


def inference_args(args: dict[str, Any]) -> dict[str, Any]:
    """The :data:`INFERENCE_ARGS` of ``args`` (a user method's ``locals()``)."""
    return {key: args[key] for key in INFERENCE_ARGS}


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


def eval_loader(
    adata: Any,
    idx: np.ndarray,
    batch_size: int,
    max_tokens: int,
    seed: int,
    gene_id_map: np.ndarray | None,
    num_workers: int = 0,
    pin_memory: bool = False,
    **reading: Any,
) -> Any:
    """Evaluation batches over cells ``idx``, bucketed by length, each cell once (a cell
    over ``max_tokens`` genes gets the draw of ``seed``); ``reading``: ``layer`` /
    ``use_raw``. The counts are not checked here: the caller checks them once, in full."""
    from cellfm_sc.data import make_dataloader

    return make_dataloader(
        adata,
        idx,
        batch_size,
        max_tokens=max_tokens,
        train=False,
        shuffle=False,
        seed=seed,
        gene_id_map=gene_id_map,
        bucket=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        check=False,
        **reading,
    )


def _progress(total: int, enable: bool) -> Any:
    """A tqdm bar over cells on stderr (disabled unless ``enable``)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enable, file=sys.stderr, unit="cells", desc="cells")


def cls_embedding(module: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """The forward of :meth:`InferenceMixin.get_latent_representation`: ``{"emb": (B, D)}``,
    the trunk's cls token (no head, no masking)."""
    return {"emb": module.trunk(batch.values, batch.gene_ids, batch.valid, return_hidden=False).cls}


class InferenceMixin:
    """The forward pass over cells (:meth:`_forward_cells`) and the cell embedding."""

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
            want = (len(idx), *shape)
            if key in sinks and tuple(sinks[key].shape) != want:
                raise ValueError(
                    f"the output for {key!r} has shape {tuple(sinks[key].shape)}, expected {want}"
                )
            arrays[key] = sinks[key] if key in sinks else np.full(want, np.nan, np.float32)
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
        loader = eval_loader(
            adata,
            idx,
            batch_size,
            self.max_tokens,
            self.seed,
            gene_id_map,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            **self._data_kwargs(),
        )
        for batch in loader:
            bar.update(len(batch))
            ok = (batch.n_tokens > 0).numpy()
            rows = order[np.searchsorted(sorted_idx, batch.obs_index.numpy())]
            if not ok.all():
                for writer in writers.values():  # NaN rows: written as they are
                    writer.write(rows[~ok], None)
                rows = rows[ok]
                if len(rows) == 0:
                    continue
                batch = batch._apply(operator.itemgetter(torch.from_numpy(ok)))
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

    def _reading(self, adata: Any) -> Any:
        """A context within which ``adata`` is read with the right settings (default: as
        the model was set up)."""
        return contextlib.nullcontext()

    def _forward_over(
        self,
        adata: Any | None,
        indices: Any,
        outputs: dict[str, tuple[int, ...]],
        forward: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]],
        *,
        sinks: dict[str, Any] | None = None,
        head: bool = True,
        num_workers: int = 0,
        **settings: Any,
    ) -> tuple[Any, np.ndarray, dict[str, Any]]:
        """:meth:`_forward_cells` over cells ``indices`` (see :meth:`_indices`) of ``adata``
        (default: the model's), read as :meth:`_reading` says; ``settings``: the
        :data:`INFERENCE_ARGS`. An untrained model is refused before any other complaint.
        Returns ``(adata, idx, outputs)``."""
        self._require_trained(settings["allow_untrained"], head=head)
        adata = self._adata_or_default(adata)
        idx = self._indices(adata, indices)
        with self._reading(adata):
            arrays = self._forward_cells(
                adata,
                idx,
                outputs=outputs,
                forward=forward,
                sinks=sinks,
                num_workers=num_workers,
                head=head,
                **settings,
            )
        return adata, idx, arrays

    def get_latent_representation(
        self,
        adata: Any | None = None,
        indices: Any = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        out: Any = None,
        num_workers: int = 0,
        allow_untrained: bool = False,
    ) -> Any:
        """Cell embeddings (the cls token, no masking), float32 ``(n_cells, D)``.

        ``adata`` defaults to the model's AnnData (a pretrainer's corpus of several needs
        ``adata=``); data set up with :meth:`setup_anndata` are read with their own settings,
        others with the model's. Query data with another gene set work as in
        :meth:`CellFMClassifier.predict <cellfm_sc.model.CellFMClassifier.predict>`.
        ``indices``: positions, a boolean mask, obs names or ``"train"`` / ``"validation"``
        / ``"test"``; default all. For atlases, pass ``out``: an array-like ``(n_cells, D)``
        (an h5py or zarr dataset, a numpy memmap, in float32 or float16) that the rows are
        written into as they are computed, so memory does not grow with the number of cells;
        ``out`` is returned. ``num_workers`` loader processes read and tokenise ahead of the
        model. A model never trained is refused
        (:class:`~cellfm_sc.model.UntrainedModelError`) unless its trunk is a pretrained
        checkpoint's with ``embedding_init="transfer"`` or ``allow_untrained=True`` (e.g. the
        random-start baseline's features).
        """
        _, _, arrays = self._forward_over(
            adata,
            indices,
            {"emb": (self.module.trunk.config.enc_dims,)},
            cls_embedding,
            sinks=None if out is None else {"emb": out},
            head=False,
            num_workers=num_workers,
            **inference_args(locals()),
        )
        return arrays["emb"]
