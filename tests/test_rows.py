"""Stores read row by row: the lazy readers, the shard-at-a-time id index, and training memory
that does not grow with the store."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CacheError
from pipeline.stores.base import Layout
from pipeline.stores.rows import RowReader
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from pipeline.synthetic import synthetic_manifest, synthetic_rows, write_synthetic_store
from pipeline.training.targets import RowIndex, open_targets

REPO = Path(__file__).resolve().parent.parent
LAYOUT = Layout(rows_per_shard=64, rows_per_chunk=16)


@pytest.fixture
def store(tmp_path):
    """An eagerly known 300-row cache with 8-row chunks (several shards and chunks)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 24)).astype(np.float16)
    ids = np.array([f"a/b-{i // 100}.tar/k/{i:04d}" for i in range(300)])  # '/' in names and keys
    path = write_cache_from_arrays(
        tmp_path / "s.zarr", image_ids=ids, text_ids=np.char.add(ids, "#0"),
        text_to_image=np.arange(300), teacher={"teacher": "toy", "embed_dim": 24, "logit_scale": 10.0,
                                                "modalities": ["image", "text"]},
        dataset_fingerprint="sha256:" + "0" * 64, split="train", logit_scale=10.0,
        image_emb=emb, text_emb=-emb, layout=Layout(rows_per_shard=64, rows_per_chunk=8))
    return path, emb, ids


def test_row_reader_matches_the_whole_array(store):
    path, emb, ids = store
    reader = RowReader(path, "image_emb")
    rows = np.random.default_rng(1).integers(0, 300, size=(7, 5))  # any order, repeats, 2-D
    assert reader.dtype == np.float16 and reader.shape == (300, 24)
    assert np.array_equal(reader[rows], emb[rows])
    assert np.array_equal(reader[rows[0], 3:9], emb[rows[0], 3:9])
    assert np.array_equal(reader[5], emb[5]) and np.array_equal(reader[-1], emb[-1])
    assert np.array_equal(reader[10:200], emb[10:200]) and np.array_equal(reader[::7], emb[::7])
    assert np.array_equal(np.asarray(reader), emb)
    with pytest.raises(IndexError, match=r"rows \[300\] outside \[0, 300\)"):
        reader[np.array([1, 300])]
    names = RowReader(path, "image_id", convert=lambda v: np.asarray(v.tolist(), dtype=object))
    assert names[np.array([299, 0])].tolist() == [ids[299], ids[0]]


def test_row_reader_keeps_a_bounded_lru_and_prefetches(store):
    path, emb, _ = store
    chunk_bytes = 8 * 24 * 2
    reader = RowReader(path, "image_emb", cache_bytes=3 * chunk_bytes)
    reader[np.arange(0, 8)]
    reader[np.arange(2, 6)]  # same chunk: no second read
    assert reader.chunk_reads == 1
    reader[np.arange(0, 80)]  # ten chunks (the first still cached) through a three-chunk LRU
    assert reader.chunk_reads == 10 and reader._nbytes <= 3 * chunk_bytes
    reader[np.arange(0, 8)]   # evicted since
    assert reader.chunk_reads == 11
    reader.prefetch(np.array([200, 201, 290])).result()
    before = reader.chunk_reads
    assert np.array_equal(reader[np.array([290, 200])], emb[[290, 200]])
    assert reader.chunk_reads == before  # both chunks came from the prefetch


def test_a_damaged_chunk_is_caught_when_read_lazily(store):
    path, emb, _ = store
    target = path / "image_emb/c/1/0"  # rows [64, 128): the second shard
    data = bytearray(target.read_bytes())
    data[40:72] = bytes(32)
    target.write_bytes(bytes(data))
    cache = TeacherCache.open(path, lazy=True, verify=False)  # opens: no chunk read yet
    assert np.array_equal(cache.image_emb[np.arange(10)], emb[:10])
    with pytest.raises(CacheError, match=r"s.zarr: array image_emb rows \[64, 72\) cannot be read"):
        cache.image_emb[np.array([3, 70])]
    with pytest.raises(CacheError, match="image_emb"):  # the default verifies every chunk at open
        TeacherCache.open(path, lazy=True)


