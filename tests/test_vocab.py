"""Tests of cellfm_sc.vocab: GeneVocab, map_genes, build_gene_embedding."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellfm_sc.vocab import (
    GeneMapping,
    GeneVocab,
    build_gene_embedding,
    map_genes,
    padded_table_size,
)

# ---------------------------------------------------------------------------- helpers


def _first_column(path: Path) -> list[str]:
    """Symbols of a CellFM-format CSV read with the csv module (independent of the code under test)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    return [r[0] for r in rows[1:] if r]


def _write_hgnc(path: Path, rows: list[tuple[str, str, str]], ensembl: list[str] | None = None):
    header = ["HGNC ID", "Approved symbol", "Alias symbols", "Previous symbols"]
    if ensembl is not None:
        header.append("Ensembl gene ID")
    lines = ["\t".join(header)]
    for k, (sym, alias, prev) in enumerate(rows):
        cells = [f"HGNC:{k + 1}", sym, alias, prev]
        if ensembl is not None:
            cells.append(ensembl[k])
        lines.append("\t".join(cells))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- GeneVocab


@pytest.mark.parametrize(
    ("n", "rows"), [(0, 8), (1, 8), (7, 8), (8, 16), (37, 40), (101, 104), (27855, 27856)]
)
def test_padded_size_arithmetic(n: int, rows: int) -> None:
    assert padded_table_size(n) == rows
    v = GeneVocab.from_var_names([f"G{i}" for i in range(n)])
    assert v.padded_size == rows
    assert v.padded_size % 8 == 0 and v.padded_size >= n + 1 and v.padded_size - (n + 1) < 8


def test_padded_size_36601() -> None:
    assert padded_table_size(36601) == 36608


def test_ids_len_contains_eq() -> None:
    v = GeneVocab.from_var_names(["CD3E", "MS4A1", "NKG7", "LYZ"])
    assert len(v) == v.n_genes == 4
    assert list(v.names) == ["CD3E", "MS4A1", "NKG7", "LYZ"]
    got = v.ids(["LYZ", "CD3E", "NKG7"])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [4, 1, 3])
    np.testing.assert_array_equal(v.ids("MS4A1"), [2])
    assert "NKG7" in v and "nkg7" not in v and 3 not in v
    assert v == GeneVocab.from_var_names(["CD3E", "MS4A1", "NKG7", "LYZ"])
    assert v != GeneVocab.from_var_names(["MS4A1", "CD3E", "NKG7", "LYZ"])
    assert hash(v) == hash(GeneVocab.from_var_names(list(v.names)))
    with pytest.raises(AttributeError):
        v.foo = 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        v.names[0] = "X"


def test_ids_unknown_names() -> None:
    v = GeneVocab.from_var_names(["A", "B", "C"])
    unknown = [f"U{i}" for i in range(7)]
    with pytest.raises(KeyError) as err:
        v.ids(["A", *unknown])
    msg = str(err.value)
    assert "7" in msg and "U0" in msg and "U4" in msg and "U5" not in msg
    np.testing.assert_array_equal(v.ids(["C", "X", "A"], missing="zero"), [3, 0, 1])
    with pytest.raises(ValueError, match="missing"):
        v.ids(["A"], missing="ignore")  # type: ignore[arg-type]


def test_duplicate_names_raise_with_positions() -> None:
    names = ["A", "B", "DUPX", "C", "DUPX", "D", "DUPY", "DUPY"]
    with pytest.raises(ValueError) as err:
        GeneVocab.from_var_names(names)
    msg = str(err.value)
    assert "'DUPX' at positions [2, 4]" in msg
    assert "'DUPY' at positions [6, 7]" in msg
    assert msg.startswith("2 duplicated")


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (None, "None/NaN"),
        (float("nan"), "None/NaN"),
        (np.nan, "None/NaN"),
        ("", "empty"),
        (" ", "empty"),
    ],
)
def test_missing_or_empty_names_raise(bad, needle) -> None:
    names = ["A", "B", bad, "C"]
    with pytest.raises(ValueError) as err:
        GeneVocab.from_var_names(names)
    assert "position 2" in str(err.value) and needle in str(err.value)


