"""Length bucketing and exact distributed evaluation: one pass per epoch, weights, same tokens."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellfm_sc.data import BUCKET_BATCHES, CellBatchSampler, TokenBatch, batches, make_dataloader


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    return ad.read_h5ad(pbmc3k_path)


def _rank_outputs(make, world_size: int, epoch: int) -> list[list[tuple[np.ndarray, float]]]:
    out = []
    for rank in range(world_size):
        s = make(rank)
        s.set_epoch(epoch)
        got = list(s.iter_weighted())
        assert len(got) == len(s)
        # the plain iterator yields the same rows
        assert all(np.array_equal(a, b) for (a, _), b in zip(got, s))
        out.append(got)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 157),
    batch_size=st.integers(1, 13),
    world_size=st.integers(1, 4),
    shuffle=st.booleans(),
    bucket=st.booleans(),
    bucket_size=st.one_of(st.none(), st.integers(1, 60)),
    train=st.booleans(),
    epoch=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_every_cell_once_per_epoch(
    n, batch_size, world_size, shuffle, bucket, bucket_size, train, epoch, seed
):
    rng = np.random.default_rng(seed)
    idx = rng.choice(10 * n + 1, size=n, replace=False)
    lengths = rng.integers(0, 50, size=n) if bucket else None

    def make(rank):
        return CellBatchSampler(
            idx,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            chunk_size=4,
            buffer_size=16,
            lengths=lengths,
            bucket_size=bucket_size,
            rank=rank,
            world_size=world_size,
            exact=not train,
        )

    per_rank = _rank_outputs(make, world_size, epoch)
    assert len({len(p) for p in per_rank}) == 1  # every rank steps the same number of times
    flat = [(rows, w) for p in per_rank for rows, w in p]
    total = {int(i): 0.0 for i in idx}
    seen = {int(i): 0 for i in idx}
    for rows, w in flat:
        assert 1 <= rows.size <= batch_size
        for cell in rows.tolist():
            total[cell] += w
            seen[cell] += 1
    # real batches (weight 1): every cell exactly once, over the union of the ranks
    real = np.concatenate([rows for rows, w in flat if w == 1.0] or [np.empty(0, np.int64)])
    n_global = -(-n // batch_size)
    if not train:
        assert np.array_equal(np.sort(real), np.sort(idx))
        assert all(v == 1.0 for v in total.values())  # each obs index has total weight 1
        assert sum(total.values()) == n  # weighted count = number of distinct cells
        assert all(w == 0.0 and rows.size == 1 for rows, w in flat if w != 1.0)
    else:
        assert all(w == 1.0 for _, w in flat)
        assert set(seen) == {int(i) for i in idx} and min(seen.values(), default=1) >= 1
        # repeats come only from the padding batches that even out the ranks
        n_pad = len(per_rank[0]) * world_size - n_global
        assert sum(seen.values()) - n <= n_pad * batch_size
        if world_size == 1:
            assert all(v == 1 for v in seen.values())
    # at most one batch of the epoch is short
    sizes = [rows.size for rows, w in flat if w == 1.0]
    if not train or world_size == 1:
        assert sum(s < batch_size for s in sizes) <= 1


@given(n=st.integers(1, 200), batch_size=st.integers(1, 9), world_size=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_drop_last_training_ranks_are_disjoint(n, batch_size, world_size):
    idx = np.arange(n) * 3
    lengths = (idx * 7919) % 101
    per_rank = _rank_outputs(
        lambda r: CellBatchSampler(
            idx,
            batch_size,
            shuffle=True,
            lengths=lengths,
            rank=r,
            world_size=world_size,
            drop_last=True,
        ),
        world_size,
        epoch=1,
    )
    cells = np.concatenate([rows for p in per_rank for rows, _ in p] or [np.empty(0, np.int64)])
    assert np.unique(cells).size == cells.size
    assert all(rows.size == batch_size for p in per_rank for rows, _ in p)
    assert n - cells.size < batch_size * world_size


def test_exact_padding_uses_the_shortest_cell_with_tokens():
    lengths = np.array([0, 5, 3, 0, 9, 7, 4])
    s = CellBatchSampler(np.arange(10, 17), 2, lengths=lengths, rank=1, world_size=3, exact=True)
    got = list(s.iter_weighted())  # 4 batches over 3 ranks: rank 1 gets batch 1 and a pad
    assert [w for _, w in got] == [1.0, 0.0]
    assert got[1][0].tolist() == [12]  # length 3: the shortest cell that has tokens


def test_exact_refuses_drop_last():
    with pytest.raises(ValueError, match="drop_last=False"):
        CellBatchSampler(np.arange(10), 3, exact=True, drop_last=True)


def test_windows_are_sorted_by_length_in_evaluation_order():
    rng = np.random.default_rng(0)
    idx = np.arange(1000)
    lengths = rng.integers(1, 2048, size=idx.size)
    s = CellBatchSampler(idx, 8, lengths=lengths, bucket_size=100)  # rounded up to 104
    assert s.bucket_size == 104
    flat = np.concatenate(list(s))
    for start in range(0, idx.size, 104):
        window = flat[start : start + 104]
        # the same cells as the unbucketed window, sorted by length (ties in input order)
        assert np.array_equal(np.sort(window), idx[start : start + 104])
        assert np.all(np.diff(lengths[window]) >= 0)
    assert CellBatchSampler(idx, 8).bucket_size == BUCKET_BATCHES * 8


def test_shuffled_bucketing_mixes_batches_across_windows():
    # lengths grow with the index and the stream is sorted (one chunk, one buffer per window
    # of cells): without the global shuffle of batches, the epoch would march through windows
    idx = np.arange(4096)
    s = CellBatchSampler(
        idx,
        16,
        shuffle=True,
        lengths=idx.copy(),
        bucket_size=512,
        chunk_size=512,
        buffer_size=512,
        seed=1,
    )
    got = list(s)
    maxima = np.array([b.max() for b in got])
    # the first 32 batches (one window's worth) come from many windows
    assert np.unique(maxima[:32] // 512).size > 4
    assert np.array_equal(np.sort(np.concatenate(got)), idx)


def _cell_tokens(batches_) -> dict[int, tuple[tuple[int, ...], tuple[float, ...]]]:
    out = {}
    for b in batches_:
        for i, cell in enumerate(b.obs_index.tolist()):
            v = b.valid[i]
            assert cell not in out
            out[cell] = (tuple(b.gene_ids[i][v].tolist()), tuple(b.values[i][v].tolist()))
    return out


@pytest.mark.parametrize("train", [False, True])
def test_tokens_identical_bucketed_or_not(pbmc, train):
    idx = np.arange(1, pbmc.n_obs, 2)
    kw = dict(max_tokens=1200, indices=idx, train=train, shuffle=train, seed=7, epoch=3)
    plain = list(batches(pbmc, 16, **kw))
    bucketed = list(batches(pbmc, 16, bucket=True, **kw))
    small = list(batches(pbmc, 5, bucket=True, bucket_size=20, **kw))
    a, b, c = _cell_tokens(plain), _cell_tokens(bucketed), _cell_tokens(small)
    assert a.keys() == set(idx.tolist())
    assert a == b == c
    assert any(len(ids) == 1200 for ids, _ in a.values())  # some cells were drawn from
    pad = lambda bs: sum(x.valid.numel() - int(x.valid.sum()) for x in bs)  # noqa: E731
    assert pad(bucketed) < pad(plain) / 3
    # evaluation keeps the order of the cells' windows; obs_index maps rows back
    order = torch.cat([x.obs_index for x in bucketed]).numpy()
    assert not np.array_equal(order, idx) and np.array_equal(np.sort(order), idx)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_evaluation_weights_count_each_cell_once(pbmc, world_size):
    idx = np.arange(0, 203)  # 203 cells, batch 10: 21 batches, not a multiple of 2, 3, 4
    weight_of: dict[int, float] = {}
    n_weighted = 0.0
    steps = set()
    for rank in range(world_size):
        dl = make_dataloader(
            pbmc, idx, 10, max_tokens=64, rank=rank, world_size=world_size, bucket=True
        )
        got = list(dl)
        steps.add(len(got))
        for b in got:
            assert b.weight.dtype == torch.float32 and b.weight.shape == (len(b),)
            n_weighted += float(b.weight.sum())
            for cell, w in zip(b.obs_index.tolist(), b.weight.tolist()):
                weight_of[cell] = weight_of.get(cell, 0.0) + w
    assert len(steps) == 1
    assert n_weighted == idx.size
    assert weight_of == {int(i): 1.0 for i in idx}
    # training loaders keep full repeated batches (all weight 1) for the gradient
    dl = make_dataloader(pbmc, idx, 10, max_tokens=64, train=True, rank=1, world_size=4)
    assert all(bool((b.weight == 1).all()) for b in dl)


def test_weight_defaults_to_ones_and_travels():
    b = TokenBatch(
        values=torch.zeros(3, 2),
        gene_ids=torch.zeros(3, 2, dtype=torch.long),
        valid=torch.ones(3, 2, dtype=torch.bool),
        n_tokens=torch.full((3,), 2),
        obs_index=torch.arange(3),
    )
    assert torch.equal(b.weight, torch.ones(3))
    b.weight = torch.tensor([1.0, 0.0, 1.0])
    moved = b.to("cpu")
    assert torch.equal(moved.weight, b.weight)
    if torch.cuda.is_available():
        assert b.pin_memory().weight.is_pinned()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_default_train_and_inference_paths_bucket_by_length(pbmc):
    """The public train() and get_latent_representation() feed length-bucketed batches."""
    from cellfm_sc import CellFMClassifier

    rng = np.random.default_rng(0)
    adata = pbmc[np.sort(rng.choice(pbmc.n_obs, 192, replace=False))].copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=4096)
    seen: list[tuple[int, int, bool]] = []  # (padded slots, real tokens, grad on)

    def record(module, args, kwargs):
        valid = args[2]
        seen.append((valid.numel(), int(valid.sum()), torch.is_grad_enabled()))

    model.module.trunk.register_forward_pre_hook(record, with_kwargs=True)
    model.train(max_epochs=1, batch_size=8, enable_progress_bar=False)
    train = [s for s in seen if s[2]]
    seen.clear()
    model.get_latent_representation(batch_size=16)
    infer = list(seen)
    waste = lambda rows: sum(s - r for s, r, _ in rows) / sum(r for _, r, _ in rows)  # noqa: E731
    # the same cells in their order, batched without bucketing, waste far more
    nnz = np.diff(adata.X.indptr)

    def plain(bs: int) -> float:
        padded = sum(len(nnz[i : i + bs]) * nnz[i : i + bs].max() for i in range(0, len(nnz), bs))
        return padded / nnz.sum() - 1

    assert len(train) == int(np.ceil(len(model.split.train) / 8))
    assert plain(8) > 0.4 and plain(16) > 0.4, (plain(8), plain(16))
    assert waste(train) < plain(8) / 3, (waste(train), plain(8))
    assert waste(infer) < plain(16) / 3, (waste(infer), plain(16))