def test_lazy_rows_with_fill_values_are_refused(tmp_path):
    """A valid row holding the NaN fill value (a chunk never written) fails the chunk check."""
    emb = np.ones((40, 4), np.float16)
    emb[17] = np.nan
    path = write_cache_from_arrays(
        tmp_path / "nan.zarr", image_ids=np.array([f"s/{i}" for i in range(40)]), text_ids=np.array(["s/0#0"]),
        text_to_image=np.array([0]), teacher={"teacher": "t", "embed_dim": 4, "logit_scale": 1.0,
                                               "modalities": ["image"]},
        dataset_fingerprint="sha256:" + "0" * 64, split="train", logit_scale=1.0, image_emb=emb,
        layout=Layout(rows_per_shard=16, rows_per_chunk=8))
    with pytest.raises(CacheError, match=r"image_emb: 1 valid rows read back as fill values \(first rows \[17\]\)"):
        TeacherCache.open(path, lazy=True)
    cache = TeacherCache.open(path, lazy=True, verify=False)
    cache.image_emb[np.arange(16)]
    with pytest.raises(CacheError, match=r"first rows \[17\]"):
        cache.image_emb[np.array([20])]


def test_row_index_matches_ids_one_shard_at_a_time(store):
    path, _, ids = store
    from pipeline.data.manifest import Manifest, ShardInfo

    manifest = Manifest(Path("x"), tuple(ShardInfo(f"a/b-{i}.tar", 1, "0" * 64, 100, 100) for i in range(3)))
    cache = TeacherCache.open(path, lazy=True)
    index = RowIndex(manifest, cache.image_ids, cache.text_ids, max_shards=1)
    for row in (0, 150, 299, 42):
        assert index.row("image", ids[row]) == row
        assert index.row("text", ids[row] + "#0") == row
        assert index.image_id(row) == ids[row]
    assert index.row("image", "a/b-1.tar/k/9999") is None  # a key the shard does not hold
    assert index.row("image", "elsewhere/k") is None        # a shard the manifest does not list
    assert len(index._maps) <= 2                            # one shard per kind kept
    import pickle
    clone = pickle.loads(pickle.dumps(index))                # what a DataLoader worker gets
    assert clone.row("image", ids[123]) == 123 and not index._maps.get(("image", "a/b-0.tar"))


def test_training_targets_equal_the_eager_cache(store):
    """open_targets reads rows lazily; what a batch gathers equals the eagerly loaded cache."""
    path, emb, ids = store
    import zarr

    from pipeline.data.manifest import Manifest, ShardInfo

    group = zarr.open_group(str(path), mode="r+")
    manifest = Manifest(Path("x"), tuple(ShardInfo(f"a/b-{i}.tar", 1, "0" * 64, 100, 100) for i in range(3)))
    group.attrs["dataset_fingerprint"] = manifest.fingerprint
    targets = open_targets([str(path)], manifest)
    eager = TeacherCache.open(path)
    rows = np.array([5, 299, 100, 5])
    assert isinstance(targets.image_emb, RowReader)
    assert np.array_equal(targets.image_emb[rows].astype(np.float32), eager.image_emb[rows])
    assert np.array_equal(targets.text_emb[rows].astype(np.float32), eager.text_emb[rows])
    assert targets.image_rows[ids[77]] == 77 and targets.text_rows.get(ids[78] + "#0") == 78


def test_synthetic_store_reads_back_its_rows(tmp_path):
    manifest = write_synthetic_store(tmp_path / "syn.zarr", 3000, dim=32, layout=LAYOUT)
    assert manifest.n_images == 3000 and manifest.fingerprint == synthetic_manifest(3000).fingerprint
    cache = TeacherCache.open(tmp_path / "syn.zarr", expect_dataset=manifest.fingerprint, lazy=True)
    rows = np.array([0, 63, 64, 2999])
    assert np.array_equal(cache.image_emb[rows], synthetic_rows(rows, 32, "image", LAYOUT))
    norms = np.linalg.norm(cache.text_emb[rows].astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    assert cache.image_ids[np.array([2999])][0] == "synthetic-000000.tar/002999"


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_store(tmp_path):
    """A few training steps on a 2M-row store (D = 512) peak at most 1.2x the RSS of the same steps
    on a 200k-row one, each in a fresh process; the rows read equal the rows written. Loading the
    targets whole (float32) would add 7.6 GiB at 2M rows."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train_scale import run_probe

    peaks = {}
    for n in (200_000, 2_000_000):
        store = tmp_path / f"store-{n}.zarr"
        write_synthetic_store(store, n)
        run = run_probe(store, n, steps=6, batch=64, mode="targets", threads=1)
        assert run["targets_equal_written"] and np.isfinite(run["loss"]), run
        peaks[n] = run["peak_rss_mb"]
    assert peaks[2_000_000] <= 1.2 * peaks[200_000], peaks
