"""Shard reading, validation, manifests and writing on real tar files."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.handlers import SkipCounter, make_handler, strict_handler
from pipeline.data.shards import iter_samples
from pipeline.data.writing import build_manifest, write_manifest, write_shards
from pipeline.errors import SampleDecodeError, ShardError
from tests._data_helpers import (CORRUPT_PNG, caption_json, cut_points, image_array, jpeg_bytes,
                                 png_bytes, simple_members, write_tar)


def _two_shards(root: Path) -> None:
    write_tar(root / "a-000000.tar", simple_members(["k0", "k1"], seed=0))
    write_tar(root / "a-000001.tar", simple_members(["k2", "k3", "k4"], seed=10))


def test_round_trip_caption_layouts(tmp_path: Path) -> None:
    rgba = image_array(3, channels=4)
    rgba[0, 0, 3] = 0  # one fully transparent pixel -> must come out white
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    members = [
        ("json.png", png_bytes(1)), ("json.json", caption_json(["c one", " c two "], label="cat")),
        ("txt.jpeg", jpeg_bytes(2)), ("txt.txt", b"first line\n\n  second line  \n"),
        ("i2d.jpg", jpeg_bytes(4)), ("i2d.json", json.dumps({"caption": "img2dataset caption"}).encode()),
        ("i2dtxt.jpg", jpeg_bytes(5)), ("i2dtxt.txt", b"from txt"),
        ("i2dtxt.json", json.dumps({"caption": "ignored", "url": "x"}).encode()),
        ("alpha.png", buf.getvalue()), ("alpha.txt", b"transparent"), ("alpha.cls", b"7"),
    ]
    write_tar(tmp_path / "s-000000.tar", members)
    samples = list(iter_samples(write_manifest(tmp_path)))
    assert [s.key for s in samples] == ["json", "txt", "i2d", "i2dtxt", "alpha"]
    assert [s.captions for s in samples] == [("c one", "c two"), ("first line", "second line"),
                                             ("img2dataset caption",), ("from txt",), ("transparent",)]
    assert [s.label for s in samples] == ["cat", None, None, None, None]
    assert samples[0].sample_id == "s-000000.tar/json"
    assert all(s.image.mode == "RGB" and s.error is None for s in samples)
    np.testing.assert_array_equal(np.asarray(samples[0].image), image_array(1))
    expected_jpeg = np.asarray(Image.open(io.BytesIO(jpeg_bytes(2))).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(samples[1].image), expected_jpeg)
    # alpha compositing onto white, computed independently in float64
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.round(rgba[..., :3] * a + 255 * (1 - a))
    assert np.abs(np.asarray(samples[4].image).astype(np.float64) - expected).max() <= 1
    assert tuple(samples[4].image.getpixel((0, 0))) == (255, 255, 255)


def test_manifest_counts_offsets_fingerprint(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    m = write_manifest(tmp_path)
    assert [s.n_samples for s in m.shards] == [2, 3]
    assert [s.n_texts for s in m.shards] == [1 + 2, 3 + 1 + 2]  # captions = 1 + index % 3
    assert (m.n_images, m.n_texts) == (5, 9)
    assert m.image_offsets() == [0, 2] and m.text_offsets() == [0, 3]
    loaded = load_manifest(tmp_path, verify=True)
    assert loaded == m and loaded.fingerprint == build_manifest(tmp_path).fingerprint
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema"] and data["schema_version"] == 1 and data["fingerprint"] == m.fingerprint
    assert Manifest.from_dict(m.to_dict(), tmp_path) == m
    # texts in manifest order = captions of samples in order
    texts = [c for s in iter_samples(m, decode_images=False) for c in s.captions]
    assert len(texts) == m.n_texts
    write_tar(tmp_path / "a-000001.tar", simple_members(["k2", "k3", "k5"], seed=10))
    assert build_manifest(tmp_path).fingerprint != m.fingerprint


def test_verify_names_modified_shard(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    write_manifest(tmp_path)
    path = tmp_path / "a-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # same size, different content: only the hash notices
    path.write_bytes(bytes(data))
    load_manifest(tmp_path)  # the cheap check passes
    with pytest.raises(ShardError, match=r"a-000001\.tar.*distill prepare"):
        load_manifest(tmp_path, verify=True)
    path.write_bytes(bytes(data) + b"\0" * 512)
    with pytest.raises(ShardError, match=r"a-000001\.tar: size"):
        load_manifest(tmp_path)


def test_edited_manifest_is_rejected(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    data = write_manifest(tmp_path).to_dict()
    data["shards"][0]["n_samples"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="fingerprint"):
        load_manifest(tmp_path)


def test_truncated_tar_raises_naming_shard(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "good.tar", simple_members(["k0", "k1", "k2"]))
    whole = good.read_bytes()
    for cut in cut_points(good):
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        (root / "t-000000.tar").write_bytes(whole)
        manifest = build_manifest(root)  # manifest of the intact shard
        (root / "t-000000.tar").write_bytes(whole[:cut])
        with pytest.raises(ShardError, match=r"t-000000\.tar.*truncated"):
            build_manifest(root)
        with pytest.raises(ShardError, match=r"t-000000\.tar"):
            list(iter_samples(manifest))


def test_partial_end_marker_is_accepted(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "t-000000.tar", simple_members(["k0", "k1"]))
    end_of_data = cut_points(path)[-1]
    path.write_bytes(path.read_bytes()[:end_of_data + 512])  # one zero block left: no data lost
    assert build_manifest(tmp_path).n_images == 2


@pytest.mark.parametrize("members", [
    [("a.png", png_bytes(0)), ("a.png", png_bytes(1)), ("a.txt", b"x")],
    [("a.png", png_bytes(0)), ("a.txt", b"x"), ("b.png", png_bytes(1)), ("b.txt", b"y"), ("a.json", b"{}")],
])
def test_duplicate_key(tmp_path: Path, members: list) -> None:
    write_tar(tmp_path / "d-000000.tar", members)
    with pytest.raises(ShardError, match=r"d-000000\.tar, key 'a': duplicate key"):
        build_manifest(tmp_path)


def test_dotted_basename(tmp_path: Path) -> None:
    write_tar(tmp_path / "d-000000.tar", [("img.v2.png", png_bytes(0)), ("img.v2.txt", b"x")])
    with pytest.raises(ShardError, match=r"d-000000\.tar, key 'img'.*'img\.v2\.png'.*dotted"):
        build_manifest(tmp_path)


def test_missing_caption_and_missing_image(tmp_path: Path) -> None:
    write_tar(tmp_path / "m-000000.tar", [("ok.png", png_bytes(0)), ("ok.txt", b"x"),
                                          ("nocap.png", png_bytes(1)), ("nocap.json", b'{"captions": [" "]}')])
    with pytest.raises(ShardError, match=r"m-000000\.tar, key 'nocap'.*no caption"):
        build_manifest(tmp_path)
    write_tar(tmp_path / "m-000000.tar", [("noimg.txt", b"x")])
    with pytest.raises(ShardError, match=r"m-000000\.tar, key 'noimg'.*no image"):
        build_manifest(tmp_path)


def _corrupt_dataset(root: Path) -> Manifest:
    members = simple_members(["k0"]) + [("bad.png", CORRUPT_PNG), ("bad.txt", b"bad caption")]
    members += simple_members(["k2"], seed=5)
    write_tar(root / "c-000000.tar", members)
    return write_manifest(root)  # structure is fine: images are not decoded while scanning


def test_corrupt_image_strict(tmp_path: Path) -> None:
    manifest = _corrupt_dataset(tmp_path)
    with pytest.raises(SampleDecodeError, match=r"c-000000\.tar, key bad") as info:
        list(iter_samples(manifest, handler=strict_handler))
    assert (info.value.shard, info.value.key) == ("c-000000.tar", "bad")
    assert len(list(iter_samples(manifest, decode_images=False))) == 3  # no decode, no error


def test_corrupt_image_skip_keeps_rows(tmp_path: Path) -> None:
    manifest = _corrupt_dataset(tmp_path)
    counter = SkipCounter()
    samples = list(iter_samples(manifest, handler=counter))
    assert [s.key for s in samples] == ["k0", "bad", "k2"]
    assert counter.count == 1 and counter.skipped[0][:2] == ("c-000000.tar", "bad")
    assert samples[1].image is None and samples[1].error == counter.skipped[0][2]
    assert samples[1].captions == ("bad caption",)
    assert samples[0].image is not None and samples[2].image is not None
    assert isinstance(make_handler("skip"), SkipCounter) and make_handler("strict") is strict_handler


def test_row_range_and_shard_filter(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    m = write_manifest(tmp_path)
    everything = [s.sample_id for s in iter_samples(m, decode_images=False)]
    for start, stop in [(0, 5), (1, 4), (2, 3), (3, 3), (4, 9)]:
        got = [s.sample_id for s in iter_samples(m, decode_images=True, start=start, stop=stop)]
        assert got == everything[start:stop]
    assert [s.key for s in iter_samples(m, shards=["a-000001.tar"])] == ["k2", "k3", "k4"]
    with pytest.raises(ShardError, match="nope.tar"):
        list(iter_samples(m, shards=["nope.tar"]))


def _samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:04d}", "png": png_bytes(i), "json": {"captions": [f"c{i}"], "label": "x"}}
            for i in range(n)]


def test_write_shards_atomic_and_deterministic(tmp_path: Path) -> None:
    paths = write_shards(_samples(7), tmp_path / "a", "train", 3)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(os.listdir(tmp_path / "a")) == [p.name for p in paths]  # no temporary files left
    again = write_shards(_samples(7), tmp_path / "b", "train", 3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    m = write_manifest(tmp_path / "a")
    assert [s.n_samples for s in m.shards] == [3, 3, 1]
    got = list(iter_samples(m))
    assert [s.key for s in got] == [f"{i:04d}" for i in range(7)]
    np.testing.assert_array_equal(np.asarray(got[5].image), image_array(5))
    bad = _samples(4) + [{"__key__": "x.y", "png": b"", "json": {}}]
    with pytest.raises(ValueError, match="x.y"):
        write_shards(bad, tmp_path / "c", "train", 3)
    assert sorted(os.listdir(tmp_path / "c")) == ["train-000000.tar"]  # finished shard only


def test_interoperates_with_webdataset(tmp_path: Path) -> None:
    """Shards written by webdataset's TarWriter (as img2dataset does) read here, and ours read there."""
    import webdataset as wds

    from tests.conftest import shape_png

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with wds.TarWriter(str(theirs / "00000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": shape_png("red", "circle", seed=i),
                        "txt": f"caption {i}", "json": {"caption": f"caption {i}", "key": f"{i:09d}"}})
    manifest = write_manifest(theirs)
    samples = list(iter_samples(manifest))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert [s.captions for s in samples] == [("caption 0",), ("caption 1",), ("caption 2",)]
    assert all(s.image is not None and s.image.size == (32, 32) for s in samples)

    ours = tmp_path / "ours"
    write_shards([{"__key__": f"k{i}", "png": shape_png("blue", "square", seed=i),
                   "json": {"captions": [f"c{i}a", f"c{i}b"]}} for i in range(4)], ours, "s", 3)
    read = list(wds.WebDataset([str(p) for p in sorted(ours.glob("*.tar"))], shardshuffle=False))
    assert [r["__key__"] for r in read] == ["k0", "k1", "k2", "k3"]
    assert json.loads(read[1]["json"])["captions"] == ["c1a", "c1b"]
