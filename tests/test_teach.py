"""Stage 1: teacher caches in Zarr — contents, skips, resume, refusal of bad outputs, neighbours."""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.data.manifest import load_manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import iter_samples
from pipeline.errors import CacheError, FingerprintMismatchError, PipelineError, SampleDecodeError
from pipeline.iterate import prefetch
from pipeline.stores.base import ROW_INVALID, ROW_VALID, Layout
from pipeline.stores.inspect import cache_info, verify_cache
from pipeline.stores.neighbors import open_neighbors
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.teach.run import TeachConfig, run_teach


def teach_cfg(root: Path, tmp_path: Path, **kw) -> TeachConfig:
    base = TeachConfig(dataset=str(root), splits=("train", "test"), out_root=str(tmp_path / "caches"),
                       batch_size=5, rows_per_shard=8, rows_per_chunk=4,
                       summary_dir=str(tmp_path / "reports"))
    return replace(base, **kw)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file below ``path`` (what DVC's directory hash is made from)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def reference_embeddings(teacher, split_root: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Embeddings computed one sample at a time, straight from the shards (independent path)."""
    manifest = load_manifest(split_root)
    image_emb, text_emb, to_image = [], [], []
    for row, sample in enumerate(iter_samples(manifest, handler=SkipCounter())):
        if sample.image is None:
            image_emb.append(np.zeros(teacher.embed_dim, np.float32))
        else:
            image_emb.append(teacher.encode_images(teacher.preprocess(sample.image)[None])[0].numpy())
        for caption in sample.captions:
            text_emb.append(teacher.encode_texts([caption])[0].numpy())
            to_image.append(row)
    return np.stack(image_emb), np.stack(text_emb), to_image


def test_cache_matches_direct_teacher_outputs(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=19, n_test=6)
    cfg = teach_cfg(root, tmp_path)
    summary = run_teach(cfg, "tiny", tiny_teacher, progress=False)
    assert summary["units_computed"] == 3 + 5 + 1 + 2  # train: 19 imgs, 38 texts; test: 6, 12
    cache = TeacherCache.open(tmp_path / "caches/tiny/train.zarr",
                              expect_dataset=load_manifest(root / "train").fingerprint)
    img_ref, txt_ref, to_image = reference_embeddings(tiny_teacher, root / "train")
    np.testing.assert_allclose(cache.image_emb, img_ref.astype(np.float16), atol=2e-3)
    np.testing.assert_allclose(cache.text_emb, txt_ref.astype(np.float16), atol=2e-3)
    assert cache.text_to_image.tolist() == to_image
    assert cache.image_ids[0] == "train-000000.tar/s00000"
    assert cache.text_ids[3] == "train-000000.tar/s00001#1"
    assert cache.image_valid.all() and cache.text_valid.all()
    assert cache.logit_scale == pytest.approx(tiny_teacher.logit_scale)
    assert np.allclose(np.linalg.norm(cache.image_emb, axis=1), 1, atol=2e-3)
    info = cache_info(tmp_path / "caches/tiny/train.zarr")
    assert info["arrays"]["image_emb"]["shards"] == [8, 32]  # whole-shard units of 8 rows
    assert info["arrays"]["image_emb"]["dtype"] == "float16"
    assert verify_cache(tmp_path / "caches/tiny/train.zarr").ok


def test_second_run_is_free_and_other_dataset_is_refused(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset()
    cfg = teach_cfg(root, tmp_path)
    run_teach(cfg, "tiny", tiny_teacher, progress=False)
    again = run_teach(cfg, "tiny", tiny_teacher, progress=False)
    assert again["up_to_date"] and again["forward_calls"] == 0
    other = load_manifest(make_dataset(n_train=5, root=tmp_path / "other") / "train").fingerprint
    with pytest.raises(FingerprintMismatchError) as err:
        TeacherCache.open(tmp_path / "caches/tiny/train.zarr", expect_dataset=other)
    assert other in str(err.value) and "expected" in str(err.value)


def test_undecodable_image_is_skipped_counted_and_invalid(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(corrupt={3})
    summary = run_teach(teach_cfg(root, tmp_path), "tiny", tiny_teacher, progress=False)
    assert summary["skipped_count"] == 1
    assert summary["skipped"]["train"][0]["id"] == "train-000000.tar/s00003"
    cache = TeacherCache.open(tmp_path / "caches/tiny/train.zarr")
    assert cache.image_status[3] == ROW_INVALID and (np.delete(cache.image_status, 3) == ROW_VALID).all()
    assert not cache.image_emb[3].any()
    attrs = dict(zarr.open_group(str(tmp_path / "caches/tiny/train.zarr"), mode="r").attrs)
    assert attrs["skipped"][0]["id"] == "train-000000.tar/s00003"
    with pytest.raises(SampleDecodeError, match="s00003"):
        run_teach(teach_cfg(root, tmp_path, on_bad_image="strict", out_root=str(tmp_path / "c2")),
                  "tiny", tiny_teacher, progress=False)


class Interrupting(torch.nn.Module):
    """Wraps a teacher and fails after ``budget`` forward calls (an interruption mid-stage)."""

    def __init__(self, inner, budget: int, nan: bool = False) -> None:
        super().__init__()
        self.inner, self.budget, self.nan = inner, budget, nan
        self.forward_calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def _count(self) -> None:
        self.forward_calls += 1
        if self.forward_calls > self.budget:
            raise KeyboardInterrupt("simulated interruption")

    def encode_images(self, pixels):
        self._count()
        out = self.inner.encode_images(pixels).clone()
        if self.nan:
            out[0, 0] = float("nan")
        return out

    def encode_texts(self, texts):
        self._count()
        return self.inner.encode_texts(texts)


def test_interrupted_run_resumes_only_unfinished_units(make_dataset, tiny_teacher, tmp_path, capsys):
    root = make_dataset(n_train=30, n_test=6)
    reference = teach_cfg(root, tmp_path, out_root=str(tmp_path / "ref"))
    full = run_teach(reference, "tiny", tiny_teacher, progress=False)
    cfg = teach_cfg(root, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_teach(cfg, "tiny", Interrupting(tiny_teacher, budget=4), progress=False)
    assert not (tmp_path / "caches/tiny").exists()  # nothing published half-done
    capsys.readouterr()
    resumed = run_teach(cfg, "tiny", tiny_teacher, progress=None)  # progress lines on stderr
    assert resumed["units_resumed"] >= 2
    first_line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("teach tiny:"))
    done = re.match(r"teach tiny: (\d+)/", first_line)[1]  # the rows of the finished units
    assert int(done) > 0 and first_line.endswith(f"elapsed since resuming at {done}")
    assert 0 < resumed["forward_calls"] < full["forward_calls"]
    assert tree_digest(tmp_path / "caches/tiny") == tree_digest(tmp_path / "ref/tiny")
    assert not (tmp_path / "caches/.scratch").exists()


def test_nan_output_is_refused_naming_samples(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset()
    with pytest.raises(PipelineError, match=r"NaN/Inf .*train-000000.tar/s00000"):
        run_teach(teach_cfg(root, tmp_path), "tiny", Interrupting(tiny_teacher, 10**6, nan=True),
                  progress=False)
    assert not (tmp_path / "caches/tiny").exists()


@pytest.mark.parametrize("lost", ["image_emb/c/1/0", "image_status/c/1", "text_emb/c/2/0"])
def test_deleted_shard_is_caught_on_open_and_by_verify(make_dataset, tiny_teacher, tmp_path, lost):
    root = make_dataset(n_train=20)
    run_teach(teach_cfg(root, tmp_path), "tiny", tiny_teacher, progress=False)
    store = tmp_path / "caches/tiny/train.zarr"
    assert verify_cache(store).ok
    (store / lost).unlink()  # one shard file of one array, as a sync tool or a user might lose it
    report = verify_cache(store)
    assert not report.ok and any(lost.split("/")[0] in f for f in report.faults)
    with pytest.raises(CacheError, match=f"shard file {lost} is missing"):
        TeacherCache.open(store)


def test_current_neighbours_are_kept_and_damaged_ones_rebuilt(tmp_path):
    random_cache(tmp_path / "caches/tiny/train.zarr", n_img=20, captions=1, dim=8)
    cfg = NeighborsConfig(teacher="tiny", k=3, cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), rows_per_shard=8)
    first = run_neighbors(cfg, "tiny", progress=False)
    store = tmp_path / "nn/tiny/train.zarr"
    before = tree_digest(store)
    again = run_neighbors(cfg, "tiny", progress=False)
    assert again["up_to_date"] and again["units_computed"] == 0 and tree_digest(store) == before
    (store / "t2t_topk_idx/c/2/0").unlink()
    rebuilt = run_neighbors(cfg, "tiny", progress=False)
    assert not rebuilt["up_to_date"] and rebuilt["units_computed"] == first["units_computed"]
    assert tree_digest(store) == before


def test_deleted_neighbour_shard_is_refused(tmp_path):
    random_cache(tmp_path / "caches/tiny/train.zarr", n_img=20, captions=1, dim=8)
    cfg = NeighborsConfig(teacher="tiny", k=3, cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), rows_per_shard=8)
    run_neighbors(cfg, "tiny", progress=False)
    store = tmp_path / "nn/tiny/train.zarr"
    (store / "i2i_topk_sim/c/1/0").unlink()
    assert not verify_cache(store).ok
    with pytest.raises(CacheError, match="i2i_topk_sim"):
        open_neighbors(store)


def brute_topk(q: np.ndarray, k_emb: np.ndarray, k: int, exclude: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by a full float64 similarity matrix and a stable sort (ties to the lower index)."""
    sims = q.astype(np.float64) @ k_emb.astype(np.float64).T
    if exclude:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def assert_same_topk(idx: np.ndarray, sim: np.ndarray, ref_idx: np.ndarray, ref_sim: np.ndarray) -> None:
    """Similarities equal everywhere; indices equal wherever the ranking has no (near-)tie.

    Duplicate captions give identical embeddings, and float32 BLAS may order exact ties
    differently from a float64 sort, so tied positions are checked through their similarity.
    """
    np.testing.assert_allclose(sim.astype(np.float64), ref_sim, atol=2e-3)
    gaps = np.abs(np.diff(ref_sim, axis=1)) > 1e-4
    untied = np.ones_like(ref_idx, dtype=bool)
    untied[:, 1:] &= gaps
    untied[:, :-1] &= gaps
    assert untied.mean() > 0.9  # the check below must still cover nearly all of the lists
    np.testing.assert_array_equal(idx[untied], ref_idx[untied])


def random_cache(path: Path, n_img: int, captions: int, dim: int, seed: int = 0) -> Path:
    """A complete cache of random unit vectors: ties-free, unlike a random-weight teacher's."""
    rng = np.random.default_rng(seed)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, dim)))
    ids = [f"s.tar/{i:04d}" for i in range(n_img)]
    return write_cache_from_arrays(
        path, image_ids=np.array(ids), text_ids=np.array([f"{i}#{c}" for i in ids for c in range(captions)]),
        text_to_image=np.repeat(np.arange(n_img), captions), teacher={"teacher": "random"},
        dataset_fingerprint="sha256:" + "0" * 64, split="train", logit_scale=10.0,
        image_emb=unit(n_img), text_emb=unit(n_img * captions), layout=Layout(8, 4))


