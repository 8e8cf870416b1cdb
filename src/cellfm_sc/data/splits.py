"""Train / validation / test splits: by donor, stratified by cell label, from obs, from JSON.

Sizes (``test_size``, ``validation_size``) are fractions of the units being split (donors for
:func:`split_by_donor`, cells for :func:`split_stratified`), or counts when given as ints >= 1.
A non-zero size gives at least one unit. Stratification is systematic: units are ordered by
their (random) rank within their stratum divided by the stratum size, so every prefix of that
order holds each stratum in proportion; test takes the first units, validation the next.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._obs import obs_column

__all__ = [
    "DataSplit",
    "check_donors_disjoint",
    "donor_labels",
    "split_by_donor",
    "split_from_json",
    "split_from_obs",
    "split_stratified",
]

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
    "testing": "test",
}


@dataclass
class DataSplit:
    """Obs rows of each split.

    Attributes
    ----------
    train, validation, test
        Sorted int64 arrays of AnnData rows (disjoint).
    donor_key
        The obs column of donors, or None.
    donors
        ``{"train": names, "validation": names, "test": names}`` donor names per split (object
        arrays), or None without a donor column.
    labels_key
        The obs column of labels used for stratification, or None.

    Examples
    --------
    >>> split = split_by_donor(adata, "Donor ID", labels_key="ADNC")  # doctest: +SKIP
    >>> len(split.train), sorted(split.donors["test"])[:3]  # doctest: +SKIP
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    donor_key: str | None = None
    donors: dict[str, np.ndarray] | None = None
    labels_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SPLITS:
            setattr(self, name, np.sort(np.asarray(getattr(self, name), dtype=np.int64).ravel()))
        seen: dict[int, str] = {}
        for name in SPLITS:
            arr = getattr(self, name)
            if np.unique(arr).size != arr.size:
                raise ValueError(f"split {name!r} lists a cell more than once")
            for other, other_arr in ((k, getattr(self, k)) for k in seen.values()):
                both = np.intersect1d(arr, other_arr)
                if both.size:
                    raise ValueError(
                        f"{both.size} cell(s) are in both {other!r} and {name!r} "
                        f"(first row {int(both[0])})"
                    )
            seen[len(seen)] = name

    def sizes(self) -> dict[str, int]:
        """Number of cells per split."""
        return {name: int(getattr(self, name).size) for name in SPLITS}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise KeyError(f"no split {name!r}; splits are {SPLITS}")
        return getattr(self, name)


def donor_labels(donors: pd.Series | np.ndarray, labels: pd.Series | np.ndarray) -> pd.Series:
    """The label of each donor, checking that all cells of a donor share it.

    Parameters
    ----------
    donors, labels
        ``(n_cells,)`` donor and label of every cell.

    Returns
    -------
    Series indexed by donor, the donor's label.

    Raises
    ------
    ValueError
        Naming every donor whose cells carry more than one label, with those labels.
    """
    frame = pd.DataFrame({"donor": np.asarray(donors), "label": np.asarray(labels)})
    per = frame.groupby("donor", sort=True, observed=True)["label"].unique()
    mixed = per[per.map(len) > 1]
    if len(mixed):
        shown = "; ".join(
            f"donor {d!r} has labels {sorted(map(str, v))}" for d, v in mixed.head(5).items()
        )
        more = f" (and {len(mixed) - 5} more donors)" if len(mixed) > 5 else ""
        raise ValueError(
            f"the labels do not belong to donors: {shown}{more}. Stratifying donors by label "
            "needs one label per donor; pass labels_key=None to split donors without "
            "stratification, or fix the labels."
        )
    return per.map(lambda v: v[0])


def check_donors_disjoint(split: DataSplit, donors: pd.Series | np.ndarray) -> None:
    """Raise ``ValueError`` naming a donor whose cells are in two splits.

    Parameters
    ----------
    split
        The split.
    donors
        ``(n_obs,)`` donor of every AnnData row.
    """
    donors = np.asarray(donors)
    where: dict[Any, str] = {}
    for name in SPLITS:
        for d in pd.unique(donors[split[name]]):
            if d in where:
                raise ValueError(
                    f"donor {d!r} is in two splits ({where[d]!r} and {name!r}); "
                    "all cells of a donor must be in one split"
                )
            where[d] = name


