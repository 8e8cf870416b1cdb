"""Inference at scale: bucketed batches give the unbucketed predictions, streamed embeddings
equal in-memory ones, loader workers change nothing."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import torch

from cellfm_sc import CellFMClassifier
from cellfm_sc._stores import output_store
from cellfm_sc.data import batches

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)


@pytest.fixture(scope="module")
def trained(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(3)
    adata = full[np.sort(rng.choice(full.n_obs, 150, replace=False))].copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=96)
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    return model, adata


def test_bucketed_predictions_equal_unbucketed(trained):
    model, adata = trained
    probs = model.predict(soft=True, batch_size=7).to_numpy()
    # reference: one cell per batch, in obs order (no bucketing, no padding at all)
    ref = np.zeros_like(probs)
    module = model.module.eval()
    with torch.inference_mode():
        for batch in batches(adata, batch_size=1, max_tokens=96, seed=model.seed, bucket=False):
            logits = module(batch).logits
            ref[batch.obs_index.numpy()] = torch.softmax(logits.float(), -1).numpy()
    np.testing.assert_allclose(probs, ref, atol=2e-5)
    np.testing.assert_array_equal(probs.argmax(1), ref.argmax(1))


def test_streamed_embeddings_equal_in_memory(trained, tmp_path):
    model, adata = trained
    emb = model.get_latent_representation(batch_size=16)
    assert emb.shape == (adata.n_obs, 64) and emb.dtype == np.float32
    # an h5py dataset, float32 and float16
    with h5py.File(tmp_path / "e.h5", "w") as f:
        ds = f.create_dataset("e", shape=emb.shape, dtype="f4", fillvalue=np.nan)
        assert model.get_latent_representation(batch_size=16, out=ds) is ds
        np.testing.assert_array_equal(ds[:], emb)
        half = f.create_dataset("h", shape=emb.shape, dtype="f2")
        model.get_latent_representation(batch_size=16, out=half)
        np.testing.assert_allclose(half[:].astype("f4"), emb, rtol=1e-3, atol=1e-3)
    # a numpy memmap and the anndata stores (.h5ad, .zarr) the CLI writes
    mm = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype="f4", shape=emb.shape)
    model.get_latent_representation(batch_size=16, out=mm)
    np.testing.assert_array_equal(np.asarray(mm), emb)
    for name in ("out.h5ad", "out.zarr"):
        with output_store(tmp_path / name, adata.obs) as store:
            model.get_latent_representation(out=store.dense("X_cellfm", 64), batch_size=16)
        back = (
            ad.read_zarr(tmp_path / name)
            if name.endswith("zarr")
            else ad.read_h5ad(tmp_path / name)
        )
        np.testing.assert_array_equal(back.obsm["X_cellfm"], emb)
        assert list(back.obs_names) == list(adata.obs_names) and back.X is None
    with pytest.raises(ValueError, match=r"shape \(3, 64\), expected \(150, 64\)"):
        model.get_latent_representation(out=np.zeros((3, 64), np.float32))


def test_a_failed_stream_leaves_no_output(trained, tmp_path):
    _, adata = trained
    target = tmp_path / "out.h5ad"
    with pytest.raises(RuntimeError), output_store(target, adata.obs) as store:
        store.dense("X_cellfm", 64)
        raise RuntimeError("interrupted")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_loader_workers_change_nothing(trained):
    model, _ = trained
    emb = model.get_latent_representation(batch_size=16)
    np.testing.assert_array_equal(
        model.get_latent_representation(batch_size=16, num_workers=2), emb
    )


def test_empty_cells_stream_as_nan(trained, tmp_path):
    model, adata = trained
    query = adata.copy()
    x = query.X.tolil()
    x[5, :] = 0
    query.X = x.tocsr()
    query.X.eliminate_zeros()
    with h5py.File(tmp_path / "e.h5", "w") as f:
        ds = f.create_dataset("e", shape=(query.n_obs, 64), dtype="f4", fillvalue=0.0)
        with pytest.warns(UserWarning, match="1 cell"):
            model.get_latent_representation(query, out=ds)
        assert np.isnan(ds[5]).all() and np.isfinite(ds[:5]).all()


def test_block_writer_writes_whole_blocks_once():
    """Rows arriving scattered (bucketed batches) reach a chunked file as consecutive blocks."""
    from cellfm_sc.model.base._inference import _BlockWriter

    class Chunked:  # an h5py-like dataset that records how it is written
        def __init__(self, n, width, chunk):
            self.data = np.full((n, width), -1.0, np.float32)
            self.shape, self.dtype, self.chunks, self.writes = (
                self.data.shape,
                np.float32,
                (
                    chunk,
                    width,
                ),
                [],
            )

        def __setitem__(self, key, value):
            assert isinstance(key, slice), "a sink must get slices, not fancy indices"
            self.writes.append((key.start, key.stop))
            self.data[key] = value

    n, width = 10_000, 3
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(n, width)).astype(np.float32)
    target = Chunked(n, width, chunk=1000)
    writer = _BlockWriter(target, n, (width,))
    empty = {5, 4321, 9999}
    for lo in range(0, n, 2048):  # windows of consecutive rows, shuffled inside
        window = rng.permutation(np.arange(lo, min(lo + 2048, n)))
        for part in np.array_split(window, 16):
            keep = np.array([r not in empty for r in part], bool)
            writer.write(part[~keep], None)
            writer.write(part[keep], expected[part[keep]])
    writer.close()
    want = expected.copy()
    want[sorted(empty)] = np.nan
    np.testing.assert_array_equal(target.data, want)
    starts = sorted(s for s, _ in target.writes)
    assert starts == list(range(0, n, writer.block))  # each block written once, whole
    assert writer.block % 1000 == 0 and not writer.open