def test_neighbors_match_brute_force(tmp_path):
    random_cache(tmp_path / "caches/tiny/train.zarr", n_img=21, captions=2, dim=16)
    cfg = NeighborsConfig(teacher="tiny", k=5, splits=("train",), cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), block_rows=4, rows_per_shard=8)
    summary = run_neighbors(cfg, "tiny", progress=False)
    assert summary["directions"]["train"] == ["i2t", "t2i", "i2i", "t2t"]
    nn = open_neighbors(tmp_path / "nn/tiny/train.zarr")
    cache = TeacherCache.open(tmp_path / "caches/tiny/train.zarr")
    img, txt = cache.image_emb, cache.text_emb
    for direction, q, keys, same in (("i2t", img, txt, False), ("t2i", txt, img, False),
                                     ("i2i", img, img, True), ("t2t", txt, txt, True)):
        ref_idx, ref_sim = brute_topk(q, keys, 5, same)
        assert_same_topk(nn[f"{direction}_topk_idx"], nn[f"{direction}_topk_sim"], ref_idx, ref_sim)
        if same:
            assert not (nn[f"{direction}_topk_idx"] == np.arange(len(q))[:, None]).any()


def test_neighbors_never_return_invalid_rows(tmp_path):
    path = random_cache(tmp_path / "caches/tiny/train.zarr", n_img=12, captions=1, dim=8)
    group = zarr.open_group(str(path), mode="r+")
    status = group["image_status"][:]
    status[3] = ROW_INVALID
    group["image_status"][:] = status
    cfg = NeighborsConfig(teacher="tiny", k=4, cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), rows_per_shard=8)
    run_neighbors(cfg, "tiny", progress=False)
    nn = open_neighbors(tmp_path / "nn/tiny/train.zarr")
    assert not (nn["t2i_topk_idx"] == 3).any() and not (nn["i2i_topk_idx"] == 3).any()
    assert (nn["i2i_topk_idx"][3] == -1).all() and (nn["i2t_topk_idx"][3] == -1).all()
    assert (nn["i2i_topk_idx"][[0, 1, 2, 4]] >= 0).all()


