"""Normalisation and tokenisation: exact values against a float64 recomputation, draws."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellfm_sc.data import TokenBatch, cellfm_normalize, name_keys, tokenize


def reference_cell(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Capped counts and values of one dense cell, float64, straight from the spec."""
    c = counts.astype(np.float64)
    t0 = c.sum()
    c = np.round(c / max(1.0, t0 / 1e5))
    t = c.sum()
    x = np.log1p(c / t * 1e4) if t > 0 else np.zeros_like(c)
    return c, x


@st.composite
def count_matrices(draw):
    n_rows = draw(st.integers(1, 6))
    n_cols = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.0, 1.0))
    big = draw(st.booleans())
    rng = np.random.default_rng(seed)
    mask = rng.random((n_rows, n_cols)) < density
    scale = 20_000 if big else 30
    dense = np.where(mask, rng.integers(1, scale, size=(n_rows, n_cols)), 0)
    return sp.csr_matrix(dense.astype(np.float32))


def _tokens_of(batch: TokenBatch, i: int) -> tuple[np.ndarray, np.ndarray]:
    valid = batch.valid[i].numpy()
    return batch.gene_ids[i].numpy()[valid], batch.values[i].numpy()[valid]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=count_matrices(), max_tokens=st.integers(1, 45), train=st.booleans())
def test_tokens_exact_or_sampled(m, max_tokens, train):
    batch = tokenize(m, np.arange(m.shape[0]), max_tokens=max_tokens, train=train, seed=3)
    dense = m.toarray()
    n_expected = []
    for i in range(m.shape[0]):
        c, x = reference_cell(dense[i])
        expressed = np.flatnonzero(c > 0)
        ids, vals = _tokens_of(batch, i)
        cols = ids - 1
        assert np.all(np.diff(cols) > 0), "tokens must be distinct, in ascending column order"
        if expressed.size <= max_tokens:
            np.testing.assert_array_equal(cols, expressed)
        else:
            assert cols.size == max_tokens
            assert np.isin(cols, expressed).all()
        np.testing.assert_allclose(vals, x[cols], rtol=0, atol=1e-6)
        n_expected.append(min(expressed.size, max_tokens))
    assert batch.n_tokens.tolist() == n_expected
    assert batch.values.shape[1] == max(n_expected)
    assert batch.values.dtype == torch.float32 and batch.gene_ids.dtype == torch.int64
    assert batch.valid.dtype == torch.bool
    assert (batch.gene_ids[~batch.valid] == 0).all() and (batch.values[~batch.valid] == 0).all()
    assert batch.valid.sum(1).tolist() == n_expected


@settings(max_examples=60, deadline=None)
@given(m=count_matrices(), perm_seed=st.integers(0, 1000))
def test_eval_tokens_independent_of_batch(m, perm_seed):
    n = m.shape[0]
    names = np.array([f"cell-{i}-ß" for i in range(n)])  # non-ASCII on purpose
    full = tokenize(m, np.arange(n), max_tokens=3, obs_names=names, seed=7)
    perm = np.random.default_rng(perm_seed).permutation(n)
    # another batch order, other obs positions, and the rows padded with an unrelated cell
    other = sp.vstack([m[perm], sp.csr_matrix(np.full((1, m.shape[1]), 5.0))]).tocsr()
    shuffled = tokenize(
        other, np.r_[perm + 100, 999], max_tokens=3, obs_names=np.append(names[perm], "x"), seed=7
    )
    for j, i in enumerate(perm):
        a_ids, a_vals = _tokens_of(full, i)
        b_ids, b_vals = _tokens_of(shuffled, j)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_vals, b_vals)
        alone = tokenize(m[i], [i], max_tokens=3, obs_names=names[i : i + 1], seed=7)
        np.testing.assert_array_equal(_tokens_of(alone, 0)[0], a_ids)


