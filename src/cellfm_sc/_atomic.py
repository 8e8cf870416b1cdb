"""Atomic writes: every output file and folder appears whole or not at all (one home).

A file is written to a temporary name beside its target and renamed over it with
:func:`os.replace`; a folder is filled under a temporary name and renamed the same way.
Permissions follow the user's umask as a plain ``open`` would (files 644 and folders 755
with the usual umask 022), also for folders made by :func:`tempfile.mkdtemp` (700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cellfm_sc._json import to_plain

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "default_mode",
    "write_h5ad_atomic",
    "write_json_atomic",
]


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The caller writes the temporary file; when the ``with`` block exits without error the
    file is moved over ``path`` (atomic on POSIX when on one file system), otherwise it is
    removed. Parent folders are created. ``suffix`` ends the temporary name (for writers
    that insist on one, such as ``.h5ad``).

    Examples
    --------
    >>> with atomic_path(out_dir / "table.csv") as tmp:  # doctest: +SKIP
    ...     df.to_csv(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically.

    Examples
    --------
    >>> atomic_write(tmp_path / "note.txt", "hello\\n")  # doctest: +SKIP
    PosixPath('.../note.txt')
    """
    target = Path(path)
    with atomic_path(target) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return target


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (:func:`~cellfm_sc._json.to_plain`), atomically.

    Examples
    --------
    >>> write_json_atomic(out / "r.json", {"acc": np.float32(0.5)})  # doctest: +SKIP
    """
    text = json.dumps(to_plain(obj), indent=indent, allow_nan=False, default=str)
    return atomic_write(path, text + "\n")


def write_h5ad_atomic(adata: Any, path: str | os.PathLike[str]) -> Path:
    """``adata.write_h5ad`` through a temporary file beside ``path``."""
    target = Path(path)
    with atomic_path(target, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` on success.

    On error the temporary folder is removed and ``path`` is untouched. An existing
    ``path`` is an error unless ``overwrite``; then the old folder is removed only after the
    new one is in place.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True or another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        file_mode, dir_mode = default_mode(), default_mode(directory=True)
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), dir_mode)
            for name in files:
                os.chmod(os.path.join(root, name), file_mode)
        os.chmod(tmp, dir_mode)
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
