"""Trunk parity with the original MindSpore CellFM (golden data) and its invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellfm_sc.io.mapping import infer_config, load_trunk_state, split_state
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, require_valid_tokens


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _heads(name: str) -> int:
    return int(name.split("_h")[1].split("_")[0])


def _run(trunk: CellFMTrunk, case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    valid = case["in_zero_idx"][:, 1:] > 0 if "in_zero_idx" in case else case["in_valid"] > 0
    trunk.eval()
    with torch.no_grad():
        out = trunk(
            torch.from_numpy(case["in_expr"]),
            torch.from_numpy(case["in_gene"].astype(np.int64)),
            torch.from_numpy(valid),
        )
    return out.cls.numpy(), out.hidden.numpy(), valid


@pytest.mark.parametrize(
    "name",
    ["d48_h4_l2_g37_backbone", "d64_h8_l4_g101_backbone", "d48_h4_l2_g37_cellfm_padzero"],
)
def test_parity_with_mindspore_golden(golden_dir, name):
    trunk = CellFMTrunk.from_mindspore(golden_dir / f"model_{name}.ckpt", num_heads=_heads(name))
    case = np.load(golden_dir / f"golden_{name}__plain2d.npz")
    cls, hidden, valid = _run(trunk, case)
    enc = case["out_encoder"]
    assert rel_l2(cls, enc[:, 0]) <= 1e-5
    for b in range(cls.shape[0]):
        assert rel_l2(hidden[b][valid[b]], enc[b, 1:][valid[b]]) <= 1e-5, f"cell {b}"
    # the cls-only forward (what the classifier loss and embeddings run) matches as well
    with torch.no_grad():
        cls_only = trunk(
            torch.from_numpy(case["in_expr"]),
            torch.from_numpy(case["in_gene"].astype(np.int64)),
            torch.from_numpy(valid),
            return_hidden=False,
        ).cls.numpy()
    assert rel_l2(cls_only, enc[:, 0]) <= 1e-5


def test_variant_b_parity(golden_dir):
    with pytest.warns(UserWarning, match="ST tokens"):
        trunk = CellFMTrunk.from_mindspore(golden_dir / "model_b_d48_h4_l2_g37.ckpt", num_heads=4)
    assert trunk.load_report.variant == "B"
    assert "variant B" in str(trunk.load_report)
    case = np.load(golden_dir / "golden_b_d48_h4_l2_g37.npz")
    cls, hidden, valid = _run(trunk, case)
    assert rel_l2(cls, case["out_cls"]) <= 1e-5
    for b in range(cls.shape[0]):
        assert rel_l2(hidden[b][valid[b]], case["out_genes"][b][valid[b]]) <= 1e-5
    # hidden never holds the cls or ST tokens
    assert hidden.shape[1] == case["in_gene"].shape[1]


def test_four_layer_padzero_matches_on_unpadded_cell_and_is_padding_invariant(golden_dir):
    name = "d64_h8_l4_g101_cellfm_padzero"
    trunk = CellFMTrunk.from_mindspore(golden_dir / f"model_{name}.ckpt", num_heads=8).eval()
    case = np.load(golden_dir / f"golden_{name}__plain2d.npz")
    cls, hidden, valid = _run(trunk, case)
    longest = int(np.argmax(valid.sum(1)))
    assert valid[longest].all()  # no padding in that cell
    assert rel_l2(cls[longest], case["out_encoder"][longest, 0]) <= 1e-5
    assert rel_l2(hidden[longest], case["out_encoder"][longest, 1:]) <= 1e-5
    # the original lets padding leak into keys in its first layers; ours does not. In float64
    # the outputs agree to rounding; in float32 GEMM kernels differ with the matrix shape, so
    # we ask for 5e-6 relative L2 there (measured ~1e-6; a leak changes outputs by ~0.4).
    for dtype, check in ((torch.float64, "abs"), (torch.float32, "rel")):
        model = trunk.to(dtype)
        values = torch.from_numpy(case["in_expr"]).to(dtype)
        ids = torch.from_numpy(case["in_gene"].astype(np.int64))
        vmask = torch.from_numpy(valid)
        with torch.no_grad():
            batched = model(values, ids, vmask)
            for b in range(values.shape[0]):
                n = int(vmask[b].sum())
                alone = model(values[b : b + 1, :n], ids[b : b + 1, :n], vmask[b : b + 1, :n])
                pad = 7  # padding beyond the batch's longest cell changes nothing either
                padded = model(
                    torch.nn.functional.pad(values[b : b + 1, :n], (0, pad)),
                    torch.nn.functional.pad(ids[b : b + 1, :n], (0, pad)),
                    torch.nn.functional.pad(vmask[b : b + 1, :n], (0, pad)),
                )
                pairs = [
                    (batched.cls[b], alone.cls[0]),
                    (batched.hidden[b, :n], alone.hidden[0]),
                    (padded.cls[0], alone.cls[0]),
                    (padded.hidden[0, :n], alone.hidden[0]),
                ]
                for got, want in pairs:
                    if check == "abs":
                        assert (got - want).abs().max().item() <= 1e-10
                    else:
                        assert rel_l2(got.numpy(), want.numpy()) <= 5e-6
    trunk.float()


def test_decoders_match_golden(golden_dir):
    name = "d48_h4_l2_g37_cellfm_nopadzero_addzero"
    trunk = CellFMTrunk.from_mindspore(golden_dir / f"model_{name}.ckpt", num_heads=4).eval()
    assert trunk.config.zero_logit and trunk.config.decoders
    case = np.load(golden_dir / f"golden_{name}__plain2d.npz")
    with torch.no_grad():
        gw, gw_zero = trunk.value_dec(torch.from_numpy(case["out_expr_emb"]))
        cw, cw_zero = trunk.cellwise_dec(
            torch.from_numpy(case["out_cls"]), torch.from_numpy(case["out_gene_emb"])
        )
    np.testing.assert_allclose(gw.numpy(), case["out_gw_pred"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cw.numpy(), case["out_cw_pred"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(
        gw_zero.numpy(), case["out_gw_zero_prob"].reshape(gw.shape), atol=1e-6
    )
    np.testing.assert_allclose(
        cw_zero.numpy(), case["out_cw_zero_prob"].reshape(cw.shape), atol=1e-6
    )


def test_optimizer_entries_are_skipped_and_reported(golden_dir):
    path = golden_dir / "model_d64_h8_l4_g101_cellfm_nopadzero_with_optimizer.ckpt"
    trunk = CellFMTrunk.from_mindspore(path, num_heads=8)
    report = trunk.load_report
    assert len(report.skipped) == 127
    assert {"global_step", "scale_sense", "epoch_num"} <= set(report.skipped)
    assert report.variant == "A"
    assert "skipped 127" in str(report)
    plain = np.load(golden_dir / "params_d64_h8_l4_g101_cellfm_nopadzero.npz")
    np.testing.assert_array_equal(trunk.gene_emb.detach().numpy(), plain["gene_emb"])


def _manifest_state(path):
    manifest = json.loads(path.read_text())
    return {p["name"]: np.zeros(p["shape"], dtype=np.float32) for p in manifest["parameters"]}


@pytest.mark.parametrize(
    ("manifest", "variant"),
    [
        ("manifest_80M_cellfm_addzeroF_padzeroF.json", "A"),
        ("manifest_80M_cellfm_addzeroT_padzeroF.json", "A"),
        ("manifest_80M_backbone.json", "A'"),
    ],
)
def test_80m_manifest_loads_into_preset(golden_dir, manifest, variant):
    state = _manifest_state(golden_dir / manifest)
    model, _, _ = split_state(state)
    cfg, rows = infer_config(model)  # num_heads defaults to 48 for enc_dims 1536
    preset = CellFMConfig.from_preset("80M")
    assert (cfg.enc_dims, cfg.num_heads, cfg.n_layers) == (
        preset.enc_dims,
        preset.num_heads,
        preset.n_layers,
    )
    assert rows == 27856
    trunk = CellFMTrunk(cfg, n_genes=27855)
    report = load_trunk_state(trunk, state)
    assert report.variant == variant
    assert len(report.loaded) == len(state)
    # one tensor with a wrong shape raises naming it and both shapes
    state["encoder.1.attn.k_proj.weight"] = np.zeros((1536, 1535), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"encoder\.1\.attn\.k_proj\.weight.*\(1536, 1535\).*\(1536, 1536\)"
    ):
        load_trunk_state(trunk, state)


def test_missing_and_unexpected_parameters_raise(golden_dir):
    state = dict(np.load(golden_dir / "params_d48_h4_l2_g37_backbone.npz"))
    model, _, _ = split_state(state)
    cfg, rows = infer_config(model, num_heads=4)
    trunk = CellFMTrunk(cfg, rows - 1)
    broken = {k: v for k, v in state.items() if k != "encoder.0.ffn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"missing.*encoder\.0\.ffn\.v_proj\.weight"):
        load_trunk_state(trunk, broken)
    extra = {**state, "encoder.0.attn.extra.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"not in the trunk.*encoder\.0\.attn\.extra\.weight"):
        load_trunk_state(trunk, extra)
    # a wrapper prefix on every key is stripped; bookkeeping is skipped
    wrapped = {f"network.{k}": v for k, v in state.items()}
    wrapped["global_step"] = np.array([3], dtype=np.int32)
    report = load_trunk_state(trunk, wrapped)
    assert report.prefix == "network."
    assert report.skipped == ["global_step"]


def test_num_heads_required_off_the_released_width(golden_dir):
    with pytest.raises(ValueError, match="num_heads"):
        CellFMTrunk.from_mindspore(golden_dir / "model_d48_h4_l2_g37_backbone.ckpt")


def test_bf16_autocast_close_to_float32(golden_dir):
    trunk = CellFMTrunk.from_mindspore(
        golden_dir / "model_d64_h8_l4_g101_backbone.ckpt", num_heads=8
    ).eval()
    case = np.load(golden_dir / "golden_d64_h8_l4_g101_backbone__plain2d.npz")
    args = (
        torch.from_numpy(case["in_expr"]),
        torch.from_numpy(case["in_gene"].astype(np.int64)),
        torch.from_numpy(case["in_zero_idx"][:, 1:] > 0),
    )
    with torch.no_grad():
        ref = trunk(*args).cls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = trunk(*args).cls
            low_cls_only = trunk(*args, return_hidden=False).cls  # the few-query last layer
    assert rel_l2(low.float().numpy(), ref.numpy()) <= 2e-2
    assert rel_l2(low_cls_only.float().numpy(), ref.numpy()) <= 2e-2


def test_cell_without_valid_gene_opt_in_check_and_forward_behaviour():
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=10).eval()
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    # the explicit check names the cell
    with pytest.raises(
        ValueError, match=r"1 cell\(s\) at batch positions \[1\] have no valid gene"
    ):
        require_valid_tokens(valid)
    require_valid_tokens(valid[[0, 2]])
    # forward does not check (no GPU sync): the empty cell is NaN, the others are unaffected
    values, ids = torch.rand(3, 2), torch.tensor([[1, 2], [3, 4], [5, 6]])
    with torch.no_grad():
        out = trunk(values, ids, valid)
        alone = trunk(values[[0, 2]], ids[[0, 2]], valid[[0, 2]])
    assert torch.isnan(out.cls[1]).all()
    torch.testing.assert_close(out.cls[[0, 2]], alone.cls, atol=1e-6, rtol=0)


def _forbid_host_reads(monkeypatch):
    """Make every device -> host read of a tensor value raise (what would sync a GPU)."""

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called in a forward: a GPU -> CPU sync")

        return f

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("training", [False, True])
def test_forward_reads_no_tensor_value_back_to_the_host(monkeypatch, training):
    from cellfm_sc.nn import ClassificationHead

    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", zero_logit=True), n_genes=30)
    head = ClassificationHead(64, 3)
    trunk.train(training)
    head.train(training)
    trunk.gradient_checkpointing = training
    values = torch.rand(4, 6)
    ids = torch.randint(1, 31, (4, 6))
    valid = torch.rand(4, 6) > 0.3
    valid[:, 0] = True
    unmask = (torch.rand(4, 6) > 0.2).float()
    _forbid_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="sync"):  # the guard is live
        bool(valid.any())
    out = trunk(values, ids, valid, unmask)
    logits = head(out.cls)
    trunk.value_dec(out.hidden)
    trunk.cellwise_dec(out.cls, trunk.gene_emb[ids])
    if training:
        logits.sum().backward()


def test_padded_table_rows_and_zero_padding_row():
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=36601)
    assert trunk.gene_emb.shape == (36608, 64)
    assert torch.all(trunk.gene_emb[0] == 0)
    assert torch.all(trunk.gene_emb[36602:] == 0)


def test_presets():
    assert CellFMConfig.from_preset("800M").n_layers == 40
    with pytest.raises(ValueError, match="unknown preset"):
        CellFMConfig.from_preset("8M")
    with pytest.raises(ValueError, match="divisible"):
        CellFMConfig(enc_dims=10, num_heads=4)


def test_value_encoder_shortcut_equals_general_formula():
    from cellfm_sc.nn.layers import SoftBinEncoder

    torch.manual_seed(0)
    enc = SoftBinEncoder(16, bins=32).double()
    with torch.no_grad():
        enc.a.fill_(0.7)
    x = torch.rand(3, 9, dtype=torch.float64) * 8
    fast = enc(x)  # non-negative input: shortcut
    h = torch.nn.functional.leaky_relu(enc.w1(x.unsqueeze(-1)), 0.2)
    h = torch.softmax(enc.w3(h) + enc.a * h, dim=-1)
    torch.testing.assert_close(fast, enc.table(h), atol=1e-12, rtol=0)
    # a negative value takes the general path and still matches the formula
    x[0, 0] = -1.0
    h = torch.nn.functional.leaky_relu(enc.w1(x.unsqueeze(-1)), 0.2)
    h = torch.softmax(enc.w3(h) + enc.a * h, dim=-1)
    torch.testing.assert_close(enc(x), enc.table(h), atol=1e-12, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", dropout=0.0), n_genes=50).double()
    values = torch.rand(3, 7, dtype=torch.float64)
    ids = torch.randint(1, 51, (3, 7))
    valid = torch.ones(3, 7, dtype=torch.bool)
    grads = []
    for flag in (False, True):
        trunk.zero_grad()
        trunk.gradient_checkpointing = flag
        trunk(values, ids, valid).cls.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=0)


def test_unmask_replaces_hidden_values_by_mask_embedding():
    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", dropout=0.0), n_genes=40).eval()
    with torch.no_grad():
        trunk.value_enc.mask_emb.normal_()
    values = torch.rand(2, 6)
    ids = torch.randint(1, 41, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        plain = trunk.embed(values, ids, valid)
        same = trunk.embed(values, ids, valid, torch.ones(2, 6))
        unmask = torch.ones(2, 6)
        unmask[0, 2] = 0
        masked = trunk.embed(values, ids, valid, unmask)
    torch.testing.assert_close(same, plain)
    # position 2 of cell 0 (sequence index 3 after cls): gene embedding + mask_emb
    want = trunk.gene_emb[ids[0, 2]] + trunk.value_enc.mask_emb[0, 0]
    torch.testing.assert_close(masked[0, 3], want)
    torch.testing.assert_close(masked[1], plain[1])


# ---------------------------------------------------------------- fast paths = the spec
def _spec_retention(layer, x, key_mask, len_scale):
    """DESIGN.md section 4's retention layer written out naively, head by head (float64)."""
    attn = layer.attn
    b, _, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    out = torch.empty_like(x)
    for i in range(b):
        xi = x[i]
        q = torch.relu(xi @ attn.q_proj.weight.T) / hd**0.5
        k = torch.relu(xi @ attn.k_proj.weight.T) * key_mask[i, :, None] / hd**0.5
        v = (xi @ attn.v_proj.weight.T) * len_scale[i]
        u = torch.nn.functional.silu(xi @ attn.u_proj.weight.T)
        heads = []
        for j in range(h):
            sl = slice(j * hd, (j + 1) * hd)
            o = q[:, sl] @ (k[:, sl].T @ v[:, sl])
            rms = torch.sqrt((o**2).sum(-1, keepdim=True) / hd).clamp_min(1e-12)
            heads.append(o / rms * u[:, sl])
        r = torch.cat(heads, dim=1) @ attn.o_proj.weight.T
        a = layer.alpha
        y = torch.nn.functional.layer_norm(
            a * xi + r, (d,), layer.post_norm1.weight, layer.post_norm1.bias, layer.post_norm1.eps
        )
        g = ((y @ layer.ffn.u_proj.weight.T) * (y @ layer.ffn.v_proj.weight.T)) @ (
            layer.ffn.o_proj.weight.T
        )
        out[i] = torch.nn.functional.layer_norm(
            a * y + g, (d,), layer.post_norm2.weight, layer.post_norm2.bias, layer.post_norm2.eps
        )
    return out


