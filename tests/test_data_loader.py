"""Loaders: samplers, in-memory vs backed identity, workers, bucketing, distributed ranks."""

from __future__ import annotations

from contextlib import nullcontext

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc.data import CellBatchSampler, CellDataset, TokenBatch, batches, make_dataloader


@pytest.fixture(scope="module")
def pbmc(pbmc3k_path):
    return ad.read_h5ad(pbmc3k_path)


def _same(a: TokenBatch, b: TokenBatch) -> None:
    assert torch.equal(a.obs_index, b.obs_index)
    assert torch.equal(a.gene_ids, b.gene_ids)
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.valid, b.valid)
    assert torch.equal(a.n_tokens, b.n_tokens)


def _per_cell(batches_) -> dict[int, tuple[list[int], list[float]]]:
    out = {}
    for b in batches_:
        for i, cell in enumerate(b.obs_index.tolist()):
            v = b.valid[i]
            out[cell] = (b.gene_ids[i][v].tolist(), b.values[i][v].tolist())
    return out


@pytest.mark.parametrize("train", [False, True])
def test_backed_and_in_memory_batches_identical(pbmc, pbmc3k_path, train):
    kw = dict(batch_size=32, max_tokens=300, train=train, shuffle=True, seed=5, epoch=2)
    backed = ad.read_h5ad(pbmc3k_path, backed="r")
    try:
        mem = list(batches(pbmc, **kw))
        bak = list(batches(backed, **kw))
    finally:
        backed.file.close()
    assert len(mem) == len(bak) == int(np.ceil(pbmc.n_obs / 32))
    for a, b in zip(mem, bak):
        _same(a, b)
    assert sorted(torch.cat([b.obs_index for b in mem]).tolist()) == list(range(pbmc.n_obs))


def test_formats_give_identical_batches():
    rng = np.random.default_rng(0)
    x = rng.poisson(0.8, size=(90, 120)).astype(np.float32)
    x[:, 0] += 1
    kw = dict(batch_size=16, max_tokens=20, shuffle=True, seed=1)
    ref = list(batches(ad.AnnData(sp.csr_matrix(x)), **kw))
    for fmt in (np.asarray, sp.csc_matrix):
        with pytest.warns(UserWarning, match="CSC") if fmt is sp.csc_matrix else nullcontext():
            other = list(batches(ad.AnnData(fmt(x)), **kw))
        for a, b in zip(ref, other):
            _same(a, b)


def test_eval_tokens_do_not_depend_on_batching(pbmc):
    idx = np.arange(0, pbmc.n_obs, 3)
    a = _per_cell(batches(pbmc, batch_size=16, max_tokens=200, indices=idx))
    b = _per_cell(batches(pbmc, batch_size=7, max_tokens=200, indices=idx, shuffle=True, seed=0))
    c = _per_cell(batches(pbmc, batch_size=64, max_tokens=200, indices=idx, bucket=True))
    assert a.keys() == b.keys() == c.keys() == set(idx.tolist())
    assert a == b == c
    # the seed changes the draw of cells above max_tokens
    d = _per_cell(batches(pbmc, batch_size=16, max_tokens=200, indices=idx, seed=1))
    assert d != a


def test_training_draws_differ_across_epochs(pbmc):
    idx = np.arange(64)
    e0 = _per_cell(batches(pbmc, batch_size=16, max_tokens=200, train=True, indices=idx))
    e0b = _per_cell(batches(pbmc, batch_size=8, max_tokens=200, train=True, indices=idx))
    e1 = _per_cell(batches(pbmc, batch_size=16, max_tokens=200, train=True, indices=idx, epoch=1))
    assert e0 == e0b
    assert e0 != e1


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bucket", [False, True])
def test_sampler_covers_each_cell_once(shuffle, bucket):
    rng = np.random.default_rng(3)
    idx = rng.choice(10_000, size=1234, replace=False)
    lengths = rng.integers(1, 3000, size=idx.size) if bucket else None
    s = CellBatchSampler(
        idx, 50, shuffle=shuffle, seed=4, chunk_size=16, buffer_size=256, lengths=lengths
    )
    epochs = []
    for epoch in range(2):
        s.set_epoch(epoch)
        got = list(s)
        assert len(got) == len(s) == 25
        assert all(len(b) == 50 for b in got[:-1]) or bucket
        flat = np.concatenate(got)
        assert np.array_equal(np.sort(flat), np.sort(idx))
        epochs.append(flat)
    if shuffle:
        assert not np.array_equal(epochs[0], epochs[1])
    elif not bucket:
        assert np.array_equal(epochs[0], idx)


