"""Augmented views in teacher stores (schema v2): drawn in ``teach``, verified, replayed in ``train``."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.data.manifest import load_manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import iter_samples
from pipeline.errors import CacheError
from pipeline.stores.inspect import cache_info, verify_cache
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from pipeline.views import ViewSpec, apply_view, pick_view, view_params
from stages.teach.run import TeachConfig, run_teach
from tests.test_teach import Interrupting, tree_digest

VIEWS = 3


def teach_cfg(root: Path, out: Path, **kw) -> TeachConfig:
    base = TeachConfig(dataset=str(root), splits=("train", "test"), out_root=str(out / "caches"),
                       batch_size=4, rows_per_shard=8, rows_per_chunk=4,
                       summary_dir=str(out / "reports"), views=VIEWS, view_scale=(0.3, 0.9))
    return replace(base, **kw)


@pytest.fixture(scope="module")
def view_store(tmp_path_factory, tiny_teacher):
    """A dataset and the v2 store of its train split (3 views per image)."""
    from pipeline.data.writing import write_manifest, write_shards
    from tests.conftest import tiny_samples

    root = tmp_path_factory.mktemp("views")
    for split, n, start in (("train", 13, 0), ("test", 5, 10_000)):
        write_shards(tiny_samples(n, start), root / "data" / split, split, 6)
        write_manifest(root / "data" / split)
    summary = run_teach(teach_cfg(root / "data", root), "tiny", tiny_teacher, progress=False)
    return {"root": root, "data": root / "data", "store": root / "caches/tiny/train.zarr",
            "summary": summary}


def test_view_params_are_a_pure_function_of_dataset_sample_and_view():
    spec = ViewSpec(6, (0.2, 0.8), (0.5, 2.0), True)
    a = view_params(spec, "sha256:" + "a" * 64, "s/1", 40, 30)
    assert np.array_equal(a, view_params(spec, "sha256:" + "a" * 64, "s/1", 40, 30))
    assert not np.array_equal(a[1:], view_params(spec, "sha256:" + "a" * 64, "s/2", 40, 30)[1:])
    assert not np.array_equal(a[1:], view_params(spec, "sha256:" + "b" * 64, "s/1", 40, 30)[1:])
    assert a[0].tolist() == [0, 0, 40, 30, 0]  # view 0: the plain image
    x0, y0, x1, y1, flags = a[1:].T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 40).all() and (y1 <= 30).all()
    area = (x1 - x0) * (y1 - y0) / (40 * 30)
    assert ((area > 0.15) & (area < 0.85)).all()  # scale (0.2, 0.8), up to rounding
    many = np.concatenate([view_params(spec, "fp", f"s/{i}", 40, 30)[1:, 4] for i in range(40)])
    assert 0 < many.mean() < 1  # some flipped, some not
    no_flip = replace(spec, flip=False)
    assert all(view_params(no_flip, "fp", f"s/{i}", 40, 30)[:, 4].sum() == 0 for i in range(20))


def test_replayed_view_pixels_equal_the_box_cut_independently():
    from PIL import Image

    raw = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(raw)
    spec = ViewSpec(12, (0.2, 0.9))
    for row in view_params(spec, "fp", "s/7", 40, 30):
        x0, y0, x1, y1, flags = row.tolist()
        expect = raw[y0:y1, x0:x1]
        if flags & 1:
            expect = expect[:, ::-1]
        assert np.array_equal(np.asarray(apply_view(image, row)), expect)
    with pytest.raises(ValueError, match="outside the 40x30 image"):
        apply_view(image, (0, 0, 41, 30, 0))


def test_teach_stores_every_view_and_its_parameters(view_store, tiny_teacher):
    store, data = view_store["store"], view_store["data"]
    manifest = load_manifest(data / "train")
    cache = TeacherCache.open(store, expect_dataset=manifest.fingerprint)
    assert cache.attrs["schema_version"] == 2 and cache.views == VIEWS
    assert cache.image_views.shape == (13, VIEWS, tiny_teacher.embed_dim)
    assert np.array_equal(cache.image_emb, cache.image_views[:, 0])
    spec = ViewSpec(VIEWS, (0.3, 0.9))
    assert cache.view_spec == spec
    for row, sample in enumerate(iter_samples(manifest, handler=SkipCounter())):
        params = view_params(spec, manifest.fingerprint, sample.sample_id, *sample.image.size)
        assert np.array_equal(cache.image_view[row], params)
        # the teacher run here on the replayed view gives the cached embedding (float16 storage:
        # unit vectors within 2e-3 per component)
        pixels = torch.stack([tiny_teacher.preprocess(apply_view(sample.image, p)) for p in params])
        direct = tiny_teacher.encode_images(pixels).numpy()
        np.testing.assert_allclose(cache.image_views[row], direct, atol=2e-3)
    test = TeacherCache.open(data.parent / "caches/tiny/test.zarr")
    assert test.views == 1 and test.image_views is None and test.attrs["schema_version"] == 1
    info = cache_info(store)
    assert info["views"] == VIEWS and info["arrays"]["image_view"]["shape"] == [13, VIEWS, 5]
    assert verify_cache(store).ok


def test_view_zero_is_the_plain_embedding(view_store, tiny_teacher, tmp_path):
    plain = run_teach(teach_cfg(view_store["data"], tmp_path, views=1), "tiny", tiny_teacher,
                      progress=False)
    assert plain["units_computed"] > 0
    one = TeacherCache.open(tmp_path / "caches/tiny/train.zarr")
    assert one.attrs["schema_version"] == 1 and one.views == 1
    np.testing.assert_allclose(TeacherCache.open(view_store["store"]).image_emb, one.image_emb, atol=2e-3)
    assert one.teacher_fingerprint != TeacherCache.open(view_store["store"]).teacher_fingerprint


def test_rerun_and_resumed_run_give_bit_identical_view_stores(view_store, tiny_teacher, tmp_path):
    again = teach_cfg(view_store["data"], tmp_path / "again")
    run_teach(again, "tiny", tiny_teacher, progress=False)
    reference = tree_digest(view_store["root"] / "caches/tiny")
    assert tree_digest(tmp_path / "again/caches/tiny") == reference
    cfg = teach_cfg(view_store["data"], tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        run_teach(cfg, "tiny", Interrupting(tiny_teacher, budget=7), progress=False)
    resumed = run_teach(cfg, "tiny", tiny_teacher, progress=False)
    assert resumed["units_resumed"] >= 1
    assert tree_digest(tmp_path / "cut/caches/tiny") == reference
    kept = run_teach(cfg, "tiny", tiny_teacher, progress=False)  # current: kept, nothing recomputed
    assert kept["up_to_date"] and kept["forward_calls"] == 0


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_view_rows_are_caught(view_store, tmp_path):
    emb_store = _copy(view_store["store"], tmp_path / "emb.zarr")
    group = zarr.open_group(str(emb_store), mode="r+")
    rows = group["image_emb"][0:4]
    rows[2, 1, :] = np.nan  # one view of one valid row (checksums rewritten by zarr: values only)
    group["image_emb"][0:4] = rows
    report = verify_cache(emb_store)
    assert not report.ok and any("image_emb rows [0, 8)" in f for f in report.faults)
    with pytest.raises(CacheError, match="rows were never written|fill values"):
        TeacherCache.open(emb_store)
    with pytest.raises(CacheError, match="fill values"):
        TeacherCache.open(emb_store, lazy=True)

    view_store_copy = _copy(view_store["store"], tmp_path / "view.zarr")
    group = zarr.open_group(str(view_store_copy), mode="r+")
    rows = group["image_view"][8:13]
    rows[3, 2, 2] = rows[3, 0, 2] + 5  # a box beyond its image
    group["image_view"][8:13] = rows
    report = verify_cache(view_store_copy)
    assert any("image_view" in f and "[11]" in f for f in report.faults)
    with pytest.raises(CacheError, match="impossible view boxes"):
        TeacherCache.open(view_store_copy, lazy=True)


# ----------------------------------------------------------------------------- training


def _train_cfg(view_store, out: Path, **kw):
    from pipeline.losses import LossTerm
    from stages.train.run import TrainConfig
    from tests.test_train import TINY_STUDENT

    base = dict(student_kwargs=TINY_STUDENT, dataset=str(view_store["data"]),
                caches=(str(view_store["store"]),), out_dir=str(out), batch_size=4, steps=3,
                lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=100, shuffle_buffer=4,
                device="cpu", views="sample",
                losses=(LossTerm("contrastive"), LossTerm("feature"), LossTerm("similarity_kl")))
    base.update(kw)
    return TrainConfig(**base)


def test_train_replays_the_view_of_its_target(view_store, tmp_path):
    from pipeline.training.batch import assemble
    from pipeline.training.loader import LoaderState, collate, iter_batches
    from stages.train.run import make_dataset, setup

    run = setup(_train_cfg(view_store, tmp_path / "run"))
    manifest = load_manifest(view_store["data"] / "train")
    raw = {s.sample_id: s.image for s in iter_samples(manifest, handler=SkipCounter())}
    cache = TeacherCache.open(view_store["store"])
    items, _, _ = next(iter_batches(lambda e: make_dataset(run, e), 4, 0, LoaderState()))
    for it in items:
        assert it.view == pick_view(0, 0, it.sample_id, VIEWS)
        expect = run.student.preprocess(apply_view(raw[it.sample_id], cache.image_view[it.image_row, it.view]))
        assert torch.equal(it.pixels, expect)
    seen = {pick_view(0, e, sid, VIEWS) for e in range(4) for sid in raw}
    assert seen == set(range(VIEWS))  # every view gets replayed
    batch = collate(items)
    distill = assemble(run.plan, run.student, batch, run.device, amp=False)
    rows, views = batch["image_rows"].numpy(), batch["views"].numpy()
    assert np.array_equal(distill.teacher_image_emb.numpy(),
                          cache.image_views[rows, views].astype(np.float16).astype(np.float32))
    summary = __import__("stages.train.run", fromlist=["train"]).train(run.cfg, progress=False)
    assert summary["finished"] and summary["teacher_forward_calls"] == 0


def _one_view_copy(store: Path, path: Path) -> Path:
    """A v1 store of the same rows: view 0 of ``store`` only."""
    cache = TeacherCache.open(store)
    return write_cache_from_arrays(path, image_ids=cache.image_ids, text_ids=cache.text_ids,
                                   text_to_image=cache.text_to_image, teacher={"teacher": "one"},
                                   dataset_fingerprint=cache.dataset_fingerprint, split="train",
                                   logit_scale=cache.logit_scale, image_emb=cache.image_emb,
                                   text_emb=cache.text_emb)


def test_plain_views_and_v1_stores_train_as_before(view_store, tmp_path):
    from stages.train.run import train

    plain = train(_train_cfg(view_store, tmp_path / "plain", views="plain"), progress=False)
    assert plain["finished"]
    one = _one_view_copy(view_store["store"], tmp_path / "one.zarr")
    with pytest.raises(CacheError, match="holds one view per image"):
        train(_train_cfg(view_store, tmp_path / "v1", caches=(str(one),)), progress=False)
    assert train(_train_cfg(view_store, tmp_path / "v1p", caches=(str(one),), views="plain"),
                 progress=False)["finished"]


def test_ensemble_with_views_needs_the_same_views(view_store, tmp_path):
    from stages.train.run import train

    one = _one_view_copy(view_store["store"], tmp_path / "one.zarr")
    with pytest.raises(CacheError, match="same teach.views settings"):
        train(_train_cfg(view_store, tmp_path / "e", caches=(str(view_store["store"]), str(one))),
              progress=False)


def test_a_long_unit_shows_progress_before_it_ends(view_store, tiny_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILL_PROGRESS_PERCENT", "1")
    cfg = teach_cfg(view_store["data"], tmp_path, rows_per_shard=32, rows_per_chunk=4,
                    splits=("train",))
    run_teach(cfg, "tiny", tiny_teacher, progress=True)
    done = [int(m) for m in __import__("re").findall(r"teach tiny: (\d+)/39 ", capsys.readouterr().err)]
    # one unit of 13 images, batches of 4, then one of 26 captions: lines within each unit
    assert {4, 8, 12} <= set(done) and done[-1] == 39 and done == sorted(done)
