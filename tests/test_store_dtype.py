"""Smaller teacher caches: float16 (default), bfloat16 and int8 with a per-row scale.

Round trips are compared with an independent float64 statement of each encoding; readers (eager,
lazy, a unit's rows) give the same decoded rows; ``verify`` and the readers catch damaged codes
and scales; ``teach`` writes each dtype, and the dtype is part of the teacher fingerprint.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import CacheError
from pipeline.fingerprint import fingerprint
from pipeline.stores.base import ROW_INVALID, Layout, store_nbytes
from pipeline.stores.encoding import decode, encode
from pipeline.stores.inspect import cache_info, verify_cache
from pipeline.stores.teacher import TeacherCache, unit_rows, write_cache_from_arrays
from stages.teach.run import run_teach
from tests.test_teach import teach_cfg

DATASET_FP = "sha256:" + "0" * 64
TEACHER = {"teacher": "synthetic", "embed_dim": 48, "logit_scale": 10.0, "modalities": ["image", "text"]}


def unit_rows_f32(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_round_trip_error_is_within_half_a_step():
    x = unit_rows_f32(300, 512, 0)
    x[7] = 0.0  # a zero row (an invalid image) keeps scale 0 and decodes to zeros
    x[8] *= 1e4  # any magnitude: the scale follows the row
    codes, scale = encode(x, "int8")
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (300,)
    assert codes.min() >= -127 and scale[7] == 0 and not codes[7].any()
    ref_scale = np.abs(x.astype(np.float64)).max(axis=1) / 127  # independent float64 statement
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    err = np.abs(decode(codes, "int8", scale).astype(np.float64) - x)
    assert (err <= ref_scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert err.max() > 0  # it is a lossy code
    # cosine similarity of unit rows survives: the retrieval order the caches exist for
    back, rows = decode(codes, "int8", scale), np.arange(300) != 7
    cos = (back[rows] * x[rows]).sum(1) / np.linalg.norm(back[rows], axis=1) / np.linalg.norm(x[rows], axis=1)
    assert cos.min() > 0.999


def test_bfloat16_round_trip_keeps_eight_significant_bits():
    x = unit_rows_f32(200, 64, 1) * np.float32(3e5)  # beyond float16's range, within bfloat16's
    codes, _ = encode(x, "bfloat16")
    assert codes.dtype == np.uint16
    back = decode(codes, "bfloat16")
    assert back.dtype == np.float32 and np.isfinite(back).all()
    rel = np.abs(back.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= 2.0 ** -8  # round to nearest: half a step of bfloat16's 7 mantissa bits
    # round to nearest even, stated independently on the float32 bits
    bits = x.view(np.uint32).astype(np.uint64)
    lower = bits >> 16
    rest = bits & 0xFFFF
    up = (rest > 0x8000) | ((rest == 0x8000) & (lower & 1 == 1))
    np.testing.assert_array_equal(codes, (lower + up).astype(np.uint16))


def write_store(path: Path, store_dtype: str, views: int = 1) -> dict[str, np.ndarray]:
    n_img, dim = 40, TEACHER["embed_dim"]
    image = unit_rows_f32(n_img, dim, 2)
    text = unit_rows_f32(2 * n_img, dim, 3)
    status = np.ones(n_img, np.uint8)
    status[5] = ROW_INVALID
    image[5] = 0.0
    ids = np.array([f"s/{i:03d}" for i in range(n_img)])
    write_cache_from_arrays(path, image_ids=ids, text_ids=np.array([f"{ids[i // 2]}#{i % 2}" for i in range(2 * n_img)]),
                            text_to_image=np.arange(2 * n_img) // 2, teacher=TEACHER, dataset_fingerprint=DATASET_FP,
                            split="train", logit_scale=10.0, image_emb=image, text_emb=text, image_status=status,
                            layout=Layout(16, 8), store_dtype=store_dtype)
    return {"image": image, "text": text}


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16", "int8"])
def test_every_reader_gives_the_decoded_rows(tmp_path, store_dtype):
    raw = write_store(tmp_path / "s.zarr", store_dtype)
    eager = TeacherCache.open(tmp_path / "s.zarr")
    lazy = TeacherCache.open(tmp_path / "s.zarr", lazy=True)
    for kind in ("image", "text"):
        codes, scale = encode(raw[kind], store_dtype)
        expected = decode(codes, store_dtype, scale).astype(np.float32)
        np.testing.assert_array_equal(getattr(eager, f"{kind}_emb"), expected)
        got = getattr(lazy, f"{kind}_emb")
        assert got.dtype == (np.float16 if store_dtype == "float16" else np.float32)
        np.testing.assert_array_equal(np.asarray(got[np.array([3, 17, 3, 0])], np.float32), expected[[3, 17, 3, 0]])
        np.testing.assert_array_equal(unit_rows(tmp_path / "s.zarr", kind, 16, 32)[f"{kind}_emb"].astype(np.float32),
                                      expected[16:32])
        np.testing.assert_allclose(expected, raw[kind], atol=0.02 if store_dtype == "int8" else 4e-3)
    assert not eager.image_emb[5].any()  # the invalid row stays zeros
    assert verify_cache(tmp_path / "s.zarr").ok
    info = cache_info(tmp_path / "s.zarr")
    assert info["arrays"]["image_emb"]["dtype"] == {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}[store_dtype]
    assert ("image_emb_scale" in info["arrays"]) == (store_dtype == "int8")
    # the dtype is part of the teacher fingerprint, except float16's (stores written before it)
    expected_fields = TEACHER if store_dtype == "float16" else TEACHER | {"store_dtype": store_dtype}
    assert eager.teacher_fingerprint == fingerprint(expected_fields)
    assert ("store_dtype" in eager.attrs) == (store_dtype != "float16")


@pytest.mark.parametrize("damage,message", [
    (np.nan, "scales that are not finite"), (-0.01, "scales that are not finite or negative"),
    (0.0, "a zero scale beside non-zero codes")])
def test_verify_and_readers_catch_a_damaged_scale(tmp_path, damage, message):
    write_store(tmp_path / "s.zarr", "int8")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    scale = group["text_emb_scale"][16:32]
    scale[3] = damage
    group["text_emb_scale"][16:32] = scale  # rewritten through zarr: checksums stay valid
    report = verify_cache(tmp_path / "s.zarr")
    assert not report.ok
    assert any(message in f and "text_emb rows [16, 32)" in f and "first row 19" in f for f in report.faults), report.faults
    if damage != 0.0:  # a non-finite decoded row: the readers refuse it too
        with pytest.raises(CacheError, match="text"):
            TeacherCache.open(tmp_path / "s.zarr")
        lazy = TeacherCache.open(tmp_path / "s.zarr", lazy=True, verify=False)
        with pytest.raises(CacheError, match="text_emb.*first rows \\[19\\]"):
            lazy.text_emb[np.array([19])]


def test_verify_catches_a_stray_code(tmp_path):
    write_store(tmp_path / "s.zarr", "int8")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    codes = group["image_emb"][0:16]
    codes[2, :] //= 2  # the row's largest code is no longer 127: codes and scale disagree
    codes[9, 0] = -128  # the fill code: never written by quantisation
    group["image_emb"][0:16] = codes
    faults = verify_cache(tmp_path / "s.zarr").faults
    assert any("largest code is not 127 (first row 2)" in f for f in faults), faults
    assert any("fill codes" in f and "first row 9" in f for f in faults), faults


def test_int8_store_is_about_a_quarter_of_float32(tmp_path):
    n, dim = 4096, 512
    x = unit_rows_f32(n, dim, 4)
    sizes = {}
    for dtype in ("float16", "bfloat16", "int8"):
        path = tmp_path / f"{dtype}.zarr"
        write_cache_from_arrays(path, image_ids=np.arange(n).astype(str), text_ids=np.zeros(0, str),
                                text_to_image=np.zeros(0, np.int32), teacher=TEACHER | {"modalities": ["image"]},
                                dataset_fingerprint=DATASET_FP, split="train", logit_scale=10.0,
                                image_emb=x, layout=Layout(1024, 256), store_dtype=dtype)
        group = zarr.open_group(str(path), mode="r")
        sizes[dtype] = sum(store_nbytes(path / a) for a in group.array_keys() if a.startswith("image_emb"))
    raw = n * dim * 4
    # zstd takes a little more off (the exponent bits of unit vectors repeat, bfloat16's most)
    assert 0.3 < sizes["float16"] / raw <= 0.51 and 0.3 < sizes["bfloat16"] / raw <= 0.51
    assert 0.2 < sizes["int8"] / raw <= 0.27


def test_teach_writes_each_dtype_and_keeps_float16_fingerprints(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=10, n_test=4)
    stores = {}
    for dtype in ("float16", "int8"):
        cfg = replace(teach_cfg(root, tmp_path, splits=("train",)), out_root=str(tmp_path / dtype), store_dtype=dtype)
        run_teach(cfg, "tiny", tiny_teacher, progress=False)
        stores[dtype] = TeacherCache.open(tmp_path / dtype / "tiny/train.zarr")
        assert verify_cache(tmp_path / dtype / "tiny/train.zarr").ok
    f16, i8 = stores["float16"], stores["int8"]
    assert f16.teacher_fingerprint == fingerprint(tiny_teacher.fingerprint())  # as before the setting
    assert i8.teacher_fingerprint == fingerprint(tiny_teacher.fingerprint() | {"store_dtype": "int8"})
    np.testing.assert_allclose(i8.image_emb, f16.image_emb, atol=0.02)
    np.testing.assert_allclose(i8.text_emb, f16.text_emb, atol=0.02)
    # a rerun with another dtype is not "current": it rebuilds
    cfg = replace(teach_cfg(root, tmp_path, splits=("train",)), out_root=str(tmp_path / "int8"), store_dtype="bfloat16")
    assert run_teach(cfg, "tiny", tiny_teacher, progress=False)["units_computed"] > 0
    assert TeacherCache.open(tmp_path / "int8/tiny/train.zarr").store_dtype == "bfloat16"


def test_int8_views_keep_a_scale_per_view(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=9, n_test=4)
    out = {}
    for dtype in ("float16", "int8"):
        cfg = replace(teach_cfg(root, tmp_path, splits=("train",)), out_root=str(tmp_path / dtype),
                      store_dtype=dtype, views=3)
        run_teach(cfg, "tiny", tiny_teacher, progress=False)
        out[dtype] = tmp_path / dtype / "tiny/train.zarr"
    assert verify_cache(out["int8"]).ok
    assert zarr.open_group(str(out["int8"]), mode="r")["image_emb_scale"].shape == (9, 3)
    f16 = TeacherCache.open(out["float16"], lazy=True)
    i8 = TeacherCache.open(out["int8"], lazy=True)
    assert i8.image_views.shape == (9, 3, 32) and i8.image_views.dtype == np.float32
    np.testing.assert_allclose(i8.image_views[:], f16.image_views[:].astype(np.float32), atol=0.02)
    np.testing.assert_array_equal(i8.image_emb[:], i8.image_views[:][:, 0])