def test_normalisation_matches_float64_above_cap():
    rng = np.random.default_rng(0)
    n_cols = 3000
    rows = []
    for total_scale in (10, 1_000, 60_000, 400_000, 5_000_000):
        p = rng.dirichlet(np.full(n_cols, 0.1))
        rows.append(rng.multinomial(total_scale, p))
    dense = np.array(rows)
    assert dense.sum(1).max() > 1e5
    m = sp.csr_matrix(dense.astype(np.float32))
    norm = cellfm_normalize(m.data, m.indptr)
    for i in range(dense.shape[0]):
        c, x = reference_cell(dense[i])
        sl = slice(m.indptr[i], m.indptr[i + 1])
        cols = m.indices[sl]
        np.testing.assert_array_equal(norm.counts[sl], c[cols])
        np.testing.assert_allclose(norm.values[sl], x[cols], rtol=0, atol=1e-6)
        assert norm.totals[i] == c.sum() and norm.raw_totals[i] == dense[i].sum()
    # capped totals are within rounding of the cap
    assert np.all(norm.totals[norm.raw_totals > 1e5] < 1e5 + n_cols)
    # the same through tokenize, with capping dropping genes whose capped count is 0
    batch = tokenize(m, np.arange(dense.shape[0]), max_tokens=n_cols)
    for i in range(dense.shape[0]):
        c, x = reference_cell(dense[i])
        ids, vals = _tokens_of(batch, i)
        np.testing.assert_array_equal(ids - 1, np.flatnonzero(c > 0))
        np.testing.assert_allclose(vals, x[ids - 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch.total_counts.numpy(), norm.totals, rtol=1e-7)


def _draw_frequencies(counts: np.ndarray, n_draws: int, max_tokens: int, train: bool):
    m = sp.csr_matrix(np.tile(counts.astype(np.float32), (n_draws, 1)))
    if train:
        batch = tokenize(m, np.arange(n_draws), max_tokens=max_tokens, train=True, seed=11)
    else:
        names = np.array([f"AAACC{i:06d}-1" for i in range(n_draws)])
        batch = tokenize(
            m, np.zeros(n_draws, dtype=np.int64), max_tokens=max_tokens, obs_names=names
        )
    ids = batch.gene_ids.numpy()[batch.valid.numpy()] - 1
    return np.bincount(ids, minlength=counts.size)


@pytest.mark.parametrize("train", [True, False])
def test_single_draw_follows_log1p_weights(train):
    counts = np.array([1, 1, 2, 3, 5, 8, 13, 40, 100, 500, 2000, 7, 1, 60, 9])
    freq = _draw_frequencies(counts, 30_000, 1, train)
    w = np.log1p(counts.astype(np.float64))  # total 2701 < 1e5, so no capping
    expected = w / w.sum() * freq.sum()
    p = scipy.stats.chisquare(freq, expected).pvalue
    assert p > 1e-3, (p, freq, expected.round())
    # and clearly not uniform or proportional to raw counts
    assert scipy.stats.chisquare(freq, np.full(counts.size, freq.sum() / counts.size)).pvalue < 1e-6


def test_two_draws_follow_sampling_without_replacement():
    counts = np.array([1, 3, 20, 400, 7])
    w = np.log1p(counts.astype(np.float64))
    p = w / w.sum()
    # inclusion probability of gene i in 2 draws without replacement, weights p
    incl = p + np.array(
        [sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)]
    )
    n = 40_000
    freq = _draw_frequencies(counts, n, 2, True)
    assert freq.sum() == 2 * n
    z = (freq - n * incl) / np.sqrt(n * incl * (1 - incl))
    assert np.all(np.abs(z) < 4), z