def test_preprocess_threads_give_identical_cache(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=20, corrupt={5})
    run_teach(teach_cfg(root, tmp_path, out_root=str(tmp_path / "a")), "tiny", tiny_teacher, progress=False)
    run_teach(teach_cfg(root, tmp_path, out_root=str(tmp_path / "b"), preprocess_workers=3),
              "tiny", tiny_teacher, progress=False)
    assert tree_digest(tmp_path / "a/tiny") == tree_digest(tmp_path / "b/tiny")


def test_threads_setting_applies_to_the_run_only(make_dataset, tiny_teacher, tmp_path):
    from pipeline.errors import ConfigError

    root = make_dataset(n_train=6, n_test=2)
    before = torch.get_num_threads()
    summary = run_teach(teach_cfg(root, tmp_path, threads=1), "tiny", tiny_teacher, progress=False)
    assert summary["torch_threads"] == 1 and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="teach.threads"):
        teach_cfg(root, tmp_path, threads=0)


def test_decoder_processes_give_identical_cache_and_the_same_errors(make_dataset, tiny_teacher, tmp_path):
    """Images read, decoded and preprocessed in DataLoader processes apart from the forward:
    the same bytes, the same skipped samples, and `strict` still names the sample."""
    root = make_dataset(n_train=20, corrupt={5})
    a = run_teach(teach_cfg(root, tmp_path, out_root=str(tmp_path / "a")), "tiny", tiny_teacher, progress=False)
    b = run_teach(teach_cfg(root, tmp_path, out_root=str(tmp_path / "b"), decode_workers=2),
                  "tiny", tiny_teacher, progress=False)
    assert tree_digest(tmp_path / "a/tiny") == tree_digest(tmp_path / "b/tiny")
    assert b["skipped"] == a["skipped"] and b["skipped_count"] == 1
    with pytest.raises(SampleDecodeError, match="key s00005"):
        run_teach(teach_cfg(root, tmp_path, out_root=str(tmp_path / "c"), decode_workers=2,
                            on_bad_image="strict"), "tiny", tiny_teacher, progress=False)


