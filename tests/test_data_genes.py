"""Query data with another gene set: align_genes, dropped columns, totals over all columns."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfm_sc.data import GeneAlignment, align_genes, batches, tokenize
from cellfm_sc.vocab import GeneVocab

N_CELLS, N_GENES = 150, 200
MODEL_GENES = [f"G{j:03d}" for j in range(N_GENES)]


def _counts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.6, 2.0, size=N_GENES), size=(N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1
    x[:5] *= 700  # a few cells above the 1e5 cap
    return x


def _per_cell(batch) -> dict[int, dict[int, float]]:
    out = {}
    for i, cell in enumerate(batch.obs_index.tolist()):
        v = batch.valid[i]
        out[cell] = dict(zip(batch.gene_ids[i][v].tolist(), batch.values[i][v].tolist()))
    return out


def _query(x: np.ndarray, seed: int, renamed: bool):
    """A permuted 80% subset of the model's genes; with ``renamed``, the other 20% present under
    names the model does not know (plus two unknown all-zero genes)."""
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(N_GENES, size=int(0.8 * N_GENES), replace=False))
    other = np.setdiff1d(np.arange(N_GENES), kept)
    cols = list(kept) + (list(other) if renamed else [])
    names = [MODEL_GENES[j] for j in kept] + ([f"ALIAS_{j}" for j in other] if renamed else [])
    q = x[:, cols]
    if renamed:
        q = np.hstack([q, np.zeros((N_CELLS, 2), np.float32)])
        names += ["NEW1", "NEW2"]
    perm = rng.permutation(len(names))
    return q[:, perm], [names[p] for p in perm], kept


def test_alignment_map_and_facts():
    with pytest.warns(UserWarning, match=r"160 of the model's 200 genes \(80\.0%\)"):
        al = align_genes(MODEL_GENES, _query(_counts(), 1, renamed=True)[1])
    assert isinstance(al, GeneAlignment) and al.gene_id_map.dtype == np.int64
    assert al.n_found == 160 and al.coverage == 0.8 and al.n_model_genes == 200
    assert al.unknown_genes.size == 42 and al.missing_genes.size == 40
    assert al.n_query_genes == 202 and not al.is_identity
    q_names = _query(_counts(), 1, renamed=True)[1]
    for name, gid in zip(q_names, al.gene_id_map):
        assert gid == (MODEL_GENES.index(name) + 1 if name in MODEL_GENES else 0)
    # identical gene lists: identity, no warning; a GeneVocab is accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = align_genes(GeneVocab.from_var_names(MODEL_GENES), MODEL_GENES)
    assert same.is_identity and same.coverage == 1.0 and same.unknown_genes.size == 0


def test_low_coverage_duplicates_and_bad_arguments():
    few = [*MODEL_GENES[:60], "X1", "X2"]
    with pytest.raises(ValueError) as err:
        align_genes(MODEL_GENES, few, min_gene_coverage=0.5)
    msg = str(err.value)
    assert "only 60 of the model's 200 genes (30.0%)" in msg and "(62 genes)" in msg
    assert "min_gene_coverage=0.5" in msg and "'X1'" in msg and "'G060'" in msg
    with pytest.warns(UserWarning, match=r"30\.0%"):
        align_genes(MODEL_GENES, few, min_gene_coverage=0.25)
    with pytest.raises(ValueError, match=r"only 0 of the model's 200 genes"):
        align_genes(MODEL_GENES, ["ENSG1", "ENSG2"], min_gene_coverage=0.0)
    dup = [*MODEL_GENES[:150], "G003", "G010", "G003"]
    with pytest.raises(
        ValueError,
        match=r"2 duplicated gene name\(s\): 'G003' \(columns \[3, 150, 152\]\), 'G010' \(columns \[10, 151\]\)",
    ):
        align_genes(MODEL_GENES, dup)
    with pytest.raises(ValueError, match="min_gene_coverage must be in"):
        align_genes(MODEL_GENES, MODEL_GENES, min_gene_coverage=80)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_query_with_renamed_fifth_gives_the_full_data_tokens(seed):
    """80% of the genes, permuted; the rest under unknown names: exactly the full data's tokens
    of the kept genes, because the total still counts the dropped columns."""
    x = _counts(seed)
    q, names, kept = _query(x, seed, renamed=True)
    with pytest.warns(UserWarning, match="80.0%"):
        al = align_genes(MODEL_GENES, names)
    obs = np.arange(N_CELLS)
    full = tokenize(sp.csr_matrix(x), obs, max_tokens=N_GENES)
    query = tokenize(sp.csr_matrix(q), obs, max_tokens=N_GENES, gene_id_map=al.gene_id_map)
    kept_ids = set((kept + 1).tolist())
    ref, got = _per_cell(full), _per_cell(query)
    for cell in obs:
        want = {g: v for g, v in ref[cell].items() if g in kept_ids}
        assert got[cell] == want  # same gene ids, bit-identical values
        ids = query.gene_ids[cell][query.valid[cell]].numpy()
        assert np.all(np.diff(ids) > 0)  # ascending model token order
    np.testing.assert_array_equal(query.total_counts.numpy(), full.total_counts.numpy())
    # the alternative (totals over the known genes only) is what cutting the columns gives:
    # every value moves, by log(T_all / T_known) inside the log1p
    cut = tokenize(
        sp.csr_matrix(q[:, al.gene_id_map > 0]),
        obs,
        max_tokens=N_GENES,
        gene_id_map=al.gene_id_map[al.gene_id_map > 0],
    )
    alt = _per_cell(cut)
    err_ours = err_alt = 0.0
    for cell in obs:
        for g, v in got[cell].items():
            err_ours += abs(v - ref[cell][g])
            err_alt += abs(alt[cell][g] - ref[cell][g])
    assert err_ours == 0.0 and err_alt > 1.0


def test_query_with_a_permuted_subset_only():
    """Only 80% of the genes, permuted: the kept genes' tokens, in the full data's order, valued
    against the cell's total over the columns it has (float64 reference)."""
    x = _counts(5)
    q, names, kept = _query(x, 5, renamed=False)
    with pytest.warns(UserWarning):
        al = align_genes(MODEL_GENES, names)
    assert al.unknown_genes.size == 0 and al.n_found == 160
    obs = np.arange(N_CELLS)
    got = _per_cell(tokenize(sp.csr_matrix(q), obs, max_tokens=N_GENES, gene_id_map=al.gene_id_map))
    ref = _per_cell(tokenize(sp.csr_matrix(x), obs, max_tokens=N_GENES))
    sub = x[:, kept].astype(np.float64)
    for cell in obs:
        assert list(got[cell]) == [g for g in ref[cell] if g - 1 in set(kept.tolist())]
        c = sub[cell]
        c = np.round(c / max(1.0, c.sum() / 1e5))
        expect = {int(kept[j]) + 1: np.log1p(c[j] / c.sum() * 1e4) for j in np.flatnonzero(c > 0)}
        np.testing.assert_allclose([got[cell][g] for g in expect], list(expect.values()), rtol=1e-6)


def test_alignment_through_the_loader_with_sampling():
    """Through batches(): dropped columns never produce tokens, also when cells are sampled."""
    x = _counts(3)
    q, names, _ = _query(x, 3, renamed=True)
    adata = ad.AnnData(sp.csr_matrix(q), var=pd.DataFrame(index=names))
    adata.obs_names = [f"c{i}" for i in range(N_CELLS)]
    with pytest.warns(UserWarning):
        al = align_genes(MODEL_GENES, adata.var_names)
    n_known = np.asarray((sp.csr_matrix(q)[:, al.gene_id_map > 0] > 0).sum(1)).ravel()
    for b in batches(adata, 32, max_tokens=40, gene_id_map=al.gene_id_map, bucket=True):
        ids = b.gene_ids[b.valid]
        assert int(ids.min()) >= 1 and int(ids.max()) <= N_GENES
        np.testing.assert_array_equal(
            b.n_tokens.numpy(), np.minimum(n_known[b.obs_index.numpy()], 40)
        )
    with pytest.raises(ValueError, match="negative"):
        next(batches(adata, gene_id_map=np.full(len(names), -1)))
