"""`distill align`: heads trained on cached single-modal features make a cross-modal teacher store."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import TeacherEntry
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError
from pipeline.fingerprint import fingerprint
from pipeline.metrics import retrieval_metrics
from pipeline.stores.inspect import verify_cache
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from pipeline.teachers import Teacher, create_teacher
from stages.align.run import AlignConfig, contrastive_loss, run_align
from stages.teach.run import TeachConfig, run_teach
from tests.conftest import TINY_CLIP_CFG, tiny_samples


def test_contrastive_loss_matches_float64():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((7, 5))
    txt = rng.standard_normal((7, 5))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scale = 12.5
    logits = scale * img @ txt.T

    def ce(rows):  # mean over rows of -log softmax(row)[i]
        m = rows.max(axis=1, keepdims=True)
        logsumexp = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(logsumexp - np.diag(rows)))

    expected = (ce(logits) + ce(logits.T)) / 2
    got = contrastive_loss(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32),
                           torch.tensor(scale))
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- synthetic sources


def _synthetic_sources(root: Path, split: str, n: int, seed: int, dataset_fp: str,
                       vision_seed: int = 0) -> None:
    """A vision-only and a text-only store of one split whose features share a latent per image
    (vision: one linear map of it, text: another plus noise), as two real single-modal encoders
    of the same pictures and their captions would."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8))
    a = np.random.default_rng(100 + vision_seed).standard_normal((8, 24))
    b = np.random.default_rng(200).standard_normal((8, 12))
    vis = z @ a
    t2i = np.repeat(np.arange(n), 2)
    txt = z[t2i] @ b + 0.05 * rng.standard_normal((2 * n, 12))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    ids = np.array([f"{split}{i:04d}" for i in range(n)])
    text_ids = np.array([f"{ids[i]}#{c}" for i, c in zip(t2i, np.tile([0, 1], n))])
    common = dict(image_ids=ids, text_ids=text_ids, text_to_image=t2i, dataset_fingerprint=dataset_fp,
                  split=split, logit_scale=1 / 0.07)
    write_cache_from_arrays(root / "vis" / f"{split}.zarr", image_emb=unit(vis),
                            teacher={"teacher": "synthetic_vision", "seed": vision_seed}, **common)
    write_cache_from_arrays(root / "txt" / f"{split}.zarr", text_emb=unit(txt),
                            teacher={"teacher": "synthetic_text"}, **common)


DS = {"train": "sha256:" + "1" * 64, "val": "sha256:" + "2" * 64, "test": "sha256:" + "3" * 64}


def _cfg(tmp_path: Path, **kw) -> AlignConfig:
    base = dict(name="al", vision="vis", text="txt", cache_root=str(tmp_path / "caches"),
                embed_dim=16, epochs=60, batch_size=32, lr=0.01, patience=60,
                heads_dir=str(tmp_path / "models"), summary_dir=str(tmp_path / "reports"),
                rows_per_shard=64, rows_per_chunk=16)
    return AlignConfig(**(base | kw))


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    root = tmp_path / "caches"
    for split, n, seed in (("train", 200, 0), ("val", 40, 1), ("test", 60, 2)):
        _synthetic_sources(root, split, n, seed, DS[split])
    return root


def test_align_writes_a_verified_cross_modal_store(synthetic, tmp_path):
    forwards = Teacher.total_forward_calls
    summary = run_align(_cfg(tmp_path), progress=False)
    assert Teacher.total_forward_calls == forwards and summary["forward_calls"] == 0
    assert summary["splits"] == ["test", "train", "val"] and not summary["up_to_date"]
    for split in ("train", "val", "test"):
        store = synthetic / "al" / f"{split}.zarr"
        report = verify_cache(store, expect_dataset=DS[split])
        assert report.ok, report.faults
        cache = TeacherCache.open(store)
        assert cache.image_emb.shape[1] == cache.text_emb.shape[1] == 16
        assert cache.attrs["teacher"]["vision_teacher"] == fingerprint({"teacher": "synthetic_vision", "seed": 0})
        assert cache.attrs["teacher"]["text_teacher"] == fingerprint({"teacher": "synthetic_text"})
        assert cache.logit_scale == pytest.approx(summary["logit_scale"])
    # the sources share a latent, so the aligned teacher retrieves far above chance on unseen pairs
    test = TeacherCache.open(synthetic / "al" / "test.zarr")
    assert retrieval_metrics(test.image_emb, test.text_emb, test.text_to_image)["t2i_R@1"] > 60
    # the same settings again: the same heads, so the stores are kept as they are
    assert run_align(_cfg(tmp_path), progress=False)["up_to_date"]