def test_prefetch_thread_stops_with_its_consumer():
    produced: list[int] = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer gives up (as when the teacher raises)
    assert not any(t.name == "teach-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 10


def test_prefetch_reraises_producer_errors():
    def items():
        yield 1
        raise ValueError("bad shard")

    stream = prefetch(items(), depth=2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(stream)


def test_store_of_another_bad_image_policy_is_rebuilt(make_dataset, tiny_teacher, tmp_path):
    """`on_bad_image` is part of what a kept store must match: a `skip` store may hold invalid
    rows that `strict` refuses, so switching to `strict` reruns the teacher (and fails here)."""
    root = make_dataset(corrupt={3})
    run_teach(teach_cfg(root, tmp_path), "tiny", tiny_teacher, progress=False)
    attrs = dict(zarr.open_group(str(tmp_path / "caches/tiny/train.zarr"), mode="r").attrs)
    assert attrs["on_bad_image"] == "skip"
    with pytest.raises(SampleDecodeError, match="s00003"):
        run_teach(teach_cfg(root, tmp_path, on_bad_image="strict"), "tiny", tiny_teacher, progress=False)
    assert TeacherCache.open(tmp_path / "caches/tiny/train.zarr").image_status[3] == ROW_INVALID


def test_damaged_published_store_is_rebuilt_not_kept(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=20)
    cfg = teach_cfg(root, tmp_path)
    run_teach(cfg, "tiny", tiny_teacher, progress=False)
    store = tmp_path / "caches/tiny/train.zarr"
    before = tree_digest(store)
    (store / "text_id/c/1").unlink()
    again = run_teach(cfg, "tiny", tiny_teacher, progress=False)
    assert not again["up_to_date"] and again["forward_calls"] > 0
    assert tree_digest(store) == before


def test_verify_checks_ids_temporaries_and_expected_dataset(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=10)
    run_teach(teach_cfg(root, tmp_path), "tiny", tiny_teacher, progress=False)
    store = tmp_path / "caches/tiny/train.zarr"
    ours = load_manifest(root / "train").fingerprint
    assert verify_cache(store, expect_dataset=ours).ok
    other = "sha256:" + "1" * 64
    assert any(f"expected {other}, found {ours}" in f
               for f in verify_cache(store, expect_dataset=other).faults)
    (store / "image_emb/c/0/0.0a1b.partial").write_bytes(b"x")
    assert any("0.0a1b.partial" in f for f in verify_cache(store, deep=False).faults)
    (store / "image_emb/c/0/0.0a1b.partial").unlink()
    group = zarr.open_group(str(store), mode="r+")
    to_image = group["text_to_image"][:]
    to_image[3] = 0  # caption of sample 1 pointing at sample 0 (its shard rewritten whole)
    group["text_to_image"][:8] = to_image[:8]
    faults = verify_cache(store).faults
    assert faults == ["text_to_image: 1 captions point at another sample's image "
                      "(first text row 3: train-000000.tar/s00001#1)"]


def test_neighbour_index_shard_lost_is_caught(tmp_path):
    """A lost idx shard reads back as -1 (the 'no neighbour' value): caught by its similarity."""
    random_cache(tmp_path / "caches/tiny/train.zarr", n_img=20, captions=1, dim=8)
    cfg = NeighborsConfig(teacher="tiny", k=3, cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), rows_per_shard=8)
    run_neighbors(cfg, "tiny", progress=False)
    store = tmp_path / "nn/tiny/train.zarr"
    cache_fp = TeacherCache.open(tmp_path / "caches/tiny/train.zarr").teacher_fingerprint
    assert open_neighbors(store, expect_teacher=cache_fp)["i2t_topk_idx"].shape == (20, 3)
    (store / "i2t_topk_idx/c/1/0").write_bytes(b"")
    with pytest.raises(CacheError, match=r"i2t_topk_idx/c/1/0 is empty"):
        open_neighbors(store)
    (store / "i2t_topk_idx/c/1/0").unlink()
    report = verify_cache(store)
    assert any("i2t_topk_idx: 8 rows hold fill values (first row 8)" in f for f in report.faults)


def test_scratch_markers_without_staging_are_discarded(tmp_path):
    """A run killed right after publishing leaves done markers but no staging: not trusted."""
    from pipeline.scratch import ScratchRun

    run = ScratchRun(tmp_path / "out", "sha256:x")
    run.mark_done("u1")
    (run.staging / "a").mkdir()
    run.publish()
    assert (tmp_path / "out/a").is_dir() and not run.dir.exists()
    run.dir.mkdir(parents=True)
    (run.dir / "run.json").write_text('{"fingerprint": "sha256:x"}')
    (run.dir / "done").mkdir()
    (run.dir / "done/u1.json").write_text("{}")
    assert not ScratchRun(tmp_path / "out", "sha256:x").is_done("u1")


def test_lock_is_reentrant_in_its_thread_only(tmp_path):
    from stages.lock import lock_path, output_lock

    out = tmp_path / "out"
    with output_lock(out) as path:
        assert path == lock_path(out) and path.exists()
        with output_lock(out):  # the stage locks, then run_teach locks again
            pass
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_try_lock(out)))
        thread.start()
        thread.join()
        assert errors == ["another thread of this process is writing it"]
        assert path.exists()
    assert not path.exists()


def _try_lock(out: Path) -> str:
    from stages.lock import LockError, output_lock

    try:
        with output_lock(out):
            return "locked"
    except LockError as exc:
        return str(exc).split(": ", 1)[1]
