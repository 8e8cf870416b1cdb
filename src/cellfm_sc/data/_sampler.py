"""The batch sampler: batches of obs indices, shuffled in chunks, length-bucketed, per rank."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BUCKET_BATCHES", "CellBatchSampler"]


#: Default bucketing window, in batches: ``bucket_size = BUCKET_BATCHES * batch_size`` cells.
BUCKET_BATCHES = 32


class CellBatchSampler(Sampler):
    """Yields batches of obs indices (int64 arrays), one per batch; one pass per epoch.

    Without shuffling, batches follow the order of ``indices``. With shuffling (per epoch,
    seeded by ``(seed, epoch)``): the indices are sorted, cut into chunks of ``chunk_size``
    consecutive rows, the chunks are permuted, and rows are permuted within consecutive buffers
    of ``buffer_size`` rows; so a batch comes from a few chunks and backed reads stay mostly
    sequential.

    Length bucketing (``lengths`` given): the stream of cells is cut into windows of
    ``bucket_size`` cells, the cells of each window are sorted by length (token count), and the
    batches are cut from the sorted windows, so a batch holds cells of similar length and is
    padded little. When shuffling, the batches of the epoch are then permuted (across and
    within windows), so batch lengths do not follow a pattern. Without shuffling (evaluation)
    the order is deterministic but no longer that of ``indices``: write results back through
    each batch's ``obs_index``.

    Parameters
    ----------
    indices
        Int ``(n,)`` obs rows to draw from.
    batch_size
        Cells per batch (the last batch may be smaller unless ``drop_last``).
    shuffle
        Shuffle every epoch.
    seed
        Seed of the shuffle.
    chunk_size, buffer_size
        Shuffle granularity (rows), see above.
    lengths
        Optional ``(n,)`` per-cell token counts (or nnz) aligned with ``indices``; enables
        length bucketing.
    bucket_size
        Cells per bucketing window, rounded up to a multiple of ``batch_size``. Default
        ``BUCKET_BATCHES * batch_size`` (32 batches): the padding left inside a batch falls
        like ``batch_size / bucket_size`` of the spread of lengths, so 32 batches per window
        leave a few percent, while a window stays a small, re-drawn slice of the epoch (batch
        mates change every epoch). The benchmarks page of the documentation gives the measured
        padding.
    rank, world_size
        Distributed position; every rank gets ``len(self)`` batches, and the ranks' cells are
        disjoint apart from the padding that evens out the batch counts (see ``exact``).
    drop_last
        Drop the last incomplete batch (and, distributed, the batches that do not fill a round).
    exact
        Evaluation mode (every cell counts exactly once): ranks are evened out with one-cell
        padding batches of weight 0 instead of repeats of real batches (see
        :meth:`iter_weighted`); needs ``drop_last=False``. Without it (training), padding
        repeats the epoch's first batches with weight 1, as ``DistributedSampler`` does.
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int = 16,
        shuffle: bool = False,
        seed: int = 0,
        chunk_size: int = 64,
        buffer_size: int = 2048,
        lengths: np.ndarray | None = None,
        bucket_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        exact: bool = False,
    ):
        self.indices = np.asarray(indices, dtype=np.int64).ravel()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if exact and drop_last:
            raise ValueError(
                "exact=True (evaluation: every cell counted once) cannot drop cells; "
                "use drop_last=False"
            )
        if lengths is not None:
            lengths = np.asarray(lengths).ravel()
            if lengths.shape != self.indices.shape:
                raise ValueError(
                    f"lengths has shape {lengths.shape}, expected {self.indices.shape} "
                    "(one per index)"
                )
        if bucket_size is None:
            bucket_size = BUCKET_BATCHES * batch_size
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.lengths = lengths
        self.batch_size = int(batch_size)
        self.bucket_size = math.ceil(int(bucket_size) / self.batch_size) * self.batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.chunk_size = max(1, int(chunk_size))
        self.buffer_size = max(1, int(buffer_size))
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.exact = bool(exact)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (changes the shuffle)."""
        self.epoch = int(epoch)

    def _n_global(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        nb = self._n_global()
        if self.world_size == 1:
            return nb
        return nb // self.world_size if self.drop_last else math.ceil(nb / self.world_size)

    def global_batches(self) -> list[np.ndarray]:
        """All batches of this epoch, before the split across ranks (positions as obs rows)."""
        n = self.indices.size
        pos = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        if self.shuffle and n:
            order = np.argsort(self.indices, kind="stable")
            chunk_of = pos // self.chunk_size
            chunk_rank = np.argsort(rng.permutation(int(chunk_of[-1]) + 1))
            stream = order[np.argsort(chunk_rank[chunk_of], kind="stable")]
            stream = stream[np.lexsort((rng.random(n), pos // self.buffer_size))]
        else:
            stream = pos
        if self.lengths is not None and n:
            # sort by length inside each window (ties keep the stream order)
            stream = stream[np.lexsort((self.lengths[stream], pos // self.bucket_size))]
        n_b = self._n_global()
        out = [
            self.indices[stream[i * self.batch_size : (i + 1) * self.batch_size]]
            for i in range(n_b)
        ]
        if self.shuffle and self.lengths is not None and n_b:
            out = [out[i] for i in rng.permutation(n_b)]
        return out

    def iter_weighted(self) -> Iterator[tuple[np.ndarray, float]]:
        """Yield ``(rows, weight)`` for this rank: ``weight`` is 1.0 for real batches, 0.0 for
        the padding batches of ``exact`` mode (a copy of one cell, to be left out of metrics;
        the shortest non-empty cell when ``lengths`` are known).
        """
        batches_ = self.global_batches()
        if self.world_size == 1:
            for rows in batches_:
                yield rows, 1.0
            return
        n_b = len(batches_)
        total = len(self) * self.world_size
        for i in range(self.rank, total, self.world_size):
            if i < n_b:
                yield batches_[i], 1.0
            elif self.exact:
                yield self._padding_cell(batches_), 0.0
            else:
                yield batches_[i % n_b], 1.0

    def _padding_cell(self, batches_: list[np.ndarray]) -> np.ndarray:
        """The one cell of an ``exact`` padding batch: the shortest cell with a token when
        lengths are known (cheapest to run, and never a cell without counts), else the first."""
        if self.lengths is not None:
            pos = np.flatnonzero(self.lengths > 0)
            if pos.size:
                return self.indices[[pos[np.argmin(self.lengths[pos])]]]
        return batches_[0][:1]

    def __iter__(self) -> Iterator[np.ndarray]:
        for rows, _ in self.iter_weighted():
            yield rows