def test_fingerprint_follows_heads_and_sources(synthetic, tmp_path):
    def teacher_fp(cfg):
        return run_align(cfg, progress=False)["teacher_fingerprint"]

    first = teacher_fp(_cfg(tmp_path))
    assert teacher_fp(_cfg(tmp_path, embed_dim=8)) != first
    assert teacher_fp(_cfg(tmp_path, head="mlp", hidden_dim=16)) != first
    assert teacher_fp(_cfg(tmp_path)) == first
    other = tmp_path / "other"  # another vision teacher over the same data
    for split, n, seed in (("train", 200, 0), ("val", 40, 1)):
        _synthetic_sources(other, split, n, seed, DS[split], vision_seed=1)
    assert teacher_fp(_cfg(tmp_path, cache_root=str(other))) != first


def test_sources_of_different_datasets_are_refused(tmp_path):
    root = tmp_path / "caches"
    _synthetic_sources(root, "train", 20, 0, DS["train"])
    moved = tmp_path / "moved"
    _synthetic_sources(moved, "train", 20, 0, DS["test"])
    (root / "txt" / "train.zarr").rename(root / "txt" / "old.zarr")
    (moved / "txt" / "train.zarr").rename(root / "txt" / "train.zarr")
    with pytest.raises(CacheError) as exc:
        run_align(_cfg(tmp_path), progress=False)
    msg = str(exc.value)
    assert DS["train"] in msg and DS["test"] in msg and "vis/train.zarr" in msg and "txt/train.zarr" in msg
    assert not (root / "al").exists()


def test_missing_train_cache_is_named(tmp_path):
    root = tmp_path / "caches"
    _synthetic_sources(root, "test", 10, 0, DS["test"])
    with pytest.raises(CacheError, match=r"vis/train.zarr.*distill teach"):
        run_align(_cfg(tmp_path), progress=False)


# ----------------------------------------------------------------------------- real tiny teachers


VIS = TeacherEntry("open_clip", {"model_cfg": TINY_CLIP_CFG, "pretrained": None, "seed": 1})
TXT = TeacherEntry("open_clip", {"model_cfg": TINY_CLIP_CFG, "pretrained": None, "seed": 2})


