"""The command line's light front: refuse bad files, columns and accelerators in a second.

Reading an ``.h5ad`` with anndata and importing torch, scvi-tools and Lightning takes many
seconds; a wrong ``--labels-key`` should not wait for them. These checks read only the
file's header with h5py (the ``obs`` / ``var`` column names, the layers, whether ``raw``
exists: no matrix, no column values) and say what is wrong in the library's own words
(:mod:`cellfm_sc._errors`). A file whose layout they do not recognise is left to the full
reader, which runs later anyway and remains the authority. The accelerator check imports
torch, nothing heavier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellfm_sc._errors import missing_column, missing_layer, missing_raw
from cellfm_sc.cli._console import CLIError, one_line
from cellfm_sc.cli._files import resume_checkpoint, writable_dir


@dataclass(frozen=True)
class H5adHeader:
    """What an ``.h5ad`` file holds, without its values."""

    path: Path
    obs_columns: tuple[str, ...]
    var_columns: tuple[str, ...]
    layers: tuple[str, ...]
    has_x: bool
    has_raw: bool
    raw_var_columns: tuple[str, ...]


def _columns(group: Any) -> tuple[str, ...]:
    order = group.attrs.get("column-order", ())
    if hasattr(order, "tolist"):
        order = order.tolist()
    if isinstance(order, str | bytes):
        order = [order]
    return tuple(c.decode() if isinstance(c, bytes) else str(c) for c in order)


def read_header(path: Path) -> H5adHeader | None:
    """The header of ``path``, or None when its layout is not the one anndata writes now.

    Raises
    ------
    CLIError
        ``path`` is not an HDF5 file at all.
    """
    import h5py

    if not h5py.is_hdf5(path):
        raise CLIError(f"cannot read {path} as an .h5ad file: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            obs, var = f.get("obs"), f.get("var")
            if not isinstance(obs, h5py.Group) or not isinstance(var, h5py.Group):
                return None  # an old layout (compound datasets): the full reader decides
            raw = f.get("raw")
            raw_var = raw.get("var") if isinstance(raw, h5py.Group) else None
            layers = f.get("layers")
            return H5adHeader(
                path=path,
                obs_columns=_columns(obs),
                var_columns=_columns(var),
                layers=tuple(layers.keys()) if isinstance(layers, h5py.Group) else (),
                has_x="X" in f,
                has_raw=isinstance(raw, h5py.Group),
                raw_var_columns=_columns(raw_var) if isinstance(raw_var, h5py.Group) else (),
            )
    except (OSError, KeyError, ValueError, TypeError):
        return None


def check_data_columns(
    header: H5adHeader | None,
    *,
    obs: dict[str, str | None] | None = None,
    layer: str | None = None,
    use_raw: bool | None = False,
    gene_symbols: str | None = None,
) -> None:
    """Refuse ``obs`` columns (keyword -> column), a layer, ``use_raw`` or a gene-symbols
    column that the file does not have; the messages name the keyword (the command line
    rewords ``labels_key='x'`` as ``--labels-key x``)."""
    if use_raw and layer is not None:
        raise CLIError("pass either --layer or --use-raw: the counts are in one of them")
    if header is None:
        return
    for keyword, column in (obs or {}).items():
        if column and column not in header.obs_columns:
            raise CLIError(missing_column(keyword, column, header.obs_columns, "adata.obs"))
    if use_raw and not header.has_raw:
        raise CLIError(missing_raw(header.layers))
    if layer is not None and layer not in header.layers:
        raise CLIError(missing_layer(layer, header.layers))
    if gene_symbols:
        where, columns = "adata.var", header.var_columns
        if use_raw:
            where, columns = "adata.raw.var", header.raw_var_columns + header.var_columns
        if gene_symbols not in columns:
            raise CLIError(missing_column("gene_symbols", gene_symbols, columns, where))


def check_split_json(path: str | None) -> None:
    """A ``--split-json`` file that is not JSON (or not an object) is refused at once."""
    if not path:
        return
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CLIError(f"split file {path} is not JSON: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CLIError(f"split file {path} must hold a JSON object, got {type(data).__name__}")


def check_hardware(
    accelerator: str | None = None, devices: Any = "auto", device: Any = None
) -> None:
    """``--accelerator`` / ``--devices`` (training) or ``--device`` (inference) that this
    machine lacks: a usage error now, before any data are read or a model is built."""
    from cellfm_sc._hardware import check_accelerator, check_device

    try:
        if accelerator is not None:
            check_accelerator(accelerator, devices)
        check_device(device)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def check_run_output(opts: dict[str, Any]) -> tuple[Path, Path | None]:
    """What a training command checks of its run before any work: ``--output-dir``
    (writable), the accelerator (present), with ``--resume`` the epoch checkpoint to continue
    from, and ``--checkpoint`` (a sound MindSpore checkpoint); returns ``(output directory,
    the epoch checkpoint or None)``."""
    out = writable_dir(opts["output_dir"], "--output-dir")
    check_hardware(opts.get("accelerator", "auto"), opts.get("devices", "auto"))
    resume_from = resume_checkpoint(out) if opts.get("resume") else None
    if opts.get("checkpoint"):
        from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint

        try:
            read_mindspore_checkpoint(opts["checkpoint"])
        except CheckpointError as exc:
            raise CLIError(f"--checkpoint is not a readable MindSpore checkpoint: {exc}") from exc
    return out, resume_from
