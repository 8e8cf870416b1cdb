"""CellFM's masked-value objective: the loss against an independent float64 computation on
golden checkpoints, parity with the original's pretraining forward, and the masking rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfm_sc.data import TokenBatch
from cellfm_sc.model import CellFMPretrainModule, select_masked_tokens
from cellfm_sc.nn import CellFMConfig, CellFMTrunk

# --------------------------------------------------------------------------------------------
# an independent float64 reference of the model and the loss (numpy, from the checkpoint's
# own arrays and DESIGN.md sections 4 and 7)
# --------------------------------------------------------------------------------------------


def _leaky(x):
    return np.where(x >= 0, x, 0.2 * x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _layer_norm(x, gamma, beta, eps=1e-7):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


class Reference:
    """float64 CellFM pretraining forward + loss written from the spec, not from our code."""

    def __init__(self, params: dict[str, np.ndarray], heads: int) -> None:
        self.p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        self.heads = heads
        self.n_layers = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("encoder."))

    def value_embedding(self, x: float) -> np.ndarray:
        p = self.p
        h = _leaky(p["value_enc.value_enc.w1.weight"][:, 0] * x)
        h = p["value_enc.value_enc.w3.weight"] @ h + p["value_enc.value_enc.a"][0, 0] * h
        h = np.exp(h - h.max())
        h /= h.sum()
        return p["value_enc.value_enc.table.weight"] @ h

    def encode(self, values, genes, valid, hidden):
        """One cell: ``values/genes/valid/hidden (L,)`` -> ``(cls (D,), states (L, D))``."""
        p = self.p
        length = values.shape[0]
        d = p["gene_emb"].shape[1]
        tok = np.zeros((length, d))
        for j in range(length):
            emb = p["value_enc.mask_emb"][0, 0] if hidden[j] else self.value_embedding(values[j])
            tok[j] = (emb + p["gene_emb"][genes[j]]) * valid[j]
        x = np.concatenate([p["cls_token"][0], tok], axis=0)
        hd = d // self.heads
        alpha = (2.0 * self.n_layers) ** 0.25
        n_valid = valid.sum()
        for i in range(self.n_layers):
            pre = f"encoder.{i}."
            keys = valid & ~hidden if i < self.n_layers // 2 else valid
            kmask = np.concatenate([[1.0], keys.astype(np.float64)])[:, None]
            q = np.maximum(x @ p[pre + "attn.q_proj.weight"].T, 0)
            k = np.maximum(x @ p[pre + "attn.k_proj.weight"].T, 0) * kmask
            v = (x @ p[pre + "attn.v_proj.weight"].T) / np.sqrt(n_valid)
            u = x @ p[pre + "attn.u_proj.weight"].T
            u = u * _sigmoid(u)
            out = np.zeros_like(x)
            for h in range(self.heads):
                s = slice(h * hd, (h + 1) * hd)
                o = (q[:, s] / np.sqrt(hd)) @ ((k[:, s] / np.sqrt(hd)).T @ v[:, s])
                rms = np.linalg.norm(o / np.sqrt(hd), axis=-1, keepdims=True)
                out[:, s] = o / np.maximum(rms, 1e-12) * u[:, s]
            attn = out @ p[pre + "attn.o_proj.weight"].T
            x = _layer_norm(
                alpha * x + attn, p[pre + "post_norm1.gamma"], p[pre + "post_norm1.beta"]
            )
            glu = (x @ p[pre + "ffn.u_proj.weight"].T) * (x @ p[pre + "ffn.v_proj.weight"].T)
            glu = glu @ p[pre + "ffn.o_proj.weight"].T
            x = _layer_norm(
                alpha * x + glu, p[pre + "post_norm2.gamma"], p[pre + "post_norm2.beta"]
            )
        return x[0], x[1:]

    def predictions(self, values, genes, valid, hidden):
        p = self.p
        cls, states = self.encode(values, genes, valid, hidden)
        gw = (_leaky(states @ p["value_dec.w1.weight"].T) @ p["value_dec.w2.weight"].T)[:, 0]
        gene_rows = p["gene_emb"][genes]
        cw = _sigmoid(gene_rows @ p["cellwise_dec.map.weight"].T) @ cls
        zero = None
        if "value_dec.zero_logit.0.weight" in p:
            z = states
            for j in (0, 2):
                w, b = p[f"value_dec.zero_logit.{j}.weight"], p[f"value_dec.zero_logit.{j}.bias"]
                z = _leaky(z @ w.T + b)
            z = z @ p["value_dec.zero_logit.4.weight"].T + p["value_dec.zero_logit.4.bias"]
            gw_zero = _sigmoid(z[:, 0])
            cz = (
                gene_rows @ p["cellwise_dec.zero_logit.weight"].T
                + p["cellwise_dec.zero_logit.bias"]
            )
            cw_zero = _sigmoid(cz @ cls)
            zero = (gw_zero, cw_zero)
        return gw, cw, zero

    def loss(self, values, genes, valid, hidden, selected):
        """Batch loss: both decoders' squared errors averaged over every selected token, plus
        the zero BCE terms when a valid token has value 0."""
        se = bce = 0.0
        n = 0
        any_zero = bool(((values == 0) & valid).any())
        for b in range(values.shape[0]):
            gw, cw, zero = self.predictions(values[b], genes[b], valid[b], hidden[b])
            sel = selected[b]
            x = values[b]
            se += ((gw - x) ** 2)[sel].sum() + ((cw - x) ** 2)[sel].sum()
            n += int(sel.sum())
            if zero is not None and any_zero:
                t = (x == 0).astype(np.float64)
                for prob in zero:
                    term = -(t * np.log(prob) + (1 - t) * np.log(1 - prob))
                    bce += term[sel].sum()
        return (se + bce) / max(n, 1)


def _golden(golden_dir, name):
    params = dict(np.load(golden_dir / f"params_{name}.npz"))
    heads = int(name.split("_h")[1].split("_")[0])
    trunk = CellFMTrunk.from_mindspore(golden_dir / f"model_{name}.ckpt", num_heads=heads)
    return params, heads, CellFMPretrainModule(trunk.eval()).eval()


def _masked_case(golden_dir, name):
    case = np.load(golden_dir / f"golden_{name}__masked3d.npz")
    valid = case["in_zero_idx"][:, 1:] > 0
    values = case["in_raw_nzdata"].astype(np.float32)  # the true values (targets)
    unmask = case["in_expr"][..., 0] > 0
    hidden = valid & ~unmask
    selected = (case["in_mask_gene"] > 0) & valid
    return case, values, case["in_gene"].astype(np.int64), valid, hidden, selected


def _batch(values, genes, valid) -> TokenBatch:
    return TokenBatch(
        values=torch.as_tensor(values, dtype=torch.float32),
        gene_ids=torch.as_tensor(genes),
        valid=torch.as_tensor(valid),
        n_tokens=torch.as_tensor(valid.sum(1)),
        obs_index=torch.arange(values.shape[0]),
    )


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d48_h4_l2_g37_cellfm_padzero", "d64_h8_l4_g101_cellfm_padzero"])
def test_pretraining_forward_matches_the_original(golden_dir, name):
    """Predictions of both decoders equal MindSpore's masked3d outputs (hidden tokens are no
    keys in the first half of the layers, as in the original)."""
    _, _, module = _golden(golden_dir, name)
    case, _, genes, valid, hidden, _ = _masked_case(golden_dir, name)
    batch = _batch(case["in_expr"][..., 1], genes, valid)
    with torch.no_grad():
        out = module(batch, torch.as_tensor(hidden))
    np.testing.assert_allclose(out.value_pred.numpy()[valid], case["out_gw_pred"][valid], atol=5e-5)
    np.testing.assert_allclose(out.cell_pred.numpy()[valid], case["out_cw_pred"][valid], atol=5e-5)
    np.testing.assert_allclose(out.cls.numpy(), case["out_cls"], atol=5e-5)


@pytest.mark.parametrize("name", ["d48_h4_l2_g37_cellfm_padzero", "d64_h8_l4_g101_cellfm_padzero"])
def test_loss_equals_independent_float64_computation(golden_dir, name):
    params, heads, module = _golden(golden_dir, name)
    ref = Reference(params, heads)
    _, values, genes, valid, hidden, selected = _masked_case(golden_dir, name)
    assert hidden.sum() < selected.sum() and (selected & ~hidden).any()  # both kinds present
    want = ref.loss(values.astype(np.float64), genes, valid, hidden, selected)
    batch = _batch(values, genes, valid)
    with torch.no_grad():
        out = module(batch, torch.as_tensor(hidden))
        got = module.loss(out, batch.values, torch.as_tensor(selected), batch.valid)
    assert got.loss.dtype == torch.float32
    assert abs(float(got.loss) - want) <= 1e-5 * abs(want)
    assert float(got.n_selected) == selected.sum()
    # a wrong rule is seen: all valid tokens, or the mean of the per-cell means
    with torch.no_grad():
        everything = module.loss(out, batch.values, batch.valid, batch.valid)
    assert abs(float(everything.loss) - want) > 1e-3 * abs(want)


def test_loss_counts_selected_tokens_only(golden_dir):
    _, _, module = _golden(golden_dir, "d48_h4_l2_g37_cellfm_padzero")
    _, values, genes, valid, hidden, selected = _masked_case(
        golden_dir, "d48_h4_l2_g37_cellfm_padzero"
    )
    batch = _batch(values, genes, valid)
    sel = torch.as_tensor(selected)
    with torch.no_grad():
        out = module(batch, torch.as_tensor(hidden))
        base = module.loss(out, batch.values, sel, batch.valid).loss
        other = batch.values.clone()
        other[~sel] += 3.0  # targets of unselected tokens do not matter
        assert torch.equal(module.loss(out, other, sel, batch.valid).loss, base)
        other = batch.values.clone()
        other[sel] += 3.0
        assert float(module.loss(out, other, sel, batch.valid).loss) > float(base) + 1.0
        # a cell of weight 0 (distributed padding copy) does not count
        w = torch.ones(values.shape[0])
        w[1] = 0
        weighted = module.loss(out, batch.values, sel, batch.valid, w)
        keep = [0, 2, 3]
        sub = module.loss(
            type(out)(out.value_pred[keep], out.cell_pred[keep], out.cls[keep]),
            batch.values[keep],
            sel[keep],
            batch.valid[keep],
        )
    torch.testing.assert_close(weighted.loss, sub.loss)


def test_zero_logit_bce_only_with_zero_tokens(golden_dir):
    name = "d48_h4_l2_g37_cellfm_nopadzero_addzero"
    params, heads, module = _golden(golden_dir, name)
    assert module.trunk.config.zero_logit
    ref = Reference(params, heads)
    rng = np.random.default_rng(3)
    genes = np.stack([rng.choice(np.arange(1, 38), 12, replace=False) for _ in range(3)])
    valid = np.ones((3, 12), dtype=bool)
    valid[2, 9:] = False
    values = rng.uniform(0.5, 6.0, size=(3, 12)).astype(np.float32) * valid
    selected = np.zeros_like(valid)
    selected[:, [1, 4, 6]] = True
    hidden = np.zeros_like(valid)
    hidden[:, [1, 4]] = True
    for with_zeros in (False, True):
        vals = values.copy()
        if with_zeros:
            vals[0, 4] = vals[1, 6] = 0.0  # zero-valued genes in the sequence
        want = ref.loss(vals.astype(np.float64), genes, valid, hidden, selected)
        batch = _batch(vals, genes, valid)
        with torch.no_grad():
            out = module(batch, torch.as_tensor(hidden))
            got = module.loss(out, batch.values, torch.as_tensor(selected), batch.valid)
        assert abs(float(got.loss) - want) <= 1e-5 * abs(want)
        assert (float(got.bce) > 0) == with_zeros


@pytest.mark.parametrize("n_valid", [1, 2, 3, 7, 10, 13, 24, 101])
def test_masking_counts_follow_the_rule(n_valid):
    length = 110
    valid = torch.zeros(64, length, dtype=torch.bool)
    valid[:, :n_valid] = True
    perm = torch.stack([torch.randperm(length) for _ in range(64)])
    valid = torch.gather(valid, 1, perm)  # valid tokens anywhere in the row
    gen = torch.Generator().manual_seed(n_valid)
    selected, hidden = select_masked_tokens(valid, 0.2, 0.8, gen)
    n_sel = round(0.2 * n_valid)
    assert (selected.sum(1) == n_sel).all()
    assert (hidden.sum(1) == int(np.floor(0.8 * n_sel + 1e-9))).all()
    assert not (selected & ~valid).any() and not (hidden & ~selected).any()


def test_masking_is_uniform_and_reproducible():
    n_valid, length, draws = 10, 16, 4000
    valid = torch.zeros(draws, length, dtype=torch.bool)
    valid[:, 3 : 3 + n_valid] = True
    selected, hidden = select_masked_tokens(valid, 0.5, 0.8, torch.Generator().manual_seed(0))
    # every valid position: P(selected) = 5/10, P(hidden) = 4/10; 4000 draws -> sd ~0.008
    p_sel = selected[:, 3 : 3 + n_valid].float().mean(0)
    p_hid = hidden[:, 3 : 3 + n_valid].float().mean(0)
    assert torch.allclose(p_sel, torch.full_like(p_sel, 0.5), atol=0.035)
    assert torch.allclose(p_hid, torch.full_like(p_hid, 0.4), atol=0.035)
    # pairs of positions are selected together as often as sampling without replacement says
    both = (selected[:, 3] & selected[:, 4]).float().mean()
    assert abs(float(both) - (5 / 10) * (4 / 9)) < 0.03
    again = select_masked_tokens(valid, 0.5, 0.8, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], selected) and torch.equal(again[1], hidden)
    other = select_masked_tokens(valid, 0.5, 0.8, torch.Generator().manual_seed(1))
    assert not torch.equal(other[0], selected)


def test_masking_rejects_bad_ratios():
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask_ratio"):
        select_masked_tokens(valid, 1.5)
    with pytest.raises(ValueError, match="hide_fraction"):
        select_masked_tokens(valid, 0.2, -0.1)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", decoders=False, zero_emb=False), 10)
    with pytest.raises(ValueError, match="decoders"):
        CellFMPretrainModule(trunk)


def _forbid_host_reads(monkeypatch):
    """Every device -> host read of a tensor value, and boolean-mask indexing, raises."""

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}: a GPU -> CPU sync")

        return f

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    getitem = torch.Tensor.__getitem__

    def checked(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        for part in parts:
            if isinstance(part, torch.Tensor) and part.dtype == torch.bool:
                raise AssertionError("boolean-mask indexing: a GPU -> CPU sync")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked)
    for name in ("nonzero", "masked_select"):
        monkeypatch.setattr(torch, name, refuse(name))


@pytest.mark.parametrize("zero_logit", [False, True])
def test_objective_reads_nothing_back_to_the_host(monkeypatch, zero_logit):
    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", zero_logit=zero_logit), n_genes=40)
    module = CellFMPretrainModule(trunk).train()
    valid = torch.rand(4, 9) > 0.3
    valid[:, :3] = True
    batch = _batch(torch.rand(4, 9) * valid, torch.randint(1, 41, (4, 9)) * valid, valid)
    gen = torch.Generator().manual_seed(0)
    _forbid_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="sync"):  # the guard is live
        valid[valid]
    _, parts = module.masked_loss(batch, gen)
    parts.loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(parts.loss)
    grads = {n for n, p in module.named_parameters() if p.grad is not None}
    assert {
        "trunk.value_enc.mask_emb",
        "trunk.value_dec.w1.weight",
        "trunk.cellwise_dec.map.weight",
    } <= grads