def test_retention_layer_matches_the_spec_in_float64():
    from cellfm_sc.nn.layers import RetentionLayer

    torch.manual_seed(0)
    layer = RetentionLayer(24, 3, n_layers=2).double().eval()
    with torch.no_grad():
        for ln in (layer.post_norm1, layer.post_norm2):
            ln.weight.normal_()
            ln.bias.normal_()
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    key_mask = torch.rand(3, 9) > 0.3
    key_mask[:, 0] = True
    len_scale = key_mask[:, 1:].sum(1).double().rsqrt()
    want = _spec_retention(layer, x, key_mask.double(), len_scale)
    with torch.no_grad():
        got = layer(x, key_mask, len_scale)
        cls_only = layer(x, key_mask, len_scale, rows=1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert cls_only.shape == (3, 1, 24)
    torch.testing.assert_close(cls_only, want[:, :1], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cls_only_forward_equals_full_forward_values_and_gradients(checkpointing):
    torch.manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset("tiny", dropout=0.0), n_genes=60).double()
    trunk.gradient_checkpointing = checkpointing
    values = torch.rand(4, 11, dtype=torch.float64) * 5
    ids = torch.randint(1, 61, (4, 11))
    valid = torch.rand(4, 11) > 0.25
    valid[:, 0] = True
    weight = torch.randn(64, dtype=torch.float64)
    grads = []
    for full in (True, False):
        trunk.zero_grad()
        out = trunk(values, ids, valid, return_hidden=full)
        assert (out.hidden is not None) == full
        (out.cls @ weight).pow(2).sum().backward()
        got = {n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None}
        grads.append((out.cls.detach(), got))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-12, rtol=1e-10)
    assert grads[1][1].keys() == grads[0][1].keys()
    assert {"gene_emb", "encoder.1.attn.q_proj.weight", "encoder.1.ffn.o_proj.weight"} <= set(
        grads[0][1]
    )
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-12, rtol=1e-10, msg=name)


