"""Loaded weights are sane: NaN/inf and implausible magnitudes are refused, naming the tensor.

MindSpore checkpoints (every entry point) and our own torch files (:func:`load_torch_file`).
"""

from __future__ import annotations

import os
import re
import tracemalloc

import numpy as np
import pytest
import torch

from cellfm_sc import load_pretrained_trunk
from cellfm_sc.io import (
    CheckpointError,
    check_state_values,
    load_torch_file,
    load_trunk_state,
    read_mindspore_checkpoint,
    trunk_from_mindspore,
    write_mindspore_checkpoint,
)
from cellfm_sc.nn import CellFMConfig, CellFMTrunk

BASE = "d48_h4_l2_g37_cellfm_nopadzero"


@pytest.fixture
def params(golden_dir):
    return dict(np.load(golden_dir / f"params_{BASE}.npz"))


def _write(tmp_path, state, name="bad.ckpt"):
    path = tmp_path / name
    write_mindspore_checkpoint(path, state)
    return path


# ------------------------------------------------------------------ MindSpore checkpoints
def test_value_near_8e37_is_refused_by_from_mindspore(params, tmp_path):
    params["gene_emb"][3, 7] = 8.1e37
    path = _write(tmp_path, params)
    with pytest.raises(CheckpointError) as info:
        CellFMTrunk.from_mindspore(path, num_heads=4)
    msg = str(info.value)
    assert msg.startswith(
        f"{path}: gene_emb holds 8.1e+37 (|value| > max_abs=1e+06) at index (3, 7)"
    )
    assert "corrupt or not a weight file" in msg and "max_abs=" in msg
    # the bound is an argument: a larger bound (or None) lets the finite value through
    for bound in (1e38, None):
        trunk = CellFMTrunk.from_mindspore(path, num_heads=4, max_abs=bound)
        assert trunk.gene_emb[3, 7].item() == pytest.approx(8.1e37)


def test_negative_value_and_index_are_reported(params, tmp_path):
    params["encoder.1.ffn.v_proj.weight"][5, 2] = -2e7
    path = _write(tmp_path, params)
    with pytest.raises(
        CheckpointError, match=r"encoder\.1\.ffn\.v_proj\.weight holds -2e\+07 .* index \(5, 2\)"
    ):
        trunk_from_mindspore(path, num_heads=4)
    with pytest.raises(CheckpointError, match="max_abs=10"):
        trunk_from_mindspore(_write(tmp_path, dict(params), "b.ckpt"), num_heads=4, max_abs=10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused_even_without_a_bound(params, tmp_path, bad):
    # named by its checkpoint name (gamma), not the torch name (weight)
    params["encoder.0.post_norm1.gamma"][[4, 9]] = bad
    path = _write(tmp_path, params)
    with pytest.raises(
        CheckpointError,
        match=rf"encoder\.0\.post_norm1\.gamma holds 2 non-finite value\(s\) \(first: "
        rf"{re.escape(str(np.float32(bad)))} at index \(4,\)\)",
    ):
        trunk_from_mindspore(path, num_heads=4, max_abs=None)


def test_optimizer_and_bookkeeping_entries_are_not_checked(golden_dir, tmp_path):
    state = read_mindspore_checkpoint(
        golden_dir / "model_d64_h8_l4_g101_cellfm_nopadzero_with_optimizer.ckpt"
    )
    moments = [k for k in state if k.startswith("moment1.")]
    assert moments
    state[moments[0]][...] = np.nan
    state["scale_sense"] = np.array(3e9, dtype=np.float32)
    _, report = trunk_from_mindspore(_write(tmp_path, state), num_heads=8)
    assert moments[0] in report.skipped
    # the same value in a model tensor is refused
    state["cls_token"][0, 0, 1] = np.nan
    with pytest.raises(CheckpointError, match="cls_token holds 1 non-finite"):
        trunk_from_mindspore(_write(tmp_path, state, "c.ckpt"), num_heads=8)


def test_load_trunk_state_checks_and_names_the_checkpoint_key(params):
    state = {f"network.{k}": v for k, v in params.items()}
    state["network.value_enc.value_enc.a"][...] = np.inf
    trunk = CellFMTrunk(CellFMConfig(enc_dims=48, num_heads=4), n_genes=37, emb_rows=40)
    before = trunk.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(CheckpointError) as info:
        load_trunk_state(trunk, state)
    # an in-memory state has no file to name; the trunk is left untouched
    assert str(info.value).startswith("network.value_enc.value_enc.a holds 1 non-finite")
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_pretrained_trunk_checks_the_replaced_gene_table_too(params, tmp_path, golden_dir):
    params["gene_emb"][1, 0] = 5e8
    path = _write(tmp_path, params)
    names = ["A", "B", "C"]
    with pytest.raises(CheckpointError, match=r"gene_emb holds 5e\+08"):
        load_pretrained_trunk(path, names, num_heads=4)
    trunk, _ = load_pretrained_trunk(path, names, num_heads=4, max_abs=1e9)
    assert trunk.gene_emb.shape == (8, 48)


def test_bad_bound_is_rejected(params):
    with pytest.raises(ValueError, match="max_abs must be positive"):
        check_state_values(params, max_abs=0)


def test_check_makes_no_copy_of_a_large_table():
    big = {"gene_emb": np.ones((4096, 2048), dtype=np.float32)}  # 32 MiB
    tracemalloc.start()
    try:
        check_state_values(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


# ------------------------------------------------------------------ our torch files
def _lightning_like() -> dict:
    """The structure of a Lightning checkpoint: weights, optimizer state, bookkeeping."""
    g = torch.Generator().manual_seed(0)
    weights = {
        "module.trunk.gene_emb": torch.randn(16, 8, generator=g),
        "module.head.net.1.num_batches_tracked": torch.tensor(12),
    }
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": weights,
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(2e7), "exp_avg": torch.zeros(16, 8)}},
                "param_groups": [{"lr": 1e-4, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": 3}],
        "callbacks": {"EarlyStopping{...}": {"best_score": torch.tensor(float("inf"))}},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
    }


def test_a_valid_nested_checkpoint_loads(tmp_path):
    path = tmp_path / "checkpoint_epoch_3.pth"
    state = _lightning_like()
    torch.save(state, path)
    got = load_torch_file(path, what="resume checkpoint")
    assert got["epoch"] == 3
    assert torch.equal(
        got["state_dict"]["module.trunk.gene_emb"], state["state_dict"]["module.trunk.gene_emb"]
    )


def test_empty_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(path))}: cannot read this saved "
        r"model: the file is empty\.$",
    ):
        load_torch_file(path, what="saved model")


