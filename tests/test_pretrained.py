"""load_pretrained_trunk: every layer but gene_emb from the checkpoint, new table for var_names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cellfm_sc import load_pretrained_trunk
from cellfm_sc.nn import CellFMTrunk

from .test_vocab import GOLDEN_ALIASES, _first_column, _write_hgnc

CKPT = "model_d48_h4_l2_g37_backbone.ckpt"


@pytest.fixture(scope="module")
def case(golden_dir, tmp_path_factory):
    vocab_path = golden_dir / "vocab_d48_h4_l2_g37.csv"
    symbols = _first_column(vocab_path)
    rng = np.random.default_rng(11)
    alias_rows = set(GOLDEN_ALIASES.values())
    picks = rng.permutation([i for i in range(37) if i not in alias_rows])[:20]
    entries = [(symbols[i], int(i) + 1) for i in picks]
    entries += [(f"UNKNOWN{i}", 0) for i in range(10)]
    entries += [(a, r + 1) for a, r in GOLDEN_ALIASES.items()]
    entries = [entries[k] for k in rng.permutation(len(entries))]
    hgnc = _write_hgnc(
        tmp_path_factory.mktemp("hgnc") / "hgnc.tsv",
        [(symbols[r], a, "") for a, r in GOLDEN_ALIASES.items()],
    )
    names = [e[0] for e in entries]
    old_ids = np.array([e[1] for e in entries])
    original = CellFMTrunk.from_mindspore(golden_dir / CKPT, num_heads=4).eval()
    return golden_dir, vocab_path, hgnc, names, old_ids, original


def test_transfer_copies_mapped_rows_and_every_other_parameter(case):
    golden_dir, vocab_path, hgnc, names, old_ids, original = case
    trunk, report = load_pretrained_trunk(
        golden_dir / CKPT,
        names,
        vocabulary_file=vocab_path,
        embedding_init="transfer",
        num_heads=4,
        hgnc_table=hgnc,
    )
    old = original.gene_emb.detach().numpy()
    new = trunk.gene_emb.detach().numpy()
    assert new.shape == (40, 48)  # 33 genes + padding -> 40 rows
    assert not new[0].any() and not new[34:].any()
    mapped = old_ids > 0
    assert mapped.sum() == 23
    for i, pid in enumerate(old_ids):
        row = new[i + 1]
        if pid:
            np.testing.assert_array_equal(row, old[pid])
        else:
            assert not (row == old).all(axis=1).any()
    for name, p in original.named_parameters():
        if name != "gene_emb":
            assert torch.equal(dict(trunk.named_parameters())[name], p), name
    assert report.variant == "A'"
    assert report.old_shape == (40, 48) and report.new_shape == (40, 48)
    assert report.mapping.n_mapped == 23
    text = str(report)
    assert "(40, 48) -> (40, 48)" in text and "transfer" in text
    assert report.load.excluded == {"gene_emb": (40, 48)}

    # functional check: a cell made only of mapped genes gives the original's output
    trunk.eval()
    new_ids = torch.tensor(np.flatnonzero(mapped)[:12] + 1)[None]
    orig_ids = torch.tensor(old_ids[mapped][:12])[None]
    values = torch.rand(1, 12, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        a = trunk(values, new_ids, valid)
        b = original(values, orig_ids, valid)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-6, rtol=0)


def test_random_reinitialises_every_gene_row_reproducibly(case):
    golden_dir, vocab_path, _, names, _, original = case
    kw = dict(num_heads=4, vocabulary_file=vocab_path)
    a, report = load_pretrained_trunk(golden_dir / CKPT, names, seed=5, **kw)
    b, _ = load_pretrained_trunk(golden_dir / CKPT, names, seed=5, **kw)
    c, _ = load_pretrained_trunk(golden_dir / CKPT, names, seed=6, **kw)
    old = original.gene_emb.detach().numpy()
    new = a.gene_emb.detach().numpy()
    for r in range(1, 34):
        assert not (new[r] == old).all(axis=1).any(), r
    assert torch.equal(a.gene_emb, b.gene_emb)
    assert not torch.equal(a.gene_emb, c.gene_emb)
    assert report.embedding_init == "random"
    assert report.mapping is not None  # coverage is reported with a vocabulary file
    # without a vocabulary file "random" still works, with no coverage
    d, rep = load_pretrained_trunk(golden_dir / CKPT, names, num_heads=4, seed=5)
    assert torch.equal(d.gene_emb, a.gene_emb) and rep.mapping is None


def test_errors(case):
    golden_dir, _, _, names, _, _ = case
    with pytest.raises(ValueError, match="vocabulary_file"):
        load_pretrained_trunk(golden_dir / CKPT, names, embedding_init="transfer", num_heads=4)
    with pytest.raises(ValueError, match="unknown embedding_init 'pretrained'"):
        load_pretrained_trunk(golden_dir / CKPT, names, embedding_init="pretrained")
    with pytest.raises(ValueError, match="TP53"):
        load_pretrained_trunk(golden_dir / CKPT, ["TP53", "TP53", "CD4"], num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        load_pretrained_trunk(golden_dir / CKPT, names)
    big = golden_dir.parent.parent / "cellfm" / "expand_gene_info.csv"
    with pytest.raises(ValueError, match=r"27855 genes.*40 rows"):
        load_pretrained_trunk(golden_dir / CKPT, names, vocabulary_file=big, num_heads=4)


def test_transfer_with_no_mapped_gene_is_an_error_before_the_checkpoint_is_read(case, tmp_path):
    _, vocab_path, _, _, _, _ = case
    ensembl = [f"ENSG{i:011d}" for i in range(1, 21)]
    missing = tmp_path / "not_read.ckpt"  # never opened: the mapping is checked first
    with pytest.raises(ValueError) as err:
        load_pretrained_trunk(
            missing, ensembl, vocabulary_file=vocab_path, embedding_init="transfer"
        )
    msg = str(err.value)
    assert "maps 0 of 20 dataset genes" in msg
    assert "look like Ensembl ids (e.g. ENSG00000000001" in msg and "gene_symbols=" in msg
    with pytest.raises(ValueError, match=r"maps 0 of 3 .*same species"):
        load_pretrained_trunk(
            missing, ["Foo1", "Bar2", "Baz3"], vocabulary_file=vocab_path, embedding_init="transfer"
        )


def test_low_coverage_warns_with_the_numbers(case):
    golden_dir, vocab_path, _, _, _, _ = case
    symbols = _first_column(vocab_path)
    names = symbols[:3] + [f"UNKNOWN{i}" for i in range(7)]
    with pytest.warns(UserWarning, match=r"only 3 of 10 dataset genes \(30\.0%\) map"):
        _, report = load_pretrained_trunk(
            golden_dir / CKPT,
            names,
            vocabulary_file=vocab_path,
            embedding_init="transfer",
            num_heads=4,
        )
    assert report.mapping.n_mapped == 3
    # at 50% or more: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained_trunk(
            golden_dir / CKPT,
            names[:6],
            vocabulary_file=vocab_path,
            embedding_init="transfer",
            num_heads=4,
        )


def test_tenx_gene_symbols_with_repeats_transfer_first_occurrence(case):
    """The model layer's call with gene_symbols=: symbols (repeating) + unique Ensembl ids."""
    golden_dir, vocab_path, _, _, _, original = case
    s = _first_column(vocab_path)
    symbols = [s[0], s[5], s[0], s[9], "NOTAGENE", s[5], s[12]]
    ids = [f"ENSG{i:011d}" for i in range(len(symbols))]
    with pytest.warns(UserWarning, match="Ensembl rule was skipped"):
        trunk, report = load_pretrained_trunk(
            golden_dir / CKPT,
            symbols,
            vocabulary_file=vocab_path,
            embedding_init="transfer",
            num_heads=4,
            ensembl_ids=ids,
        )
    old = original.gene_emb.detach().numpy()
    new = trunk.gene_emb.detach().numpy()
    assert new.shape == (8, 48)
    for pos, row in ((0, 1), (1, 6), (3, 10), (6, 13)):  # first occurrences: pretrained rows
        np.testing.assert_array_equal(new[pos + 1], old[row])
    for pos in (2, 4, 5):  # repeats and the unknown gene: random rows
        assert not (new[pos + 1] == old).all(axis=1).any()
    assert report.mapping.duplicate_symbols == {s[0]: [2], s[5]: [5]}
    assert report.to_dict()["duplicate_symbols"] == {s[0]: [2], s[5]: [5]}
    assert "occur more than once" in str(report)
    # without ids to tell the genes apart, repeated names are still refused
    with pytest.raises(ValueError, match="duplicated gene name"):
        load_pretrained_trunk(golden_dir / CKPT, symbols, num_heads=4)
