"""Freezing policies and LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellfm_sc.nn import CellFMConfig, CellFMTrunk, ClassificationHead, apply_trainable
from cellfm_sc.nn.trainable import merge_lora


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", dropout=0.0), n_genes=30)
        self.head = ClassificationHead(64, 3, hidden=16)

    def forward(self, values, ids, valid):
        return self.head(self.trunk(values, ids, valid).cls)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(30, generator=g)[:12] + 1 for _ in range(8)])
    return torch.rand(8, 12, generator=g), ids, torch.ones(8, 12, dtype=torch.bool)


EXPECTED = {
    "head": lambda n: n.startswith("head."),
    "encoder+head": lambda n: n.startswith(("head.", "trunk.encoder.")),
    "encoder+head+embedding": lambda n: (
        n.startswith(("head.", "trunk.encoder.")) or n == "trunk.gene_emb"
    ),
    "all": lambda n: True,
}


@pytest.mark.parametrize("policy", list(EXPECTED))
def test_policy_sets_requires_grad_and_frozen_tensors_stay_bit_identical(policy):
    torch.manual_seed(0)
    model = _Model()
    summary = apply_trainable(model, policy)
    for name, p in model.named_parameters():
        assert p.requires_grad == EXPECTED[policy](name), name
    assert summary.n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(*_batch()), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name, _ in model.named_parameters():
        if not EXPECTED[policy](name):
            assert name not in changed, f"frozen {name} changed"
    assert changed, "nothing trained"
    assert "trunk.encoder.0.attn.q_proj.weight" in changed or policy == "head"


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown trainable policy 'encoder'"):
        apply_trainable(_Model(), "encoder")


def test_lora_adds_adapters_only_on_projections_and_merges_exactly():
    pytest.importorskip("peft", reason="peft (optional extra 'lora') is not installed")
    torch.manual_seed(0)
    model = _Model()
    base_names = {n for n, _ in model.named_parameters()}
    summary = apply_trainable(model, "lora", rank=4, alpha=8)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    for n in lora_names:
        assert ".encoder." in n and (".attn." in n or ".ffn." in n), n
    # 8 projections x 2 layers x (A, B)
    assert len(lora_names) == 8 * 2 * 2
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n or n.startswith("head.")), n
    assert summary.n_trainable < summary.n_total
    # train the adapters a bit so merging is not trivial (B starts at zero)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for s in range(3):
        loss = model(*_batch(s)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    batch = _batch(5)
    with torch.no_grad():
        ref = model(*batch)
        merge_lora(model)
        merged = model(*batch)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert {n for n, _ in model.named_parameters()} == base_names
    torch.testing.assert_close(merged, ref, atol=1e-6, rtol=0)