def test_invalid_names_counted() -> None:
    names = ["A", "", None, "B", float("nan"), "", "", "", ""]
    with pytest.raises(ValueError) as err:
        GeneVocab.from_var_names(names)
    msg = str(err.value)
    assert msg.startswith("7 invalid")
    assert "(7 in total)" in msg


def test_save_load_roundtrip(tmp_path: Path) -> None:
    names = ["CD3E", "HLA-DRA", "MT-CO1", "Gm12345", "ENSG00000237683.5", "ÅBC"]
    v = GeneVocab.from_var_names(names)
    path = tmp_path / "vocab.txt"
    v.save(path)
    assert path.read_text(encoding="utf-8") == "\n".join(names) + "\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "vocab.txt"], "temp file left behind"
    w = GeneVocab.load(path)
    assert w == v and list(w.names) == names
    np.testing.assert_array_equal(w.ids(names), np.arange(1, 7))
    v2 = GeneVocab.from_var_names(["X"])
    v2.save(path)  # overwrite in place
    assert GeneVocab.load(path) == v2


def test_from_cellfm_file_csv_and_plain(tmp_path: Path) -> None:
    csv_path = tmp_path / "genes.csv"
    csv_path.write_text(
        'HGNC_gene,h5_sample_frequency,biotype\nA1BG,1,"RNA, long"\nNAN,2,x\nNA,3,y\nZZZ,4,z\n',
        encoding="utf-8",
    )
    v = GeneVocab.from_cellfm_file(csv_path)
    assert list(v.names) == ["A1BG", "NAN", "NA", "ZZZ"]  # "NA"/"NAN" are symbols, not NaN
    assert v.ensembl_ids is None
    plain = tmp_path / "genes.txt"
    plain.write_text("A1BG\nNAN\nNA\nZZZ\n\n", encoding="utf-8")
    assert GeneVocab.from_cellfm_file(plain) == v
    # a .csv without commas is a plain one-symbol-per-line file (no header)
    one_col = tmp_path / "one.csv"
    one_col.write_text("A1BG\nNAN\nNA\nZZZ\n", encoding="utf-8")
    assert GeneVocab.from_cellfm_file(one_col) == v


def test_from_cellfm_file_keeps_ensembl_column(tmp_path: Path) -> None:
    p = tmp_path / "g.csv"
    p.write_text("HGNC_gene,ensembl_gene_id\nA,ENSG01.3\nB,\nC,ENSG03\n", encoding="utf-8")
    v = GeneVocab.from_cellfm_file(p)
    assert list(v.ensembl_ids) == ["ENSG01.3", None, "ENSG03"]