def _n_units(size: float, n: int, what: str) -> int:
    if size < 0:
        raise ValueError(f"{what} must be >= 0, got {size}")
    if isinstance(size, int | np.integer) and size >= 1:
        k = int(size)
    elif size < 1:
        k = round(size * n)
        if size > 0:
            k = max(k, 1)
    else:
        raise ValueError(f"{what} must be a fraction in [0, 1) or a count, got {size}")
    return k


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order of units such that every prefix holds each stratum in proportion."""
    n = strata.size
    codes, _ = pd.factorize(strata, sort=True)
    u = rng.random(n)
    order = np.lexsort((u, codes))
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n) - first
    group_size = np.bincount(codes)[codes]
    offset = rng.random(int(codes.max()) + 1)[codes] if n else np.empty(0)
    frac = (rank + offset) / group_size
    return np.lexsort((u, frac))


def _assign(
    strata: np.ndarray, test_size: float, validation_size: float, seed: int, what: str
) -> dict[str, np.ndarray]:
    """Positions of the units (``strata (n,)``, one stratum each) in each split, stratified:
    ``{"test", "validation", "train"}``."""
    n = strata.size
    n_test = _n_units(test_size, n, "test_size")
    n_val = _n_units(validation_size, n, "validation_size")
    if n_test + n_val >= n:
        raise ValueError(
            f"{n} {what} cannot be split into {n_test} test, {n_val} validation and at least one "
            "training unit; lower test_size / validation_size"
        )
    order = _stratified_order(strata, np.random.default_rng(seed))
    return {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }


def split_by_donor(
    adata: Any,
    donor_key: str,
    labels_key: str | None = None,
    test_size: float = 0.2,
    validation_size: float = 0.1,
    seed: int = 0,
) -> DataSplit:
    """Split whole donors into train / validation / test.

    Parameters
    ----------
    adata
        AnnData (only ``obs`` is read).
    donor_key
        obs column of donors.
    labels_key
        obs column of a label that belongs to donors (e.g. ADNC); donors are stratified by it.
        Every cell of a donor must carry the donor's label.
    test_size, validation_size
        Fractions (or counts) of donors.
    seed
        Seed of the assignment.

    Returns
    -------
    DataSplit with ``donors`` per split.

    Raises
    ------
    ValueError
        Missing donors or labels (NaN, with the count), a donor with two labels (naming it),
        too few donors.
    """
    donors = obs_column(adata, donor_key, keyword="donor_key").astype(str).to_numpy()
    unique_donors = np.unique(donors)
    if labels_key is not None:
        labels = obs_column(adata, labels_key, keyword="labels_key")
        per_donor = donor_labels(donors, labels.astype(str).to_numpy())
        strata = per_donor.loc[unique_donors].to_numpy()
    else:
        strata = np.zeros(unique_donors.size, dtype=np.int64)
    parts = _assign(strata, test_size, validation_size, seed, "donors")
    chosen = {k: unique_donors[v] for k, v in parts.items()}
    idx = {k: np.flatnonzero(np.isin(donors, v)) for k, v in chosen.items()}
    split = DataSplit(
        **idx,
        donor_key=donor_key,
        donors={k: np.sort(v).astype(object) for k, v in chosen.items()},
        labels_key=labels_key,
    )
    check_donors_disjoint(split, donors)
    return split


def split_stratified(
    adata: Any,
    labels_key: str | None = None,
    test_size: float = 0.2,
    validation_size: float = 0.1,
    seed: int = 0,
) -> DataSplit:
    """Split cells (no donors) into train / validation / test, stratified by label.

    Parameters
    ----------
    adata
        AnnData (only ``obs`` is read).
    labels_key
        obs column to stratify by (None: a plain random split).
    test_size, validation_size
        Fractions (or counts) of cells.
    seed
        Seed of the assignment.
    """
    n = adata.n_obs
    if labels_key is not None:
        strata = obs_column(adata, labels_key, keyword="labels_key").astype(str).to_numpy()
    else:
        strata = np.zeros(n, dtype=np.int64)
    return DataSplit(
        **_assign(strata, test_size, validation_size, seed, "cells"), labels_key=labels_key
    )


def split_from_obs(adata: Any, split_key: str, donor_key: str | None = None) -> DataSplit:
    """Split from a user obs column with values train / validation / test.

    Accepted spellings (case-insensitive): ``train``/``training``, ``validation``/``valid``/
    ``val``, ``test``/``testing``.

    Parameters
    ----------
    adata
        AnnData (only ``obs`` is read).
    split_key
        obs column naming each cell's split.
    donor_key
        Optional obs column of donors; a donor in two splits is then an error.

    Examples
    --------
    >>> split = split_from_obs(adata, "split")  # doctest: +SKIP
    >>> model.train(split=split)  # doctest: +SKIP
    """
    col = obs_column(adata, split_key, keyword="split_key").astype(str)
    norm = col.str.strip().str.lower().map(_SPLIT_ALIASES)
    if norm.isna().any():
        bad = sorted(pd.unique(col[norm.isna()]))[:10]
        raise ValueError(
            f"split column {split_key!r} has values {bad} that are not train / validation / test"
        )
    values = norm.to_numpy()
    split = DataSplit(
        **{name: np.flatnonzero(values == name) for name in SPLITS}, info={"split_key": split_key}
    )
    if donor_key is not None:
        donors = obs_column(adata, donor_key, keyword="donor_key").astype(str).to_numpy()
        check_donors_disjoint(split, donors)
        split.donor_key = donor_key
        split.donors = {k: np.unique(donors[split[k]]).astype(object) for k in SPLITS}
    return split


def _resolve_indices(values: list[Any], adata: Any, key: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() >= adata.n_obs:
            raise ValueError(
                f"{key} holds row positions outside [0, {adata.n_obs}) for this AnnData "
                f"(min {arr.min()}, max {arr.max()}); is it the AnnData the split was made for?"
            )
        return arr.astype(np.int64)
    pos = adata.obs_names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        missing = arr[pos < 0]
        raise ValueError(
            f"{key} names {missing.size} cell(s) not in adata.obs_names, e.g. {missing[:3].tolist()}"
        )
    return pos.astype(np.int64)


def split_from_json(path: str | Path, adata: Any) -> DataSplit:
    """Read a split file of the original scripts.

    The JSON holds ``train_indices`` and ``test_indices`` (row positions, or obs names),
    optionally ``val_indices`` / ``validation_indices``, ``donor_col`` (obs column of donors:
    a donor in two splits is an error) and ``adnc_col`` (obs column of the label, kept as
    ``labels_key``).

    Parameters
    ----------
    path
        The JSON file.
    adata
        The AnnData the indices refer to.

    Examples
    --------
    >>> split = split_from_json("donor_split.json", adata)  # doctest: +SKIP
    >>> len(split.train), len(split.test)  # doctest: +SKIP
    """
    with open(path) as fh:
        spec = json.load(fh)
    for key in ("train_indices", "test_indices"):
        if key not in spec:
            raise ValueError(f"split file {path} has no {key!r} (keys: {sorted(spec)})")
    val_key = next((k for k in ("validation_indices", "val_indices") if k in spec), None)
    split = DataSplit(
        train=_resolve_indices(spec["train_indices"], adata, "train_indices"),
        validation=_resolve_indices(spec[val_key], adata, val_key) if val_key else [],
        test=_resolve_indices(spec["test_indices"], adata, "test_indices"),
        labels_key=spec.get("adnc_col"),
        info={"path": str(path)},
    )
    donor_key = spec.get("donor_col")
    if donor_key:
        donors = obs_column(adata, donor_key, keyword="donor_key").astype(str).to_numpy()
        check_donors_disjoint(split, donors)
        split.donor_key = donor_key
        split.donors = {k: np.unique(donors[split[k]]).astype(object) for k in SPLITS}
    return split