def test_value_encoder_encodes_each_distinct_value_once_with_the_same_result():
    from cellfm_sc.nn.layers import SoftBinEncoder

    torch.manual_seed(0)
    enc = SoftBinEncoder(16, bins=32).double()
    with torch.no_grad():
        enc.a.fill_(0.3)
    x = torch.randint(0, 12, (6, 40)).double().log1p()  # many repeats, as real counts
    x[0, :3] = torch.tensor([-0.5, 0.0, 7.25], dtype=torch.float64)
    assert x.numel() > enc.table.in_features  # the distinct-value path is taken
    per_token = enc._encode(x)
    per_token.pow(2).sum().backward()
    want = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    fast = enc(x)
    fast.pow(2).sum().backward()
    torch.testing.assert_close(fast, per_token, atol=1e-12, rtol=1e-10)
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-12, rtol=1e-10, msg=n)
    # a gradient with respect to the values themselves keeps the per-token path
    xg = x.clone().requires_grad_(True)
    enc(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_cls_only_retention_honours_a_wrapped_value_projection():
    """The cls-only path skips the V projection only for a plain ``nn.Linear``; a wrapped
    one (a LoRA adapter, say) is called as a module, with the same result when it changes
    nothing."""
    from cellfm_sc.nn.layers import MultiHeadRetention

    class Wrapped(torch.nn.Module):
        def __init__(self, base, shift):
            super().__init__()
            self.base, self.shift = base, shift

        def forward(self, x):
            return self.base(x) + self.shift

    torch.manual_seed(0)
    attn = MultiHeadRetention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    mask[:, 0] = True
    scale = mask.sum(1).double().rsqrt()
    plain = attn(x, mask, scale, rows=1)
    base = attn.v_proj
    attn.v_proj = Wrapped(base, 0.0)
    torch.testing.assert_close(attn(x, mask, scale, rows=1), plain, atol=1e-12, rtol=1e-10)
    attn.v_proj = Wrapped(base, 1.0)
    assert not torch.allclose(attn(x, mask, scale, rows=1), plain)