def test_from_cellfm_file_duplicates_first_wins(tmp_path: Path) -> None:
    p = tmp_path / "dup.csv"
    p.write_text("HGNC_gene,x\nA,1\nB,2\nA,3\nC,4\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="'A' \\(row 2\\)"):
        v = GeneVocab.from_cellfm_file(p)
    assert v.n_genes == 4 and v.padded_size == 8 and v.has_duplicates
    np.testing.assert_array_equal(v.ids(["A", "B", "C"]), [1, 2, 4])
    with pytest.raises(ValueError, match="'A' at positions \\[0, 2\\]"):
        GeneVocab.from_var_names(v.names)


def test_real_cellfm_vocabulary(cellfm_vocab_path: Path) -> None:
    symbols = _first_column(cellfm_vocab_path)
    v = GeneVocab.from_cellfm_file(cellfm_vocab_path)
    assert v.n_genes == len(symbols) == 27855
    assert v.padded_size == 27856
    assert list(v.names) == symbols
    # checked: CellFM's public file repeats no symbol (also not case-insensitively) and has no
    # Ensembl column; if a new file did repeat one, the first occurrence must win
    assert v.has_duplicates == (len(set(symbols)) != len(symbols))
    first = {}
    for k, s in enumerate(symbols):
        first.setdefault(s, k + 1)
    sample = symbols[::997]
    np.testing.assert_array_equal(v.ids(sample), [first[s] for s in sample])
    header = cellfm_vocab_path.read_text(encoding="utf-8").splitlines()[0].lower()
    assert (v.ensembl_ids is None) == ("ensembl" not in header and "gene_id" not in header)


def test_golden_vocab_file(golden_dir: Path) -> None:
    path = golden_dir / "vocab_d48_h4_l2_g37.csv"
    v = GeneVocab.from_cellfm_file(path)
    assert list(v.names) == _first_column(path)
    assert v.n_genes == 37 and v.padded_size == 40


# ---------------------------------------------------------------------------- map_genes


@pytest.fixture(scope="module")
def pbmc_var(pbmc3k_path: Path) -> pd.DataFrame:
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(pbmc3k_path, backed="r")
    var = adata.var.copy()
    adata.file.close()
    return var


def test_real_vocabulary_vs_pbmc3k(cellfm_vocab_path: Path, pbmc_var: pd.DataFrame) -> None:
    pre = GeneVocab.from_cellfm_file(cellfm_vocab_path)
    names = list(pbmc_var.index)
    m = map_genes(names, pre)
    expected_exact = len(set(names) & set(_first_column(cellfm_vocab_path)))
    assert m.counts["exact"] == expected_exact
    assert 12_500 <= m.counts["exact"] <= 13_300
    assert m.n_dataset == len(names) == 16_634
    # exact matches point at the right rows
    exact = np.flatnonzero(m.rule == "exact")
    np.testing.assert_array_equal(pre.names[m.pretrained_ids[exact] - 1], np.asarray(names)[exact])
    # no pretrained gene used twice; counts add up
    used = m.pretrained_ids[m.pretrained_ids > 0]
    assert len(np.unique(used)) == used.size == m.n_mapped
    assert sum(m.counts[r] for r in ("exact", "case", "previous", "alias", "ensembl")) == m.n_mapped
    assert m.counts["unmapped"] == len(names) - m.n_mapped
    assert m.coverage == pytest.approx(m.n_mapped / len(names))
    assert len(m.unmapped_examples) == 10
    assert m.unmapped_examples == [n for n, i in zip(names, m.pretrained_ids) if i == 0][:10]
    text = str(m)
    assert f"{m.n_mapped:,} of 16,634 genes" in text
    assert f"exact {expected_exact:,}" in text and "case-insensitive" in text
    assert m.unmapped_examples[0] in text


def test_real_vocabulary_ensembl_ids(cellfm_vocab_path: Path, pbmc_var: pd.DataFrame) -> None:
    pre = GeneVocab.from_cellfm_file(cellfm_vocab_path)
    names = list(pbmc_var.index)
    if pre.ensembl_ids is None:
        # CellFM's file has no Ensembl column: the rule is skipped, with a warning
        with pytest.warns(UserWarning, match="Ensembl"):
            m = map_genes(names, pre, ensembl_ids=pbmc_var["gene_ids"])
        assert m.counts["ensembl"] == 0
        assert m.n_mapped == map_genes(names, pre).n_mapped
    else:  # pragma: no cover - a future vocabulary file with Ensembl ids
        m = map_genes(names, pre, ensembl_ids=pbmc_var["gene_ids"])
        assert m.n_mapped >= map_genes(names, pre).n_mapped


def _tenx_symbols(var: pd.DataFrame) -> list[str]:
    """The 10x ``gene_symbols`` column behind pbmc3k's var_names: the ``-1``/``-2`` suffixes
    that ``var_names_make_unique`` added to repeated symbols are taken off again."""
    names = list(var.index)
    seen: set[str] = set()
    out = []
    for name in names:
        head, dash, tail = name.rpartition("-")
        out.append(head if dash and tail.isdigit() and head in seen else name)
        seen.add(out[-1])
    return out


def test_real_10x_gene_symbols_with_repeats(
    cellfm_vocab_path: Path, pbmc_var: pd.DataFrame
) -> None:
    pre = GeneVocab.from_cellfm_file(cellfm_vocab_path)
    symbols = _tenx_symbols(pbmc_var)
    repeated = pd.Index(symbols).duplicated(keep="first")
    assert 10 <= repeated.sum() <= 60  # pbmc3k: a few dozen symbols that 10x repeats
    m = map_genes(symbols, pre)  # used to raise: "duplicated gene name(s)"
    # every later occurrence is listed, under its symbol, with its position
    listed = sorted(p for pos in m.duplicate_symbols.values() for p in pos)
    assert listed == list(np.flatnonzero(repeated))
    for sym, pos in m.duplicate_symbols.items():
        assert all(symbols[p] == sym for p in pos)
        assert symbols.index(sym) < min(pos)
    # first occurrence wins: it maps exactly like the symbol alone; later ones stay unmapped
    first = ~repeated
    alone = map_genes([s for s, f in zip(symbols, first) if f], pre)
    np.testing.assert_array_equal(m.pretrained_ids[first], alone.pretrained_ids)
    assert not m.pretrained_ids[repeated].any()
    assert m.counts["duplicate_symbol"] == int(repeated.sum())
    assert "repeated symbol" in str(m) and "occur more than once" in str(m)
    # the model layer's call: symbols for mapping, unique Ensembl ids beside them
    with pytest.warns(UserWarning, match="Ensembl rule was skipped"):
        m2 = map_genes(symbols, pre, ensembl_ids=pbmc_var["gene_ids"])
    np.testing.assert_array_equal(m2.pretrained_ids, m.pretrained_ids)


def test_repeated_symbols_map_by_ensembl_id_only() -> None:
    pre = GeneVocab(["TBCE", "GAPDH", "ACTB"], ensembl_ids=["ENSG01", "ENSG02", "ENSG09"])
    symbols = ["TBCE", "GAPDH", "TBCE", "TBCE", "XYZ"]
    ids = ["ENSG05", "ENSG02", "ENSG09.4", "ENSG07", "ENSG03"]
    m = map_genes(symbols, pre, ensembl_ids=ids)
    # position 2 repeats TBCE but its Ensembl id is ACTB's: mapped by id, not by symbol
    np.testing.assert_array_equal(m.pretrained_ids, [1, 2, 3, 0, 0])
    assert list(m.rule) == ["exact", "exact", "ensembl", "", ""]
    assert m.duplicate_symbols == {"TBCE": [2, 3]}
    assert m.counts["duplicate_symbol"] == 1  # position 3: its id maps nowhere
    assert m.counts["unmapped"] == 2
    # the symbol rules never see a later occurrence, even case-insensitively
    m2 = map_genes(["tbce", "TBCE", "tbce"], pre)
    np.testing.assert_array_equal(m2.pretrained_ids, [0, 1, 0])
    assert m2.counts["duplicate_target"] == 1 and m2.counts["duplicate_symbol"] == 1


def test_case_rule_and_exact_priority() -> None:
    pre = GeneVocab.from_var_names(["ABC", "Def", "GHI", "Kx", "KX"])
    m = map_genes(["abc", "DEF", "GHI", "ghi", "kx"], pre)
    np.testing.assert_array_equal(m.pretrained_ids, [1, 2, 3, 0, 0])
    assert list(m.rule) == ["case", "case", "exact", "", ""]
    # "ghi" comes after "GHI" anyway, but the target is taken by the exact match
    assert m.counts["duplicate_target"] == 1
    assert m.counts["ambiguous_case"] == 1  # "kx" matches "Kx" and "KX"
    # exact beats an earlier case-insensitive candidate for the same target
    m2 = map_genes(["ghi", "GHI"], pre)
    np.testing.assert_array_equal(m2.pretrained_ids, [0, 3])


def test_hgnc_alias_previous_ambiguous_duplicate(tmp_path: Path) -> None:
    pre = GeneVocab.from_var_names(["TP53", "CDKN2A", "MYC", "KRAS", "EGFR", "BRCA1", "SEPTIN7"])
    hgnc = _write_hgnc(
        tmp_path / "hgnc.tsv",
        [
            ("TP53", "P53, LFS1", ""),
            ("CDKN2A", "P16, INK4A,MTS1", "CDKN2"),
            ("MYC", "c-Myc, bHLHe39", ""),
            ("KRAS", "", "KRAS2, RASK2"),
            ("EGFR", "AMB1, ERBB", "ERBB1"),
            ("BRCA1", "AMB1", ""),
            ("SEPTIN7", "CDC10", "SEPT7"),
            ("NOTINVOCAB", "ERBB", ""),  # ERBB: alias of EGFR and NOTINVOCAB -> ambiguous
            ("LFS1", "", ""),  # approved symbol that is also an alias of TP53: never re-read
        ],
    )
    dataset = [
        "UNKNOWN1",  # 0 unmapped
        "p16",  # 1 alias -> CDKN2A (case-insensitive alias lookup)
        "KRAS2",  # 2 previous -> KRAS
        "AMB1",  # 3 ambiguous alias (EGFR, BRCA1)
        "ERBB",  # 4 ambiguous alias (EGFR, NOTINVOCAB)
        "c-Myc",  # 5 alias -> MYC, but MYC (exact, later) takes it -> duplicate target
        "MYC",  # 6 exact
        "INK4A",  # 7 alias -> CDKN2A, taken by gene 1 (first in dataset order) -> duplicate
        "SEPT7",  # 8 previous -> SEPTIN7
        "LFS1",  # 9 approved elsewhere, not in vocab -> unmapped (not alias of TP53)
        "ERBB1",  # 10 previous -> EGFR
    ]
    m = map_genes(dataset, pre, hgnc_table=hgnc)
    ids = dict(zip(pre.names, pre.ids(pre.names)))
    expected = [
        0,
        ids["CDKN2A"],
        ids["KRAS"],
        0,
        0,
        0,
        ids["MYC"],
        0,
        ids["SEPTIN7"],
        0,
        ids["EGFR"],
    ]
    np.testing.assert_array_equal(m.pretrained_ids, expected)
    assert list(m.rule) == [
        "",
        "alias",
        "previous",
        "",
        "",
        "",
        "exact",
        "",
        "previous",
        "",
        "previous",
    ]
    assert m.counts["exact"] == 1 and m.counts["alias"] == 1 and m.counts["previous"] == 3
    assert m.counts["ambiguous_alias"] == 2
    assert m.counts["duplicate_target"] == 2
    assert m.counts["unmapped"] == 6 and m.n_mapped == 5
    assert m.unmapped_examples == ["UNKNOWN1", "AMB1", "ERBB", "c-Myc", "INK4A", "LFS1"]
    assert "alias 1" in str(m) and "previous symbol 3" in str(m) and "ambiguous alias 2" in str(m)
    # without the table only the exact match remains
    assert map_genes(dataset, pre).n_mapped == 1


def test_hgnc_table_needs_approved_symbol(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("Symbol\tAliases\nA\tB\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Approved symbol"):
        map_genes(["A"], GeneVocab.from_var_names(["A"]), hgnc_table=bad)


def test_ensembl_rule(tmp_path: Path) -> None:
    pre = GeneVocab.from_var_names(["GA", "GB", "GC", "GD"])
    p_ens = ["ENSG001.4", "ENSG002", None, "ENSG004.1"]
    dataset = ["GA", "RP11-1.1", "X2", "Y4", "Z4"]
    d_ens = ["ENSG001", "ENSG002.7", "ENSG999", "ENSG004", "ENSG004.2"]
    m = map_genes(dataset, pre, ensembl_ids=d_ens, pretrained_ensembl=p_ens)
    np.testing.assert_array_equal(m.pretrained_ids, [1, 2, 0, 4, 0])
    assert list(m.rule) == ["exact", "ensembl", "", "ensembl", ""]
    assert m.counts["ensembl"] == 2 and m.counts["duplicate_target"] == 1
    with pytest.raises(ValueError, match=r"3 entries .* 5 genes"):
        map_genes(dataset, pre, ensembl_ids=d_ens[:3], pretrained_ensembl=p_ens)
    with pytest.raises(ValueError, match=r"2 entries .* 4 genes"):
        map_genes(dataset, pre, ensembl_ids=d_ens, pretrained_ensembl=p_ens[:2])
    # Ensembl ids kept on the pretrained vocabulary are used by default
    pre_e = GeneVocab(pre.names, ensembl_ids=p_ens)
    assert np.array_equal(
        map_genes(dataset, pre_e, ensembl_ids=d_ens).pretrained_ids, m.pretrained_ids
    )
    # via an HGNC table's Ensembl column when the pretrained side has none
    hgnc = _write_hgnc(
        tmp_path / "h.tsv",
        [("GB", "", ""), ("GD", "", ""), ("OTHER", "", "")],
        ensembl=["ENSG002", "ENSG004.9", "ENSG999"],
    )
    m2 = map_genes(dataset, pre, hgnc_table=hgnc, ensembl_ids=d_ens)
    np.testing.assert_array_equal(m2.pretrained_ids, [1, 2, 0, 4, 0])


def test_mapping_is_fast_for_36601_genes(cellfm_vocab_path: Path) -> None:
    import time

    pre = GeneVocab.from_cellfm_file(cellfm_vocab_path)
    rng = np.random.default_rng(0)
    syms = list(rng.permutation(pre.names))
    n_changed = sum(s != s.lower() for s in syms[:500])
    syms[:500] = [s.lower() for s in syms[:500]]
    names = syms + [f"NOVEL{i}" for i in range(36601 - len(syms))]
    t0 = time.process_time()  # CPU time: the work, not the machine's load
    m = map_genes(names, pre)
    elapsed = time.process_time() - t0
    assert m.n_dataset == 36601 and m.n_mapped == 27855
    assert m.counts["case"] == n_changed > 400
    assert elapsed < 1.0, f"mapping 36,601 genes took {elapsed:.2f} s of CPU"


# ---------------------------------------------------------------------------- embedding


GOLDEN_ALIASES = {"ALIASA": 0, "ALIASB": 5, "ALIASC": 36}  # alias -> row of the golden vocab file


@pytest.fixture(scope="module")
def golden_case(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    vocab_path = golden_dir / "vocab_d48_h4_l2_g37.csv"
    symbols = _first_column(vocab_path)
    ckpt = np.load(golden_dir / "params_d48_h4_l2_g37_backbone.npz")["gene_emb"]
    assert ckpt.shape == (40, 48)
    rng = np.random.default_rng(7)
    alias_rows = set(GOLDEN_ALIASES.values())
    picks = [int(i) for i in rng.permutation([i for i in range(37) if i not in alias_rows])[:20]]
    unknown = [f"NOTAGENE{i}" for i in range(10)]
    entries = [(symbols[i], i + 1) for i in picks]
    entries += [(u, 0) for u in unknown]
    entries += [(a, r + 1) for a, r in GOLDEN_ALIASES.items()]
    order = rng.permutation(len(entries))
    entries = [entries[k] for k in order]
    names = [e[0] for e in entries]
    expected_ids = np.array([e[1] for e in entries], dtype=np.int64)
    hgnc = _write_hgnc(
        tmp_path_factory.mktemp("hgnc") / "hgnc.tsv",
        [(symbols[r], a, "") for a, r in GOLDEN_ALIASES.items()],
    )
    pre = GeneVocab.from_cellfm_file(vocab_path)
    vocab = GeneVocab.from_var_names(names)
    mapping = map_genes(vocab, pre, hgnc_table=hgnc)
    return vocab, pre, mapping, ckpt, expected_ids


def test_golden_mapping(golden_case) -> None:
    vocab, _, mapping, _, expected_ids = golden_case
    assert vocab.n_genes == 33 and vocab.padded_size == 40
    np.testing.assert_array_equal(mapping.pretrained_ids, expected_ids)
    assert mapping.n_mapped == 23
    assert mapping.counts["exact"] == 20 and mapping.counts["alias"] == 3
    assert mapping.counts["unmapped"] == 10


def test_golden_transfer(golden_case) -> None:
    vocab, _, mapping, ckpt, expected_ids = golden_case
    table = build_gene_embedding(vocab, torch.from_numpy(ckpt), mapping, init="transfer", seed=3)
    assert table.dtype == torch.float32 and tuple(table.shape) == (40, 48)
    t = table.numpy()
    for i, pid in enumerate(expected_ids):
        if pid:
            np.testing.assert_array_equal(t[i + 1], ckpt[pid])
    mapped_rows = {i + 1 for i, pid in enumerate(expected_ids) if pid}
    assert len(mapped_rows) == 23
    for r in range(1, 34):  # the unmapped gene rows (row 0 / padding rows are zero, as in ckpt)
        if r not in mapped_rows:
            assert not (t[r] == ckpt).all(axis=1).any(), f"row {r} equals a checkpoint row"
    assert not t[0].any() and not t[34:].any()
    # numpy input gives the same table; the random part is the random table's
    same = build_gene_embedding(vocab, ckpt, mapping, init="transfer", seed=3)
    assert torch.equal(same, table)
    rand = build_gene_embedding(vocab, ckpt, init="random", seed=3)
    other = [r for r in range(1, 34) if r not in mapped_rows]
    assert torch.equal(rand[other], table[other])


def test_golden_random(golden_case) -> None:
    vocab, _, _, ckpt, _ = golden_case
    a = build_gene_embedding(vocab, ckpt, init="random", seed=0)
    b = build_gene_embedding(vocab, ckpt, init="random", seed=0)
    c = build_gene_embedding(vocab, ckpt, init="random", seed=1)
    assert torch.equal(a, b)
    assert tuple(a.shape) == (40, 48) and a.dtype == torch.float32
    genes = slice(1, 34)
    assert (a[genes] != c[genes]).any(dim=1).all()
    t = a.numpy()
    for r in range(1, 34):
        assert not (t[r] == ckpt).all(axis=1).any()
        assert not np.allclose(t[r], ckpt[r])
    assert not t[0].any() and not t[34:].any()
    # independent recomputation: normal(0, sqrt(2 / (fan_in + fan_out))) on (40, 48)
    std = math.sqrt(2.0 / (40 + 48))
    ref = torch.empty(40, 48).normal_(0.0, std, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[genes], ref[genes])
    # its std is close to xavier's (33 * 48 draws)
    assert float(a[genes].std()) == pytest.approx(std, rel=0.1)
    # same without a pretrained table when dim is given
    assert torch.equal(build_gene_embedding(vocab, dim=48, seed=0), a)


def test_embedding_errors(golden_case) -> None:
    vocab, pre, mapping, ckpt, _ = golden_case
    with pytest.raises(ValueError, match="'random', 'transfer'"):
        build_gene_embedding(vocab, ckpt, mapping, init="xavier")
    with pytest.raises(ValueError, match="missing: mapping="):
        build_gene_embedding(vocab, ckpt, init="transfer")
    with pytest.raises(ValueError, match=r"missing: pretrained="):
        build_gene_embedding(vocab, mapping=mapping, init="transfer", dim=48)
    with pytest.raises(ValueError, match="dim="):
        build_gene_embedding(vocab)
    short = map_genes(list(vocab.names)[:30], pre)
    with pytest.raises(ValueError, match=r"30 .* 33"):
        build_gene_embedding(vocab, ckpt, short, init="transfer")
    with pytest.raises(ValueError, match=r"\(20, 48\)"):
        build_gene_embedding(vocab, ckpt[:20], mapping, init="transfer")
    with pytest.raises(ValueError, match="disagrees"):
        build_gene_embedding(vocab, ckpt, dim=64)


def test_mapping_str_small() -> None:
    m = GeneMapping(
        pretrained_ids=np.array([3, 0, 1], dtype=np.int64),
        rule=np.array(["exact", "", "case"]),
        counts={"exact": 1, "case": 1, "alias": 0, "previous": 0, "ensembl": 0, "unmapped": 1},
        unmapped_examples=["B"],
    )
    assert m.n_mapped == 2 and m.coverage == pytest.approx(2 / 3)
    s = str(m)
    assert s.startswith(
        "2 of 3 genes (66.7%) map to the pretrained vocabulary: exact 1, case-insensitive 1"
    )
    assert s.endswith("e.g. B")


def test_80m_shapes() -> None:
    vocab = GeneVocab.from_var_names([f"G{i}" for i in range(36601)])
    table = build_gene_embedding(vocab, dim=1536, seed=0)
    assert tuple(table.shape) == (36608, 1536) and table.dtype == torch.float32
    assert not table[0].any() and not table[36602:].any()
    assert table[1:36602].abs().sum(dim=1).gt(0).all()


# ---------------------------------------------------------------------------- unusable files


def test_checkpoint_passed_as_vocabulary_file(golden_dir: Path) -> None:
    ckpt = golden_dir / "model_d48_h4_l2_g37_backbone.ckpt"
    with pytest.raises(ValueError) as err:
        GeneVocab.from_cellfm_file(ckpt)
    msg = str(err.value)
    assert msg.startswith(f"vocabulary file {ckpt} is ")
    assert "checkpoint (.ckpt)" in msg and "offset" in msg


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.csv", b"", "is empty"),
        ("empty.txt", b"\n\n  \n", "is empty"),
        ("header.csv", b"HGNC_gene,h5_sample_frequency,biotype\n", "only the header line"),
        ("latin1.txt", "A1BG\nÅBC\n".encode("latin-1"), "not UTF-8 text (byte 0xc5 at offset 5)"),
        ("nul.txt", b"A1BG\n\x00\x01", "binary, not text (a NUL byte at offset 5)"),
    ],
)
def test_unusable_vocabulary_files(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        GeneVocab.from_cellfm_file(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    if name.endswith(".txt"):
        with pytest.raises(ValueError, match="vocabulary file"):
            GeneVocab.load(path)


def test_unreadable_vocabulary_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"vocabulary file .*nope\.csv cannot be read"):
        GeneVocab.from_cellfm_file(tmp_path / "nope.csv")
    with pytest.raises(IsADirectoryError, match=r"vocabulary file .* cannot be read"):
        GeneVocab.from_cellfm_file(tmp_path)


def test_byte_order_mark_is_not_part_of_the_first_symbol(tmp_path: Path) -> None:
    p = tmp_path / "excel.csv"
    p.write_bytes("HGNC_gene,x\r\nA1BG,1\r\nTP53,2\r\n".encode("utf-8-sig"))
    assert list(GeneVocab.from_cellfm_file(p).names) == ["A1BG", "TP53"]
    q = tmp_path / "plain.txt"
    q.write_bytes("A1BG\r\nTP53\r\n".encode("utf-8-sig"))
    assert list(GeneVocab.from_cellfm_file(q).names) == ["A1BG", "TP53"]


def test_binary_hgnc_table(tmp_path: Path, golden_dir: Path) -> None:
    pre = GeneVocab.from_var_names(["A", "B"])
    with pytest.raises(ValueError, match=r"HGNC table .*\.ckpt is "):
        map_genes(["A"], pre, hgnc_table=golden_dir / "model_d48_h4_l2_g37_backbone.ckpt")


# ---------------------------------------------------------------------------- CellFM CSV writer


def test_save_cellfm_file_matches_the_original_format(
    tmp_path: Path, cellfm_vocab_path: Path
) -> None:
    names = ["CD3E", "HLA-DRA", 'odd,"name"', "NA", "ÅBC"]
    v = GeneVocab.from_var_names(names)
    path = tmp_path / "vocab.csv"
    v.save_cellfm_file(path)
    original_header = cellfm_vocab_path.read_text(encoding="utf-8").split("\n", 1)[0]
    text = path.read_text(encoding="utf-8")
    assert text.split("\n", 1)[0] == original_header
    assert "\r" not in text and text.endswith("\n")
    assert _first_column(path) == names  # token id = row + 1, read by the csv module
    df = pd.read_csv(path, keep_default_na=False)  # as a pandas user of the original would
    assert list(df.columns) == original_header.split(",")
    assert list(df["HGNC_gene"]) == names
    back = GeneVocab.from_cellfm_file(path)
    assert back == v and back.ensembl_ids is None
    assert not [p for p in tmp_path.iterdir() if p.name != "vocab.csv"], "temp file left behind"


def test_save_cellfm_file_keeps_ensembl_ids_and_needs_csv(tmp_path: Path) -> None:
    v = GeneVocab(["A", "B", "C"], ensembl_ids=["ENSG01.2", None, "ENSG03"])
    path = tmp_path / "v.csv"
    v.save_cellfm_file(path)
    assert path.read_text(encoding="utf-8").split("\n")[0].endswith(",feature,ensembl_id")
    back = GeneVocab.from_cellfm_file(path)
    assert list(back.names) == ["A", "B", "C"]
    assert list(back.ensembl_ids) == ["ENSG01.2", None, "ENSG03"]
    with pytest.raises(ValueError, match=r"must end in \.csv"):
        v.save_cellfm_file(tmp_path / "v.txt")