def test_shuffle_keeps_reads_local():
    s = CellBatchSampler(np.arange(100_000), 32, shuffle=True, chunk_size=64, buffer_size=1024)
    # a batch draws from one buffer: 16 chunks of 64 rows (17 when a short last chunk shifts
    # the buffer boundaries), never from all over the file
    distinct_chunks = [np.unique(b // 64).size for b in s]
    assert max(distinct_chunks) <= 17
    assert np.mean(distinct_chunks) > 8  # and it is still shuffled


def test_bucketing_cuts_padding(pbmc):
    def padding(bs):
        return sum(b.valid.numel() - int(b.valid.sum()) for b in bs)

    plain = padding(batches(pbmc, batch_size=16, max_tokens=2048, shuffle=True))
    bucketed = padding(batches(pbmc, batch_size=16, max_tokens=2048, shuffle=True, bucket=True))
    assert bucketed < plain / 3


def test_distributed_ranks_equal_batches_disjoint_cells():
    idx = np.arange(1003)
    for drop_last in (False, True):
        per_rank = []
        for rank in range(3):
            s = CellBatchSampler(
                idx, 10, shuffle=True, seed=2, rank=rank, world_size=3, drop_last=drop_last
            )
            s.set_epoch(1)
            per_rank.append(list(s))
            assert len(per_rank[-1]) == len(s)
        assert len({len(p) for p in per_rank}) == 1
        cells = [np.concatenate(p) for p in per_rank]
        if drop_last:
            all_cells = np.concatenate(cells)
            assert np.unique(all_cells).size == all_cells.size  # disjoint
        else:
            assert np.array_equal(np.unique(np.concatenate(cells)), idx)  # everything covered
            # only the padding (repeats of the first batches) is shared
            overlap = sum(
                np.intersect1d(cells[i], cells[j]).size for i in range(3) for j in range(i + 1, 3)
            )
            assert overlap <= 2 * 10


def test_dataloader_with_workers_matches_in_process(pbmc3k_path, pbmc):
    labels = pd.Categorical(pbmc.obs["celltype"]).codes.astype(np.int64)
    idx = np.arange(0, 600)
    backed = ad.read_h5ad(pbmc3k_path, backed="r")
    try:
        for train in (False, True):
            dl = make_dataloader(
                backed, idx, 32, max_tokens=150, train=train, seed=3, labels=labels, num_workers=2
            )
            dl.sampler.set_epoch(1)
            got = list(dl)
            ref = list(
                batches(
                    pbmc,
                    32,
                    max_tokens=150,
                    train=train,
                    shuffle=train,
                    seed=3,
                    indices=idx,
                    epoch=1,
                    labels=labels,
                )
            )
            assert len(got) == len(ref) == len(dl)
            for a, b in zip(got, ref):
                _same(a, b)
                assert torch.equal(a.labels, torch.from_numpy(labels[a.obs_index.numpy()]))
    finally:
        backed.file.close()


def test_dataset_from_path_and_request_order(pbmc3k_path, pbmc):
    ds = CellDataset(str(pbmc3k_path), max_tokens=100)
    req = np.array([50, 3, 2000, 3])
    b = ds[req]
    assert b.obs_index.tolist() == req.tolist()
    ref = CellDataset(pbmc, max_tokens=100)[req]
    _same(b, ref)
    assert torch.equal(b.gene_ids[1], b.gene_ids[3])
    assert len(ds) == pbmc.n_obs
    with pytest.raises(KeyError, match="nope"):
        CellDataset(str(pbmc3k_path), layer="nope")


def test_backed_dataset_pickles_without_handle_and_reads_layers(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(
        rng.poisson(1.0, size=(120, 80)).astype(np.float32) + np.eye(120, 80, dtype=np.float32)
    )
    lognorm = counts.copy()
    lognorm.data = np.log1p(lognorm.data)
    adata = ad.AnnData(X=lognorm, layers={"counts": counts})
    adata.obs_names = [f"c{i}" for i in range(120)]
    path = tmp_path / "layers.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(
            ValueError, match='pass the matrix that holds raw counts: layer="counts"'
        ):
            next(batches(backed))
        ds = CellDataset(backed, layer="counts", max_tokens=10)
        assert ds.source.path is not None  # read from the file, not from memory
        ds[np.arange(5)]  # opens the file
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.source._file is None  # the handle is not pickled; reopened on first read
        rows = np.array([3, 77, 119])
        _same(clone[rows], ds[rows])
        _same(ds[rows], CellDataset(adata, layer="counts", max_tokens=10)[rows])
    finally:
        backed.file.close()
