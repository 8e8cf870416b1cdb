"""Tests for the MindSpore checkpoint reader/writer (:mod:`cellfm_sc.io.checkpoint`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellfm_sc.io import CheckpointError, read_mindspore_checkpoint, write_mindspore_checkpoint

_GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "public"
_CKPTS = sorted(p.name for p in _GOLDEN.glob("*.ckpt")) if _GOLDEN.exists() else []
_OPTIMIZER_CKPT = "model_d64_h8_l4_g101_cellfm_nopadzero_with_optimizer.ckpt"
_B_CKPT = "model_b_d48_h4_l2_g37.ckpt"

# ---------------------------------------------------------------------------------------
# helpers: an independent, minimal protobuf encoder to craft files by hand
# ---------------------------------------------------------------------------------------


def _vi(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _vi(field << 3 | 2) + _vi(len(payload)) + payload


def _record(tag: str, ttype: str, content: bytes, dims=(), packed: bool = False, extra=b""):
    if packed:
        tensor = _ld(1, b"".join(_vi(d) for d in dims)) if dims else b""
    else:
        tensor = b"".join(b"\x08" + _vi(d) for d in dims)
    tensor += _ld(2, ttype.encode()) + _ld(3, content)
    tag_bytes = tag if isinstance(tag, bytes) else tag.encode()
    return _ld(1, _ld(1, tag_bytes) + extra + _ld(2, tensor))


def _checkpoints_of(golden_dir: Path) -> dict[str, str]:
    """checkpoint file name -> params npz name, from the golden_*.json files."""
    out: dict[str, str] = {}
    for js in golden_dir.glob("golden_*.json"):
        meta = json.loads(js.read_text())
        if "checkpoints" not in meta:
            continue
        for entry in meta["checkpoints"]:
            out[entry["file"]] = f"params_{meta['name']}.npz"
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Exactly equal: dtype, shape and bytes (so NaN payloads and -0.0 count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _write_bytes(directory: Path, data: bytes, name: str = "x.ckpt") -> Path:
    p = directory / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------------------
# golden files written by MindSpore
# ---------------------------------------------------------------------------------------


def test_every_golden_checkpoint_is_covered(golden_dir):
    listed = _checkpoints_of(golden_dir)
    on_disk = {p.name for p in golden_dir.glob("*.ckpt")}
    assert on_disk, "no checkpoints found"
    assert on_disk - set(listed) == {_B_CKPT}
    assert set(_CKPTS) == on_disk


@pytest.mark.parametrize("name", [n for n in _CKPTS if n != _B_CKPT] or ["<no golden dir>"])
def test_golden_checkpoint_reads_to_params(golden_dir, name):
    """Variant B has no params npz: see test_variant_b_checkpoint."""
    params = np.load(golden_dir / _checkpoints_of(golden_dir)[name])
    got = read_mindspore_checkpoint(golden_dir / name)
    expected_keys = list(params.keys())
    assert list(got)[: len(expected_keys)] == expected_keys
    if name != _OPTIMIZER_CKPT:
        assert list(got) == expected_keys
    for key in expected_keys:
        assert _same(got[key], params[key]), key
        assert got[key].flags.writeable and got[key].flags.c_contiguous


def test_variant_b_checkpoint(golden_dir):
    got = read_mindspore_checkpoint(golden_dir / _B_CKPT)
    assert got["ST_emb"].shape == (1, 2, 48) and got["ST_emb"].dtype == np.float32
    assert got["gene_emb"].shape == (40, 48)
    assert {"ST_enc.a", "ST_enc.w1.weight", "ST_enc.w3.weight", "ST_enc.table.weight"} <= set(got)
    assert np.isfinite(got["ST_emb"]).all() and np.abs(got["ST_emb"]).sum() > 0


def test_optimizer_checkpoint_extras(golden_dir):
    got = read_mindspore_checkpoint(golden_dir / _OPTIMIZER_CKPT)
    params = np.load(golden_dir / "params_d64_h8_l4_g101_cellfm_nopadzero.npz")
    for key in params:
        for prefix in ("moment1.", "moment2."):
            m = got[prefix + key]
            assert m.dtype == np.float32 and m.shape == params[key].shape
    assert np.any(got["moment1.gene_emb"] != 0)
    scalars = {
        "scale_sense": (np.float32, ()),
        "global_step": (np.int32, (1,)),
        "learning_rate": (np.float32, ()),
        "beta1_power": (np.float32, ()),
        "beta2_power": (np.float32, ()),
        "current_iterator_step": (np.int32, ()),
        "last_overflow_iterator_step": (np.int32, ()),
        "epoch_num": (np.int64, ()),
        "step_num": (np.int64, ()),
    }
    for key, (dtype, shape) in scalars.items():
        assert got[key].dtype == dtype and got[key].shape == shape, key
    extras = set(got) - set(params)
    assert extras == set(scalars) | {f"moment{i}.{k}" for i in (1, 2) for k in params}
    assert got["global_step"][0] == 10
    assert got["epoch_num"] == 3 and got["step_num"] == 10
    np.testing.assert_allclose(got["beta1_power"], 0.9**10, rtol=1e-6)
    np.testing.assert_allclose(got["beta2_power"], 0.95**10, rtol=1e-6)
    np.testing.assert_allclose(got["learning_rate"], 1e-7, rtol=1e-6)


def test_crc_trailer_is_stripped_and_verified(golden_dir):
    raw = (golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero_crc.ckpt").read_bytes()
    plain = (golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero.ckpt").read_bytes()
    # the trailer format the reader relies on: b"crc_num" + 10-byte big-endian CRC32
    assert raw[:-17] == plain and raw[-17:-10] == b"crc_num"
    assert int.from_bytes(raw[-10:], "big") == zlib.crc32(plain)


def test_arrays_own_their_memory(golden_dir, tmp_path):
    src = tmp_path / "copy.ckpt"
    shutil.copy(golden_dir / "model_d48_h4_l2_g37_cellfm_padzero_sliced16k.ckpt", src)
    got = read_mindspore_checkpoint(src)
    src.unlink()
    for key, arr in got.items():
        base = arr
        while base.base is not None:
            base = base.base
            assert isinstance(base, np.ndarray), (key, type(base))
        arr[...] = 0  # writable, and not backed by the (deleted) file
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("params_name", "ckpt_name", "kwargs"),
    [
        ("params_d48_h4_l2_g37_backbone.npz", "model_d48_h4_l2_g37_backbone.ckpt", {}),
        (
            "params_d48_h4_l2_g37_cellfm_nopadzero.npz",
            "model_d48_h4_l2_g37_cellfm_nopadzero.ckpt",
            {},
        ),
        (
            "params_d48_h4_l2_g37_cellfm_nopadzero.npz",
            "model_d48_h4_l2_g37_cellfm_nopadzero_crc.ckpt",
            {"crc": True},
        ),
        (
            "params_d48_h4_l2_g37_cellfm_nopadzero_addzero.npz",
            "model_d48_h4_l2_g37_cellfm_nopadzero_addzero.ckpt",
            {},
        ),
        ("params_d48_h4_l2_g37_cellfm_padzero.npz", "model_d48_h4_l2_g37_cellfm_padzero.ckpt", {}),
        (
            "params_d48_h4_l2_g37_cellfm_padzero.npz",
            "model_d48_h4_l2_g37_cellfm_padzero_sliced16k.ckpt",
            {"slice_bytes": 16 * 1024},
        ),
        ("params_d64_h8_l4_g101_backbone.npz", "model_d64_h8_l4_g101_backbone.ckpt", {}),
        (
            "params_d64_h8_l4_g101_cellfm_nopadzero.npz",
            "model_d64_h8_l4_g101_cellfm_nopadzero.ckpt",
            {},
        ),
        (
            "params_d64_h8_l4_g101_cellfm_padzero.npz",
            "model_d64_h8_l4_g101_cellfm_padzero.ckpt",
            {},
        ),
    ],
)
def test_writer_reproduces_mindspore_bytes(golden_dir, tmp_path, params_name, ckpt_name, kwargs):
    params = np.load(golden_dir / params_name)
    out = tmp_path / "out.ckpt"
    write_mindspore_checkpoint(out, {k: params[k] for k in params}, **kwargs)
    assert out.read_bytes() == (golden_dir / ckpt_name).read_bytes()


def test_writer_reproduces_optimizer_checkpoint(golden_dir, tmp_path):
    """Scalars (no dims), Int32/Int64 entries and mixed order are MindSpore's bytes too."""
    got = read_mindspore_checkpoint(golden_dir / _OPTIMIZER_CKPT)
    out = tmp_path / "out.ckpt"
    write_mindspore_checkpoint(out, got)
    assert out.read_bytes() == (golden_dir / _OPTIMIZER_CKPT).read_bytes()