@pytest.mark.parametrize("store_dtype,views", [("float16", 1), ("int8", 1), ("float16", 2)])
def test_aligned_teacher_end_to_end_reproduces_the_store(tmp_path, store_dtype, views):
    # int8 source stores, or a train split taught with views: the teacher built from the heads is
    # the one align recorded (the sources' fingerprints carry their dtype and views), and it
    # computes the store within the stored dtype's step
    root = tmp_path / "data"
    for split, n, start in (("train", 24, 0), ("val", 8, 5000), ("test", 10, 10_000)):
        write_shards(tiny_samples(n, start), root / split, split, 7)
        write_manifest(root / split)
    teach = TeachConfig(dataset=str(root), splits=("train", "val", "test"), out_root=str(tmp_path / "caches"),
                        rows_per_shard=16, rows_per_chunk=8, summary_dir=str(tmp_path / "reports"),
                        store_dtype=store_dtype, views=views, view_splits=("train",))
    atol = 3e-3 if store_dtype == "float16" else 2e-2
    for name, entry in (("vis", VIS), ("txt", TXT)):
        run_teach(teach, name, entry=entry, progress=False)
    forwards = Teacher.total_forward_calls
    cfg = _cfg(tmp_path, embed_dim=16, epochs=20, batch_size=8, patience=5)
    summary = run_align(cfg, {"vision": VIS, "text": TXT}, progress=False)
    assert Teacher.total_forward_calls == forwards  # align ran no encoder
    assert summary["epochs_run"] <= 20 and summary["best_val_loss"] is not None

    teacher = create_teacher("aligned", heads=str(tmp_path / "models" / "al"))
    store = TeacherCache.open(tmp_path / "caches/al/test.zarr")
    assert fingerprint(teacher.fingerprint()) == store.teacher_fingerprint
    assert teacher.logit_scale == pytest.approx(store.logit_scale)
    samples = tiny_samples(10, 10_000)
    images = {s["__key__"]: Image.open(io.BytesIO(s["png"])) for s in samples}
    pixels = torch.stack([teacher.preprocess(images[i.split('/')[-1]]) for i in store.image_ids])
    np.testing.assert_allclose(teacher.encode_images(pixels).numpy(), store.image_emb, atol=atol)
    captions = {f"{s['__key__']}#{c}": cap for s in samples for c, cap in enumerate(s["json"]["captions"])}
    texts = teacher.encode_texts([captions[t.split('/')[-1]] for t in store.text_ids]).numpy()
    np.testing.assert_allclose(texts, store.text_emb, atol=atol)
    # the spec records where the encoders come from
    spec = json.loads((tmp_path / "models/al/heads.json").read_text())
    assert spec["vision"]["entry"] == dataclasses.asdict(VIS) and spec["text"]["name"] == "txt"
    assert ("views" in spec["vision"]["store_fields"]) == (views > 1)
    assert ("store_dtype" in spec["vision"]["store_fields"]) == (store_dtype != "float16")


def test_align_carries_the_vision_stores_views_through_the_heads(synthetic, tmp_path):
    from pipeline.teachers.aligned import load_heads
    from pipeline.views import ViewSpec

    # the train split's vision store with 3 views: view 0 the plain features, two perturbed ones
    plain = TeacherCache.open(synthetic / "vis" / "train.zarr")
    rng = np.random.default_rng(5)
    views = np.stack([plain.image_emb] + [plain.image_emb + 0.1 * rng.standard_normal(plain.image_emb.shape)
                                         for _ in range(2)], axis=1)
    views = (views / np.linalg.norm(views, axis=-1, keepdims=True)).astype(np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10, 0], [1, 1, 9, 9, 1], [0, 2, 8, 10, 0]], np.int32), (len(views), 1, 1))
    spec = ViewSpec(3)
    import shutil
    shutil.rmtree(synthetic / "vis" / "train.zarr")
    write_cache_from_arrays(synthetic / "vis" / "train.zarr", image_ids=plain.image_ids,
                            text_ids=plain.text_ids, text_to_image=plain.text_to_image,
                            teacher={"teacher": "synthetic_vision", "seed": 0, "views": spec.attrs()},
                            dataset_fingerprint=DS["train"], split="train", logit_scale=1 / 0.07,
                            image_emb=views, image_view=boxes, views=spec)
    run_align(_cfg(tmp_path), progress=False)
    aligned = TeacherCache.open(synthetic / "al" / "train.zarr")
    assert aligned.views == 3 and aligned.view_spec == spec
    assert np.array_equal(aligned.image_view, boxes)
    heads, _ = load_heads(tmp_path / "models" / "al")
    with torch.no_grad():  # every view through the image head, independently of the runner
        expect = heads.image(torch.from_numpy(views.astype(np.float16).astype(np.float32).reshape(-1, 24)))
    np.testing.assert_allclose(aligned.image_views, expect.numpy().reshape(len(views), 3, -1), atol=2e-3)
    assert TeacherCache.open(synthetic / "al" / "test.zarr").views == 1
    assert verify_cache(synthetic / "al" / "train.zarr").ok