def test_training_draws_change_with_epoch_and_repeat_with_seed():
    rng = np.random.default_rng(1)
    m = sp.csr_matrix(rng.poisson(2.0, size=(8, 500)).astype(np.float32))
    idx = np.arange(8)
    a = tokenize(m, idx, max_tokens=50, train=True, seed=0, epoch=0)
    b = tokenize(m, idx, max_tokens=50, train=True, seed=0, epoch=0)
    c = tokenize(m, idx, max_tokens=50, train=True, seed=0, epoch=1)
    d = tokenize(m, idx, max_tokens=50, train=True, seed=1, epoch=0)
    assert torch.equal(a.gene_ids, b.gene_ids)
    assert not torch.equal(a.gene_ids, c.gene_ids)
    assert not torch.equal(a.gene_ids, d.gene_ids)
    # a training draw is per cell too: the same cell alone gives the same draw
    alone = tokenize(m[3], [3], max_tokens=50, train=True, seed=0, epoch=1)
    assert torch.equal(alone.gene_ids[0], c.gene_ids[3])


def test_gene_id_map_and_empty_cells():
    m = sp.csr_matrix(np.array([[0, 2, 0, 1], [0, 0, 0, 0], [3, 0, 0, 0]], dtype=np.float32))
    gmap = np.array([40, 10, 30, 20])
    batch = tokenize(m, [5, 6, 7], gene_id_map=gmap, labels=np.array([2, 0, 1]))
    assert batch.gene_ids.tolist() == [[10, 20], [0, 0], [40, 0]]  # ascending column order
    assert batch.n_tokens.tolist() == [2, 0, 1]
    assert batch.obs_index.tolist() == [5, 6, 7] and batch.labels.tolist() == [2, 0, 1]
    assert len(batch) == 3
    with pytest.raises(ValueError, match="gene_id_map"):
        tokenize(m, [0, 1, 2], gene_id_map=gmap[:3])
    # all cells empty: zero-length token axis
    assert tokenize(sp.csr_matrix((2, 4)), [0, 1]).values.shape == (2, 0)


def test_dense_input_and_unsorted_csr_give_same_tokens():
    rng = np.random.default_rng(4)
    dense = rng.poisson(0.5, size=(5, 60)).astype(np.float32)
    a = tokenize(dense, np.arange(5), max_tokens=10, train=True)
    csr = sp.csr_matrix(dense)
    # reverse column order inside each row
    rev = sp.csr_matrix((csr.data.copy(), csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    for i in range(5):
        s = slice(rev.indptr[i], rev.indptr[i + 1])
        rev.data[s], rev.indices[s] = rev.data[s][::-1], rev.indices[s][::-1]
    rev.has_sorted_indices = False
    b = tokenize(rev, np.arange(5), max_tokens=10, train=True)
    assert torch.equal(a.gene_ids, b.gene_ids) and torch.equal(a.values, b.values)


def test_token_batch_to_and_name_keys_stable():
    batch = tokenize(sp.csr_matrix(np.eye(3, dtype=np.float32)), [0, 1, 2])
    moved = batch.to("cpu")
    assert isinstance(moved, TokenBatch) and torch.equal(moved.values, batch.values)
    assert moved.labels is None
    if torch.cuda.is_available():
        assert batch.pin_memory().values.is_pinned()
    # keys are a fixed function of (seed, name): pinned values guard against silent changes
    k = name_keys(["AAACCTGAGAAGGCCT-1", "b", "AAACCTGAGAAGGCCT-1"], seed=0)
    assert k[0] == k[2] and k[0] != k[1]
    assert name_keys(["b"], seed=1)[0] != k[1]
    assert k.dtype == np.uint64


def test_top_k_ties_fall_back_to_exact_k():
    from cellfm_sc.data.tokenize import _top_k_per_row

    # two rows of 5 with tied scores at the threshold: still exactly k per row
    score = np.array([1.0, 2.0, 2.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0, 3.0])
    r = np.repeat([0, 2], 5)
    long_rows = np.array([True, False, True])
    n_expr = np.array([5, 1, 5])
    keep = _top_k_per_row(score, r, long_rows, n_expr, 2)
    assert keep[:5].sum() == 2 and keep[5:].sum() == 2
    assert not keep[0] and not keep[4]