def test_writer_accepts_torch_tensors(golden_dir, tmp_path):
    torch = pytest.importorskip("torch")
    params = np.load(golden_dir / "params_d48_h4_l2_g37_cellfm_padzero.npz")
    out = tmp_path / "out.ckpt"
    # a non-contiguous view must be written in C order
    tensors = {k: torch.from_numpy(params[k].copy()) for k in params}
    tensors["gene_emb"] = torch.from_numpy(params["gene_emb"].T.copy()).T
    write_mindspore_checkpoint(out, tensors)
    assert out.read_bytes() == (golden_dir / "model_d48_h4_l2_g37_cellfm_padzero.ckpt").read_bytes()


# ---------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------


def _raises(path: Path, *needles: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        read_mindspore_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg.lower(), msg
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("where", [100, 250_000, -20])
def test_flipped_byte_in_crc_file(golden_dir, tmp_path, where):
    raw = bytearray((golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero_crc.ckpt").read_bytes())
    raw[where] ^= 0x01
    err = _raises(_write_bytes(tmp_path, bytes(raw)), "crc mismatch", "byte offset")
    assert err.offset == len(raw) - 17


def test_flipped_crc_value(golden_dir, tmp_path):
    raw = bytearray((golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero_crc.ckpt").read_bytes())
    raw[-1] ^= 0x80
    _raises(_write_bytes(tmp_path, bytes(raw)), "crc mismatch")


@pytest.mark.parametrize("keep", [1, 5, 40, 30_000, 489_000])
def test_truncated_file(golden_dir, tmp_path, keep):
    raw = (golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero.ckpt").read_bytes()
    _raises(_write_bytes(tmp_path, raw[:keep]), "truncated", "byte offset")


def test_truncated_crc_trailer(golden_dir, tmp_path):
    raw = (golden_dir / "model_d48_h4_l2_g37_cellfm_nopadzero_crc.ckpt").read_bytes()
    _raises(_write_bytes(tmp_path, raw[:-4]), "crc trailer")


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        data = rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
        with pytest.raises(CheckpointError):
            read_mindspore_checkpoint(_write_bytes(tmp_path, data, f"r{i}.ckpt"))
    data = b"\x51" + rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    _raises(_write_bytes(tmp_path, data), "not a mindspore checkpoint", "byte offset 0")


def test_empty_file(tmp_path):
    _raises(_write_bytes(tmp_path, b""), "empty")
    _raises(_write_bytes(tmp_path, b"crc_num" + zlib.crc32(b"").to_bytes(10, "big")), "empty")


def test_foreign_formats(tmp_path):
    _raises(_write_bytes(tmp_path, b"PK\x03\x04" + b"\0" * 60), "zip")
    _raises(_write_bytes(tmp_path, (0x7F3A5ED8).to_bytes(4, "little") + b"\1" * 60), "encrypted")
    _raises(_write_bytes(tmp_path, b"\x80\x04\x95" + b"\0" * 20), "pickle")


def test_content_length_must_match_dims(tmp_path):
    data = _record("w", "Float32", b"\0" * 12, dims=(2, 2))
    err = _raises(_write_bytes(tmp_path, data), "12 bytes", "needs 16", "'w'")
    assert err.offset == 0


def test_unknown_dtype(tmp_path):
    data = _record("a", "Float32", b"\0" * 4) + _record("z", "Complex64", b"\0" * 8, dims=(1,))
    err = _raises(_write_bytes(tmp_path, data), "unknown tensor type", "complex64")
    assert err.offset == len(_record("a", "Float32", b"\0" * 4))


def test_bad_varint(tmp_path):
    _raises(_write_bytes(tmp_path, b"\x0a" + b"\xff" * 12), "bad varint", "byte offset 1")


def test_unknown_wire_type(tmp_path):
    body = b"\x0a\x01a" + b"\x1f" + b"\0" * 4  # field 3, wire type 7
    _raises(_write_bytes(tmp_path, b"\x0a" + _vi(len(body)) + body), "wire type 7")


def test_missing_tensor_and_bad_utf8(tmp_path):
    _raises(_write_bytes(tmp_path, _ld(1, _ld(1, b"x"))), "no tensor")
    _raises(_write_bytes(tmp_path, _record(b"\xff", "Float32", b"\0" * 4)), "utf-8")


def test_record_length_past_end(tmp_path):
    data = _record("w", "Float32", b"\0" * 16, dims=(4,))
    _raises(_write_bytes(tmp_path, b"\x0a\x7f" + data[2:]), "truncated")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_files_never_raise_other_errors(data):
    """Any single-byte change or truncation gives either a result or a CheckpointError."""
    base = b"".join(
        [
            _record("gene_emb", "Float32", np.arange(12, dtype="<f4").tobytes(), dims=(3, 4)),
            _record("step", "Int64", (7).to_bytes(8, "little")),
            _record("mask", "Bool", b"\1\0", dims=(2,)),
        ]
    )
    buf = bytearray(base)
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] = data.draw(st.integers(0, 255))
    buf = buf[: data.draw(st.integers(0, len(buf)))]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.ckpt"
        p.write_bytes(bytes(buf))
        try:
            out = read_mindspore_checkpoint(p)
        except CheckpointError:
            return
    assert all(isinstance(v, np.ndarray) for v in out.values())


# ---------------------------------------------------------------------------------------
# hand-made encodings MindSpore (or other writers) may produce
# ---------------------------------------------------------------------------------------


def test_packed_dims_old_spellings_unknown_fields_and_legacy_scalar(tmp_path):
    data = b"".join(
        [
            _record("p", "Uint8", bytes(range(6)), dims=(2, 3), packed=True),
            _record("u", "Int16", b"\1\0\2\0", dims=(2,), extra=_ld(7, b"ignored")),
            _record("legacy_scalar", "Float64", np.float64(2.5).tobytes(), dims=(0,)),
            _record("empty", "Float64", b"", dims=(0,)),
            _record("s", "str", "héllo".encode()),
            _record("flags", "Bool", b"\x00\x01\x07", dims=(3,)),
        ]
    )
    got = read_mindspore_checkpoint(_write_bytes(tmp_path, data))
    assert _same(got["p"], np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert _same(got["u"], np.array([1, 2], dtype=np.int16))
    assert _same(got["legacy_scalar"], np.array(2.5))
    assert _same(got["empty"], np.zeros(0))
    assert got["s"].shape == () and str(got["s"]) == "héllo"
    assert _same(got["flags"], np.array([False, True, True]))
    assert got["flags"].view(np.uint8).tolist() == [0, 1, 1]


def test_slices_with_inconsistent_dims(tmp_path):
    data = _record("w", "Float32", b"\0" * 8, dims=(4,)) + _record("w", "Float32", b"\0" * 8, (5,))
    _raises(_write_bytes(tmp_path, data), "slice of 'w'")


def test_duplicate_tag(tmp_path):
    rec = _record("w", "Float32", b"\0" * 4)
    _raises(_write_bytes(tmp_path, rec + _record("v", "Float32", b"\0" * 4) + rec), "twice")


# ---------------------------------------------------------------------------------------
# writer round trips
# ---------------------------------------------------------------------------------------

_DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]


@st.composite
def _tensor_dicts(draw):
    n = draw(st.integers(1, 6))
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=n, max_size=n, unique=True))
    out = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        # any bit pattern: NaN payloads, -0.0, infinities all included
        bits = draw(hnp.arrays(np.uint8, (int(np.prod(shape)) * dtype.itemsize,)))
        arr = bits.view(dtype).reshape(shape) if dtype != np.bool_ else bits.astype(bool)
        arr = arr.reshape(shape)
        if draw(st.booleans()) and arr.ndim >= 2:
            arr = np.asfortranarray(arr)
        if draw(st.booleans()) and dtype.itemsize > 1:
            arr = arr.astype(dtype.newbyteorder(">"))
        out[name] = arr
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tensor_dicts(), st.booleans(), st.sampled_from([1, 3, 16, 1 << 20]))
def test_round_trip_every_dtype(tensors, crc, slice_bytes):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.ckpt"
        write_mindspore_checkpoint(p, tensors, crc=crc, slice_bytes=slice_bytes)
        raw = p.read_bytes()
        got = read_mindspore_checkpoint(p)
    assert (raw[-17:-10] == b"crc_num") == crc
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        expected = arr.astype(arr.dtype.newbyteorder("<"), order="C")
        assert expected.shape == arr.shape
        assert _same(got[name], expected), name


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.uint16, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
    st.booleans(),
)
def test_bfloat16_torch_round_trip(bits, crc):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bf.ckpt"
        write_mindspore_checkpoint(p, {"w": t}, crc=crc)
        assert b"BFloat16" in p.read_bytes()
        got = read_mindspore_checkpoint(p)["w"]
    assert got.dtype == np.float32 and got.shape == bits.shape
    assert _same(got.view(np.uint32), bits.astype(np.uint32) << 16)
    finite = np.isfinite(got)
    assert np.array_equal(got[finite], t.float().numpy()[finite])


def test_python_scalars_and_strings(tmp_path):
    p = tmp_path / "s.ckpt"
    write_mindspore_checkpoint(
        p, {"flag": True, "epoch_num": 3, "lr": 0.1, "name": "CellFM ✓", "np": np.str_("x")}
    )
    got = read_mindspore_checkpoint(p)
    assert _same(got["flag"], np.array(True))
    assert _same(got["epoch_num"], np.array(3, dtype=np.int64))
    assert _same(got["lr"], np.array(0.1))
    assert str(got["name"]) == "CellFM ✓" and got["name"].dtype.kind == "U"
    assert str(got["np"]) == "x"


def test_writer_rejects_unsupported_and_is_atomic(tmp_path):
    p = tmp_path / "keep.ckpt"
    write_mindspore_checkpoint(p, {"a": np.ones(3, np.float32)})
    before = p.read_bytes()
    with pytest.raises(TypeError, match="complex"):
        write_mindspore_checkpoint(p, {"a": np.ones(3), "c": np.ones(2, np.complex64)})
    with pytest.raises(TypeError, match="names must be str"):
        write_mindspore_checkpoint(p, {1: np.ones(2)})
    with pytest.raises(TypeError, match="scalar strings"):
        write_mindspore_checkpoint(p, {"s": np.array(["a", "b"])})
    with pytest.raises(ValueError, match="slice_bytes"):
        write_mindspore_checkpoint(p, {"a": np.ones(2)}, slice_bytes=0)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["keep.ckpt"]


def test_reader_memory_stays_near_one_copy(tmp_path):
    """Peak RSS while reading a 48 MB file stays <= 1.3 x its size above the baseline."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    p = tmp_path / "big.ckpt"
    rng = np.random.default_rng(1)
    write_mindspore_checkpoint(
        p,
        {
            "gene_emb": rng.standard_normal((4000, 2048), dtype=np.float32),
            "w": rng.standard_normal((1024, 1024), dtype=np.float32),
            "b": rng.standard_normal(1024, dtype=np.float32),
        },
        crc=True,
    )
    size = p.stat().st_size
    code = textwrap.dedent(
        f"""
        import sys
        from cellfm_sc.io import read_mindspore_checkpoint
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        base = status("VmRSS:")
        try:
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        out = read_mindspore_checkpoint({str(p)!r})
        print(max(0, status("VmHWM:") - base), sum(a.nbytes for a in out.values()))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    peak, nbytes = map(int, res.stdout.split())
    assert nbytes > 0.99 * size
    assert peak <= 1.3 * size, (peak / size, res.stdout)