@pytest.mark.parametrize("zipped", [True, False])
def test_truncated_file(tmp_path, zipped):
    path = tmp_path / "best_model.pth"
    torch.save(_lightning_like()["state_dict"], path, _use_new_zipfile_serialization=zipped)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"best_model\.pth: cannot read this best model: "
        r"the file is truncated or corrupted",
    ) as info:
        load_torch_file(path, what="best model")
    assert "\n" not in str(info.value)


def test_text_file(tmp_path):
    path = tmp_path / "checkpoint_epoch_1.pth"
    path.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(CheckpointError, match=r"text file \(it starts with 'epoch,loss'\)"):
        load_torch_file(path, what="resume checkpoint")


def test_mindspore_checkpoint_passed_by_mistake(golden_dir):
    path = golden_dir / f"model_{BASE}.ckpt"
    with pytest.raises(CheckpointError, match=r"MindSpore \.ckpt"):
        load_torch_file(path, what="saved model")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path, what="saved model")
    msg = str(info.value)
    assert "needs arbitrary code" in msg and "getcwd" in msg and "weights_only" in msg
    assert "\n" not in msg


def test_non_finite_tensor_deep_in_optimizer_state(tmp_path):
    state = _lightning_like()
    state["optimizer_states"][0]["state"][0]["exp_avg"][2, 3] = float("nan")
    path = tmp_path / "checkpoint_epoch_3.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"optimizer_states/0/state/0/exp_avg holds 1 non-finite value\(s\) \(first: nan "
        r"at index \(2, 3\)\)",
    ):
        load_torch_file(path, what="resume checkpoint", max_abs=None)


def test_large_weight_is_refused_with_its_key_path(tmp_path):
    state = _lightning_like()
    state["state_dict"]["module.trunk.gene_emb"][4, 1] = 3e9
    path = tmp_path / "checkpoint_epoch_3.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"state_dict/module\.trunk\.gene_emb holds 3e\+09 .* \(4, 1\)"
    ):
        load_torch_file(path, what="resume checkpoint")
    assert load_torch_file(path, what="resume checkpoint", max_abs=None)["epoch"] == 3


def test_bfloat16_weights_are_checked(tmp_path):
    w = torch.zeros(3, 2, dtype=torch.bfloat16)
    w[1, 1] = float("inf")
    path = tmp_path / "best_model.pth"
    torch.save({"trunk.cls_token": w}, path)
    with pytest.raises(CheckpointError, match=r"trunk\.cls_token holds 1 non-finite .*inf"):
        load_torch_file(path, what="best model")


def test_top_level_must_be_a_dict_and_missing_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_torch_file(path, what="saved model")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "nope.pt", what="saved model")
