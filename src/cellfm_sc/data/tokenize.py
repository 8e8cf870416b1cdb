"""Sparse count rows -> padded token batches (:class:`~cellfm_sc.data.TokenBatch`), fully vectorised.

Every expressed gene of a cell (capped count > 0, see :mod:`.normalize`) is a token: the gene id
of its matrix column and its normalised value. Tokens are in ascending **gene id** order (with
the default gene-id map, ``column + 1``, that is the order of ``var_names``; with a map, a column
permutation of the same genes gives the same tokens). Columns whose gene id is 0 (genes the model
does not know) give no token, but their counts stay in the cell's total (:mod:`.genes` explains
why). A cell with more than ``max_tokens`` expressed genes keeps ``max_tokens`` of them, drawn
without replacement with probability proportional to ``log1p(capped count)`` by Gumbel top-k.

The Gumbel noise comes from a counter-based generator (splitmix64 over
``(cell key, gene id)`` in numpy ``uint64`` arithmetic), so each cell's draw is independent of the
rest of its batch, with no Python loop per cell:

- training (``train=True``): cell key from ``(seed, epoch, obs index)``; a fresh draw each epoch;
- evaluation: cell key from ``(seed, obs name)`` (a stable byte hash of the UTF-8 name, see
  :func:`~cellfm_sc.data.name_keys`), so a cell's tokens never depend on its batch, order or worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .normalize import cellfm_normalize

__all__ = ["DEFAULT_MAX_TOKENS", "TokenBatch", "name_keys", "tokenize", "train_keys"]

DEFAULT_MAX_TOKENS = 2048

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_TRAIN_DOMAIN = 0x7472_6169_6E00_0001  # distinct streams for training and evaluation keys
_EVAL_DOMAIN = 0x6576_616C_0000_0002
_NAME_CHUNK = 65_536


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
        return z ^ (z >> np.uint64(31))


def _u64(value: int) -> np.ndarray:
    return np.array([int(value) & _M64], dtype=np.uint64)


def name_keys(names: Sequence[str] | np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-cell evaluation keys from obs names: a stable hash of the UTF-8 bytes and ``seed``.

    Vectorised over cells (8 bytes of the names per step). Never uses Python's ``hash()``, so
    keys agree across processes, workers and sessions.

    Parameters
    ----------
    names
        ``(B,)`` obs names.
    seed
        The evaluation seed.

    Returns
    -------
    uint64 ``(B,)``.
    """
    names = np.asarray(names)
    if names.size > _NAME_CHUNK:  # bound the fixed-width string temporaries
        return np.concatenate(
            [name_keys(names[i : i + _NAME_CHUNK], seed) for i in range(0, names.size, _NAME_CHUNK)]
        )
    arr = names.astype(str)
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    try:
        raw = arr.astype(np.bytes_)
    except UnicodeEncodeError:
        raw = np.char.encode(arr, "utf-8")
    width = max(raw.dtype.itemsize, 1)
    padded = ((width + 7) // 8) * 8
    buf = np.zeros((arr.size, padded), dtype=np.uint8)
    buf[:, :width] = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(arr.size, width)
    words = buf.view("<u8")
    lengths = np.char.str_len(raw).astype(np.uint64)
    h = _mix(_mix(_u64(seed) ^ np.uint64(_EVAL_DOMAIN)) ^ lengths)
    for j in range(words.shape[1]):
        h = _mix(h ^ words[:, j])
    return h


def train_keys(obs_index: np.ndarray, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Per-cell training keys from ``(seed, epoch, obs index)``, uint64 ``(B,)``."""
    base = _mix(_mix(_u64(seed) ^ np.uint64(_TRAIN_DOMAIN)) ^ _u64(epoch))
    return _mix(base ^ np.asarray(obs_index, dtype=np.int64).astype(np.uint64))


def _uniform(keys: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) float64 per (key, column) pair."""
    z = _mix(keys ^ _mix(columns.astype(np.uint64)))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def _top_k_per_row(
    score: np.ndarray, r: np.ndarray, long_rows: np.ndarray, n_expr: np.ndarray, k: int
) -> np.ndarray:
    """Mask of the ``k`` largest ``score`` of every row (``r`` sorted; every row has > k).

    Scores are laid out in a padded ``(n_long, max_len)`` array and each row's k-th largest is
    found with ``np.partition`` (much faster than a global lexsort). Exact ties at the threshold
    (never seen with continuous Gumbel noise) fall back to a lexsort.
    """
    local = np.cumsum(long_rows)[r] - 1
    lens = n_expr[long_rows]
    starts = np.zeros(lens.size, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    pos = np.arange(r.size, dtype=np.int64) - starts[local]
    table = np.full((lens.size, int(lens.max())), -np.inf)
    table[local, pos] = score
    threshold = np.partition(table, -k, axis=1)[:, -k]
    keep = score >= threshold[local]
    if np.any(np.bincount(local, weights=keep, minlength=lens.size) != k):
        order = np.lexsort((-score, r))  # by row, then score descending
        r_sorted = r[order]
        rank = np.arange(order.size) - np.searchsorted(r_sorted, r_sorted, side="left")
        keep = np.zeros(r.size, dtype=bool)
        keep[order[rank < k]] = True
    return keep


@dataclass
class TokenBatch:
    """A padded batch of cells as gene tokens.

    Attributes
    ----------
    values
        float32 ``(B, L)``: normalised values ``log1p(c / T * 1e4)``; 0 at padding.
    gene_ids
        int64 ``(B, L)``: gene id of each token (``gene_id_map[column]``, default
        ``column + 1``); 0 at padding.
    valid
        bool ``(B, L)``: True for real tokens.
    n_tokens
        int64 ``(B,)``: real tokens per cell (0 for a cell without counts).
    obs_index
        int64 ``(B,)``: row of each cell in the AnnData.
    labels
        int64 ``(B,)`` label codes, or None.
    total_counts
        float32 ``(B,)``: capped total ``T`` of each cell (over all genes), or None.
    weight
        float32 ``(B,)``: weight of each cell in evaluation metrics; 1.0 for real cells, 0.0
        for the padding copies that even out distributed ranks (an evaluation loader with
        ``world_size > 1``). Default (None at construction): all ones.

    ``L`` is the longest cell of the batch (at most ``max_tokens``). Weighted metrics
    (``sum(weight * metric) / sum(weight)``, summed over ranks) count every cell exactly once;
    select with ``weight > 0`` rather than multiplying when a padding cell's output may be NaN.
    """

    values: torch.Tensor
    gene_ids: torch.Tensor
    valid: torch.Tensor
    n_tokens: torch.Tensor
    obs_index: torch.Tensor
    labels: torch.Tensor | None = None
    total_counts: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = torch.ones(self.values.shape[0], dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def _apply(self, fn: Any) -> TokenBatch:
        return TokenBatch(
            **{
                f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                for f in fields(self)
            }
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        """A new batch with every tensor moved to ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TokenBatch:
        """A new batch in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._apply(lambda t: t.pin_memory())


def tokenize(
    rows: Any,
    obs_index: np.ndarray,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
    obs_names: Sequence[str] | np.ndarray | None = None,
    cell_keys: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    gene_id_map: np.ndarray | None = None,
) -> TokenBatch:
    """Normalise and tokenise count rows into a padded :class:`~cellfm_sc.data.TokenBatch`.

    Parameters
    ----------
    rows
        ``(B, n_vars)`` counts, scipy sparse (CSR preferred) or dense; every gene of the cell
        (the totals of the normalisation are over all of them).
    obs_index
        Int ``(B,)``: AnnData row of each cell (returned in the batch; the training key).
    max_tokens
        Most tokens per cell.
    train
        Training draw (key from seed, epoch, obs index) or evaluation draw (key from seed,
        obs name).
    seed, epoch
        Seeds of the draw.
    obs_names
        ``(B,)`` obs names for evaluation keys; without them (and without ``cell_keys``) the
        evaluation key uses ``obs_index``.
    cell_keys
        uint64 ``(B,)`` precomputed keys (overrides the above), e.g. from :func:`~cellfm_sc.data.name_keys`.
    labels
        ``(B,)`` int label codes of these cells, or None.
    gene_id_map
        int64 ``(n_vars,)``: gene id of each column; default ``column + 1``. A column with id
        0 (a gene the model does not know, see :func:`~cellfm_sc.data.align_genes`) gives no
        token but its counts stay in the cell's total ``T``.

    Returns
    -------
    TokenBatch with ``L = max(n_tokens)``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    csr = rows.tocsr() if sp.issparse(rows) else sp.csr_matrix(np.asarray(rows))
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    n_rows = csr.shape[0]
    obs_index = np.asarray(obs_index, dtype=np.int64)
    if obs_index.shape != (n_rows,):
        raise ValueError(f"obs_index has shape {obs_index.shape}, expected ({n_rows},)")

    # totals over every column, also those without a gene id (see the module notes)
    norm = cellfm_normalize(csr.data, csr.indptr)
    keep = norm.counts > 0
    if gene_id_map is not None:
        gene_id_map = _checked_gene_ids(gene_id_map, csr.shape[1])
        keep &= gene_id_map[csr.indices] > 0  # genes the model does not know: no token
    row, col = norm.row[keep], csr.indices[keep].astype(np.int64)
    values, counts = norm.values[keep], norm.counts[keep]
    n_expr = np.bincount(row, minlength=n_rows)
    if gene_id_map is None:
        gid = col + 1
    else:
        gid = gene_id_map[col]
        # tokens in ascending gene-id order, so a column permutation of the same genes
        # gives the same tokens in the same order
        order = np.lexsort((gid, row))
        row, col, gid, values, counts = (
            row[order],
            col[order],
            gid[order],
            values[order],
            counts[order],
        )

    long_rows = n_expr > max_tokens
    if long_rows.any():
        keys = _cell_keys(obs_index, train, seed, epoch, obs_names, cell_keys)
        selected = _draw_tokens(row, gid, counts, long_rows, n_expr, max_tokens, keys)
        row, gid, values = row[selected], gid[selected], values[selected]
    n_tokens = np.minimum(n_expr, max_tokens).astype(np.int64)
    values_, ids, valid = _padded(row, gid, values, n_tokens)
    return TokenBatch(
        values=values_,
        gene_ids=ids,
        valid=valid,
        n_tokens=torch.from_numpy(n_tokens),
        obs_index=torch.from_numpy(obs_index.copy()),
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        total_counts=torch.from_numpy(norm.totals.astype(np.float32)),
    )


def _checked_gene_ids(gene_id_map: np.ndarray, n_cols: int) -> np.ndarray:
    """``gene_id_map`` as int64 ``(n_cols,)``; ``ValueError`` for a wrong shape or negative id."""
    gene_id_map = np.asarray(gene_id_map, dtype=np.int64)
    if gene_id_map.shape != (n_cols,):
        raise ValueError(
            f"gene_id_map has shape {gene_id_map.shape}, expected ({n_cols},) "
            "(one gene id per matrix column)"
        )
    if gene_id_map.size and gene_id_map.min() < 0:
        raise ValueError("gene_id_map holds negative ids (0 = column without a gene id)")
    return gene_id_map


def _cell_keys(
    obs_index: np.ndarray,
    train: bool,
    seed: int,
    epoch: int,
    obs_names: Sequence[str] | np.ndarray | None,
    cell_keys: np.ndarray | None,
) -> np.ndarray:
    """uint64 ``(B,)``: the key of each cell's draw (see :func:`tokenize`)."""
    if cell_keys is not None:
        return np.asarray(cell_keys, dtype=np.uint64)
    if train:
        return train_keys(obs_index, seed, epoch)
    if obs_names is not None:
        return name_keys(np.asarray(obs_names), seed)
    return _mix(_mix(_u64(seed) ^ np.uint64(_EVAL_DOMAIN)) ^ obs_index.astype(np.uint64))


def _draw_tokens(
    row: np.ndarray,
    gid: np.ndarray,
    counts: np.ndarray,
    long_rows: np.ndarray,
    n_expr: np.ndarray,
    max_tokens: int,
    keys: np.ndarray,
) -> np.ndarray:
    """bool over the tokens: ``max_tokens`` of every longer cell, drawn by ``log1p(count)``."""
    cand = np.flatnonzero(long_rows[row])
    r = row[cand]
    u = _uniform(keys[r], gid[cand])  # keyed by gene id: independent of column order
    score = np.log(np.log1p(counts[cand])) - np.log(-np.log(u))
    keep_cand = _top_k_per_row(score, r, long_rows, n_expr, max_tokens)
    selected = np.ones(row.size, dtype=bool)
    selected[cand[~keep_cand]] = False
    return selected


def _padded(
    row: np.ndarray, gid: np.ndarray, values: np.ndarray, n_tokens: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, gene_ids, valid)``, each ``(B, max(n_tokens))``, from row-sorted tokens."""
    n_rows = n_tokens.shape[0]
    length = int(n_tokens.max()) if n_rows else 0
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(n_tokens, out=starts[1:])
    pos = np.arange(row.size, dtype=np.int64) - starts[row]
    out_values = np.zeros((n_rows, length), dtype=np.float32)
    out_ids = np.zeros((n_rows, length), dtype=np.int64)
    out_valid = np.zeros((n_rows, length), dtype=bool)
    out_values[row, pos] = values
    out_ids[row, pos] = gid
    out_valid[row, pos] = True
    return torch.from_numpy(out_values), torch.from_numpy(out_ids), torch.from_numpy(out_valid)
