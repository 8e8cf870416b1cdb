"""Gene-name checks and text-file reading shared by the vocabulary, the mapping and the HGNC table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: entries named in an error message before "... (N in total)"
N_EXAMPLES = 5
#: bytes looked at for NUL bytes before a file is decoded as text
_SNIFF_BYTES = 8192


def is_missing(x: Any) -> bool:
    if x is None:
        return True
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def format_examples(items: Sequence[str], total: int) -> str:
    shown = ", ".join(items[:N_EXAMPLES])
    more = f", ... ({total} in total)" if total > min(len(items), N_EXAMPLES) else ""
    return shown + more


def validate_names(names: np.ndarray, *, what: str, allow_duplicates: bool) -> None:
    """Raise ``ValueError`` naming missing / empty / non-string / duplicated entries."""
    bad: list[str] = []
    n_bad = 0
    for pos, x in enumerate(names):
        if is_missing(x):
            problem = "missing (None/NaN)"
        elif not isinstance(x, str):
            problem = f"not a string ({type(x).__name__} {x!r})"
        elif not x.strip():
            problem = f"empty ({x!r})"
        elif "\n" in x or "\r" in x:
            problem = f"contains a line break ({x!r})"
        else:
            continue
        n_bad += 1
        if len(bad) < N_EXAMPLES:
            bad.append(f"position {pos}: {problem}")
    if n_bad:
        raise ValueError(
            f"{n_bad} invalid gene name(s) in {what}: {format_examples(bad, n_bad)}. "
            "Every gene needs a non-empty string symbol."
        )
    if allow_duplicates:
        return
    dup_mask = pd.Index(names).duplicated(keep=False)
    if dup_mask.any():
        positions = np.flatnonzero(dup_mask)
        groups: dict[str, list[int]] = {}
        for pos in positions:
            groups.setdefault(names[pos], []).append(int(pos))
        examples = [f"{name!r} at positions {pos}" for name, pos in groups.items()]
        raise ValueError(
            f"{len(groups)} duplicated gene name(s) in {what}: "
            f"{format_examples(examples, len(groups))}. Make them unique first "
            "(e.g. adata.var_names_make_unique()) or drop the duplicates."
        )


def as_object_array(names: Iterable[Any]) -> np.ndarray:
    if isinstance(names, str):
        raise TypeError("expected a sequence of gene names, got a single string")
    if isinstance(names, pd.Index | pd.Series):
        values = names.to_numpy(dtype=object)
    else:
        values = np.asarray(list(names), dtype=object)
    if values.ndim != 1:
        raise ValueError(f"gene names must be 1-D, got shape {values.shape}")
    # numpy string scalars -> plain str (pd.isna and isinstance checks stay simple)
    return np.array([str(x) if isinstance(x, np.str_) else x for x in values], dtype=object)


def strip_version(ids: Iterable[Any]) -> np.ndarray:
    """Ensembl ids without their ``.N`` version suffix; missing/empty -> ``None``."""
    out = []
    for x in ids:
        if is_missing(x) or not str(x).strip():
            out.append(None)
            continue
        s = str(x).strip()
        head, dot, tail = s.rpartition(".")
        out.append(head if dot and tail.isdigit() else s)
    return np.asarray(out, dtype=object)


def read_text(path: Path, what: str) -> str:
    """A whole UTF-8 text file (BOM stripped); clear errors for unusable files.

    Raises ``ValueError`` naming ``what`` and ``path`` for an empty, binary or non-UTF-8 file,
    and the ``OSError`` subclass of the failure, with a message naming them, when the file
    cannot be opened or read.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise type(err)(f"{what} {path} cannot be read: {reason}") from err
    if not data.strip():
        raise ValueError(f"{what} {path} is empty: it holds no gene symbols")
    zero = data.find(b"\x00", 0, _SNIFF_BYTES)
    hint = (
        "; is it a checkpoint (.ckpt) or another binary file passed by mistake? A vocabulary "
        "file holds one gene symbol per line, or is a CSV like CellFM's expand_gene_info.csv"
    )
    if zero >= 0:
        raise ValueError(f"{what} {path} is binary, not text (a NUL byte at offset {zero}){hint}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}){hint}"
        ) from None


def text_lines(text: str) -> list[str]:
    """Stripped lines of a one-symbol-per-line file, trailing blank lines dropped."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
