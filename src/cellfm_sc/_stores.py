"""Output files written while the results are computed (``.h5ad`` or ``.zarr``, anndata layout).

For atlases the embedding ``(n_cells, D)`` is too large to hold (8.6 GB for 1.4M x 1536 in
float32): :func:`output_store` creates the output in anndata's on-disk layout, the model
streams rows into an ``obsm`` dataset as it computes them, and the small elements (``obs``,
``uns``, probabilities) are written at the end. The file (or ``.zarr`` folder) appears at its
path only when complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellfm_sc._atomic import atomic_dir, atomic_path

__all__ = ["OutputStore", "output_store"]

_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
#: target bytes per chunk of a streamed dataset (rows x D x itemsize)
_CHUNK_BYTES = 1 << 20


class OutputStore:
    """An anndata file being written: ``obs`` first, streamed ``obsm`` datasets, the rest last."""

    def __init__(self, root: Any, n_obs: int) -> None:
        self.root = root
        self.n_obs = int(n_obs)

    def dense(self, key: str, width: int, dtype: str | np.dtype = "float32") -> Any:
        """A ``(n_obs, width)`` dataset ``obsm[key]`` (NaN until written) to stream into."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype("float32"), np.dtype("float16")):
            raise ValueError(f"dtype must be float32 or float16, got {dtype}")
        rows = max(1, min(self.n_obs, _CHUNK_BYTES // max(1, width * dtype.itemsize)))
        group = self.root["obsm"]
        shape, chunks = (self.n_obs, int(width)), (rows, int(width))
        if hasattr(group, "create_dataset") and not hasattr(group, "create_array"):  # h5py
            ds = group.create_dataset(
                key, shape=shape, dtype=dtype, chunks=chunks, fillvalue=np.nan
            )
        else:  # zarr
            ds = group.create_array(key, shape=shape, dtype=dtype, chunks=chunks, fill_value=np.nan)
        ds.attrs.update(_ARRAY_ATTRS)
        return ds

    def write(self, key: str, value: Any) -> None:
        """Write (or replace) an element: ``"obs"``, ``"uns"``, ``"obsm/<name>"``..."""
        from anndata.io import write_elem

        if key in self.root:
            del self.root[key]
        write_elem(self.root, key, value)


@contextlib.contextmanager
def output_store(
    path: str | Path, obs: Any, uns: dict[str, Any] | None = None
) -> Iterator[OutputStore]:
    """Create an ``.h5ad`` file or a ``.zarr`` folder holding ``obs`` (no count matrix).

    Yields an :class:`OutputStore`; when the block ends without error the output is moved
    into place (atomically), otherwise nothing is left.

    Examples
    --------
    >>> with output_store("out.h5ad", adata.obs) as store:  # doctest: +SKIP
    ...     model.get_latent_representation(adata, out=store.dense("X_cellfm", 1536))
    """
    import anndata as ad
    from anndata.io import write_elem

    target = Path(path)
    skeleton = ad.AnnData(obs=obs.copy())
    if uns:
        skeleton.uns.update(uns)
    if target.suffix == ".zarr":
        import zarr

        with atomic_dir(target, overwrite=True) as tmp:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            write_elem(root, "/", skeleton)
            yield OutputStore(root, skeleton.n_obs)
        return
    if target.suffix != ".h5ad":
        raise ValueError(f"the output must end in .h5ad or .zarr, got {target.name}")
    import h5py

    with atomic_path(target, suffix=".h5ad") as tmp:
        with h5py.File(tmp, "w", rdcc_nbytes=64 << 20) as f:
            write_elem(f, "/", skeleton)
            yield OutputStore(f, skeleton.n_obs)
