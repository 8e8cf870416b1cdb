"""Files of a run: input checks, ``.h5ad`` reading and writing, epoch checkpoints, and the
output-directory transaction."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cellfm_sc.cli._console import PROG, CLIError, Console, message_of, one_line

# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def existing_file(path: str | os.PathLike[str] | None, what: str) -> Path:
    if path is None:
        raise CLIError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if p.is_dir():
        raise CLIError(f"{what} is a directory, expected a file: {p}")
    return p


def existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if not p.is_dir():
        raise CLIError(f"{what} is not a directory: {p}")
    return p


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Prove that ``path`` (an existing folder, or one that can be created) takes files.

    Creates nothing: a missing folder is checked through its nearest existing parent, so a
    run refused later leaves nothing behind.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"{what} {p} exists and is not a directory")
    if p.is_dir():
        try:
            probe = p / f".cellfm_write_test.{os.getpid()}.{uuid.uuid4().hex[:6]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CLIError(f"{what} {p} is not writable: {exc.strerror or exc}") from exc
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {p} cannot be created: {parent} is not writable")
    return p


def writable_parent(path: str | os.PathLike[str], what: str) -> Path:
    """An output file whose folder exists (or can be made) and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{what} {p} is a directory, expected a file name")
    writable_dir(p.parent if str(p.parent) else Path("."), f"the folder of {what}")
    return p


def read_h5ad(path: Path, backed: bool = False) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"cannot read {path} as an .h5ad file: {one_line(exc)}") from exc


def without_scvi(obs: Any) -> Any:
    """``obs`` without the registry columns scvi-tools adds (``_scvi_labels``...)."""
    return obs.drop(columns=[c for c in obs.columns if str(c).startswith("_scvi")])


def drop_scvi_bookkeeping(adata: Any) -> None:
    """Remove the registry columns/keys scvi-tools adds (``_scvi_labels``, ``_scvi_uuid``...)."""
    adata.obs = without_scvi(adata.obs)
    for key in [k for k in adata.uns if str(k).startswith("_scvi")]:
        del adata.uns[key]


def obs_only(obs: Any, obsm: dict[str, Any], uns: dict[str, Any] | None = None) -> Any:
    """An AnnData with obs and obsm but no count matrix (``X`` is None, no var)."""
    import anndata as ad

    out = ad.AnnData(obs=without_scvi(obs).copy(), obsm=obsm)
    if uns:
        out.uns.update(uns)
    return out


def write_split_h5ads(
    adata: Any, model: Any, work: Path, obsm_keys: Sequence[str], uns_key: str
) -> dict[str, Path]:
    """``train.h5ad`` / ``validation.h5ad`` / ``test.h5ad`` in ``work``: each split's ``obs``
    with the ``obsm`` entries ``obsm_keys`` and ``uns[uns_key]``, no count matrix."""
    from cellfm_sc._atomic import write_h5ad_atomic

    files = {}
    for name, idx in (
        ("train", model.train_indices),
        ("validation", model.validation_indices),
        ("test", model.test_indices),
    ):
        if len(idx) == 0:
            continue
        part = obs_only(
            adata.obs.iloc[idx],
            {k: adata.obsm[k][idx] for k in obsm_keys},
            {uns_key: adata.uns.get(uns_key, {})},
        )
        files[f"{name}_h5ad"] = write_h5ad_atomic(part, work / f"{name}.h5ad")
    return files


# --------------------------------------------------------------------------------------------
# epoch checkpoints
# --------------------------------------------------------------------------------------------


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The ``checkpoint_epoch_N.pth`` of ``out_dir`` with the highest ``N``, or None."""
    from cellfm_sc._checkpoints import epoch_checkpoints

    found = epoch_checkpoints(out_dir)
    return found[-1][1] if found else None


def print_outputs(con: Console, out: Path, rows: Iterable[tuple[str, str]]) -> None:
    """The end of a training command's summary: the output directory, a line per file in it
    (``rows`` of ``(name, what it is)``) and one on the epoch checkpoints left in it."""
    from cellfm_sc._checkpoints import epoch_checkpoints

    con.result(f"output directory: {out}")
    for name, what in rows:
        con.result(f"  {name:<26} {what}")
    epochs = [n for n, _ in epoch_checkpoints(out)] if out.is_dir() else []
    if epochs:
        shown = ", ".join(map(str, epochs[:8])) + (" ..." if len(epochs) > 8 else "")
        con.result(
            f"  {'checkpoint_epoch_*.pth':<26} epoch(s) {shown} (--resume; --keep-checkpoints)"
        )


def resume_checkpoint(out: Path) -> Path:
    """``--resume``: the newest epoch checkpoint in ``out``, checked before any work.

    Raises
    ------
    CLIError
        No checkpoint, or one that is empty, truncated, corrupt or not an epoch checkpoint.
    """
    from cellfm_sc.io import CheckpointError
    from cellfm_sc.train import check_resume_file

    path = newest_checkpoint(out) if out.is_dir() else None
    if path is None:
        raise CLIError(f"--resume: no checkpoint_epoch_*.pth in {out} to continue from")
    try:
        check_resume_file(path)
    except CheckpointError as exc:
        raise CLIError(
            f"{exc}; delete it to resume from the epoch before, or start without --resume"
        ) from exc
    return path


# --------------------------------------------------------------------------------------------
# the output directory of a run
# --------------------------------------------------------------------------------------------


class RunDirectory:
    """A run's outputs appear in ``out`` whole, or not at all.

    Files are written into a temporary folder inside ``out`` (:attr:`work`) and moved into
    place when the run succeeds. When it fails, the temporary folder is removed and
    ``out/run.log`` says what failed. Completed ``checkpoint_epoch_N.pth`` files (each
    written atomically) are written straight into ``out`` so that ``--resume`` can continue
    a failed run.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.work = out / f".cellfm_run.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.started = time.time()

    @contextlib.contextmanager
    def transaction(self, argv: Sequence[str]) -> Iterator[RunDirectory]:
        from cellfm_sc._atomic import atomic_write, default_mode

        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir()
        try:
            yield self
        except BaseException as exc:
            shutil.rmtree(self.work, ignore_errors=True)
            lines = [
                f"{PROG} {' '.join(argv)}",
                f"failed after {time.time() - self.started:.0f} s: {type(exc).__name__}: "
                f"{message_of(exc)}",
                "",
                "".join(traceback.format_exception(exc)),
            ]
            with contextlib.suppress(OSError):
                atomic_write(self.out / "run.log", "\n".join(lines))
            raise
        for item in sorted(self.work.iterdir()):
            target = self.out / item.name
            if item.is_dir():
                os.chmod(item, default_mode(directory=True))
                if target.exists():
                    shutil.rmtree(target)
            os.replace(item, target)
        self.work.rmdir()
        with contextlib.suppress(OSError):
            (self.out / "run.log").unlink()
