"""Export for pretraining: a trunk as a variant-A MindSpore checkpoint + its vocabulary CSV."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellfm_sc import load_pretrained_trunk
from cellfm_sc.io import (
    read_mindspore_checkpoint,
    save_trunk_mindspore,
    trunk_from_mindspore,
)
from cellfm_sc.io.mapping import to_mindspore_name, to_torch_names
from cellfm_sc.nn import CellFMConfig, CellFMTrunk
from cellfm_sc.vocab import GeneVocab


def _random_trunk(config: CellFMConfig, n_genes: int, seed: int = 0) -> CellFMTrunk:
    """Every parameter random (zero_emb, mask_emb and ``a`` start at 0 otherwise)."""
    torch.manual_seed(seed)
    trunk = CellFMTrunk(config, n_genes=n_genes)
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_(0, 0.5)
        trunk.gene_emb[0].zero_()
    return trunk.eval()


@pytest.mark.parametrize("zero_logit", [False, True])
def test_round_trip_gives_the_same_trunk_and_outputs(tmp_path, zero_logit):
    config = CellFMConfig.from_preset("tiny", zero_logit=zero_logit, dropout=0.0)
    assert config.zero_emb and config.decoders
    trunk = _random_trunk(config, n_genes=45)
    path = tmp_path / "pretrained.ckpt"
    save_trunk_mindspore(trunk, path)
    # dropout is not stored in a checkpoint
    back, report = trunk_from_mindspore(path, num_heads=config.num_heads, dropout=0.0)
    assert report.variant == "A" and report.skipped == []
    assert back.config == config
    assert back.gene_emb.shape == (48, 64)
    want, got = trunk.state_dict(), back.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    g = torch.Generator().manual_seed(1)
    values = torch.rand(3, 9, generator=g)
    ids = torch.randint(1, 46, (3, 9), generator=g)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 5:] = False
    unmask = (torch.rand(3, 9, generator=g) > 0.3).float()
    with torch.no_grad():
        a = trunk(values, ids, valid, unmask)
        b = back.eval()(values, ids, valid, unmask)
        assert torch.equal(a.cls, b.cls) and torch.equal(a.hidden, b.hidden)
        da = trunk.value_dec(a.hidden)
        db = back.value_dec(b.hidden)
        assert torch.equal(da[0], db[0])
        ca = trunk.cellwise_dec(a.cls, trunk.gene_emb[ids])
        cb = back.cellwise_dec(b.cls, back.gene_emb[ids])
        assert torch.equal(ca[0], cb[0])
        if zero_logit:
            assert torch.equal(da[1], db[1]) and torch.equal(ca[1], cb[1])


@pytest.mark.parametrize(
    ("manifest", "overrides"),
    [
        ("manifest_80M_cellfm_addzeroF_padzeroF.json", {}),
        ("manifest_80M_cellfm_addzeroT_padzeroF.json", {"zero_logit": True}),
        ("manifest_80M_backbone.json", {"zero_emb": False, "decoders": False}),
    ],
)
def test_names_order_and_dtypes_follow_the_golden_manifests(
    golden_dir, tmp_path, manifest, overrides
):
    params = json.loads((golden_dir / manifest).read_text())["parameters"]
    # the 80M structure (2 layers, 256 value bins) at a small width
    config = CellFMConfig(enc_dims=48, num_heads=4, n_layers=2, **overrides)
    trunk = _random_trunk(config, n_genes=20)
    path = tmp_path / "m.ckpt"
    save_trunk_mindspore(trunk, path)
    state = read_mindspore_checkpoint(path)
    assert list(state) == [p["name"] for p in params]
    for p in params:
        shape = [{1536: 48, 27856: 24}.get(d, d) for d in p["shape"]]
        assert list(state[p["name"]].shape) == shape, p["name"]
        assert p["dtype"] == "Float32" and state[p["name"]].dtype == np.float32


@pytest.mark.parametrize(
    "name",
    [
        "d48_h4_l2_g37_cellfm_nopadzero",
        "d48_h4_l2_g37_cellfm_nopadzero_addzero",
        "d64_h8_l4_g101_backbone",
        "d64_h8_l4_g101_cellfm_padzero",
    ],
)
def test_export_of_a_loaded_golden_checkpoint_is_byte_identical(golden_dir, tmp_path, name):
    """Written by MindSpore, read by us, written by us: the same bytes."""
    heads = int(name.split("_h")[1].split("_")[0])
    trunk, _ = trunk_from_mindspore(golden_dir / f"model_{name}.ckpt", num_heads=heads)
    path = tmp_path / "again.ckpt"
    save_trunk_mindspore(trunk, path)
    assert path.read_bytes() == (golden_dir / f"model_{name}.ckpt").read_bytes()


def test_variant_b_round_trip(golden_dir, tmp_path):
    with pytest.warns(UserWarning, match="ST tokens"):
        trunk, _ = trunk_from_mindspore(golden_dir / "model_b_d48_h4_l2_g37.ckpt", num_heads=4)
    path = tmp_path / "b.ckpt"
    save_trunk_mindspore(trunk, path)
    ours = read_mindspore_checkpoint(path)
    theirs = read_mindspore_checkpoint(golden_dir / "model_b_d48_h4_l2_g37.ckpt")
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_name_mapping_is_an_exact_inverse(golden_dir):
    names = list(read_mindspore_checkpoint(golden_dir / "model_b_d48_h4_l2_g37.ckpt"))
    names += list(read_mindspore_checkpoint(golden_dir / "model_d64_h8_l4_g101_backbone.ckpt"))
    for n in names:
        assert to_mindspore_name(to_torch_names(n)) == n
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", zero_logit=True), n_genes=5)
    for n, _ in trunk.named_parameters():
        assert to_torch_names(to_mindspore_name(n)) == n
    assert to_mindspore_name("encoder.3.post_norm2.weight") == "encoder.3.post_norm2.gamma"
    assert to_mindspore_name("value_dec.zero_logit.0.bias") == "value_dec.zero_logit.0.bias"


def test_bfloat16_trunk_is_written_as_float32(tmp_path):
    trunk = _random_trunk(CellFMConfig.from_preset("tiny"), n_genes=10).to(torch.bfloat16)
    save_trunk_mindspore(trunk, tmp_path / "x.ckpt")
    state = read_mindspore_checkpoint(tmp_path / "x.ckpt")
    assert {a.dtype for a in state.values()} == {np.dtype("float32")}
    np.testing.assert_array_equal(state["cls_token"], trunk.cls_token.float().detach().numpy())


def test_a_trunk_with_foreign_parameters_is_refused(tmp_path):
    trunk = _random_trunk(CellFMConfig.from_preset("tiny"), n_genes=10)
    trunk.encoder[0].attn.q_proj.lora_A = torch.nn.Linear(64, 4, bias=False)
    with pytest.raises(ValueError, match=r"LoRA adapters\? merge them first.*lora_A"):
        save_trunk_mindspore(trunk, tmp_path / "x.ckpt")
    assert not list(tmp_path.iterdir())


def test_pretrainer_export_fine_tunes_with_transfer(tmp_path):
    """checkpoint= + vocabulary_file= + embedding_init="transfer" on the exported pair."""
    symbols = [f"GENE{i}" for i in range(60)] + ["HLA-A", 'odd,"name"', "ÅBC"]
    vocab = GeneVocab.from_var_names(symbols)
    config = CellFMConfig.from_preset("tiny", dropout=0.0)
    trunk = _random_trunk(config, n_genes=vocab.n_genes, seed=3)
    ckpt, csv_path = tmp_path / "pre.ckpt", tmp_path / "pre_vocab.csv"
    save_trunk_mindspore(trunk, ckpt)
    vocab.save_cellfm_file(csv_path)
    # a dataset with a subset of the genes, in another order, plus none unknown
    rng = np.random.default_rng(0)
    dataset = [symbols[i] for i in rng.permutation(len(symbols))[:40]]
    new, report = load_pretrained_trunk(
        ckpt, dataset, vocabulary_file=csv_path, embedding_init="transfer", num_heads=4
    )
    assert report.mapping.n_mapped == 40 and report.mapping.coverage == 1.0
    rows = vocab.ids(dataset)
    torch.testing.assert_close(new.gene_emb[1:41], trunk.gene_emb[rows], atol=0, rtol=0)
    for name, p in trunk.named_parameters():
        if name != "gene_emb":
            assert torch.equal(dict(new.named_parameters())[name], p), name
