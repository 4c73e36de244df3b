"""``prepare`` from folder+CSV, folder+JSONL, COCO(+Karpathy) and the shipped demo shards."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.manifest import load_manifest
from pipeline.data.samples import SPLITS, assign_split
from pipeline.data.shards import iter_raw, iter_samples
from pipeline.errors import ConfigError, PipelineError
from stages.prepare.run import PrepareConfig, prepare
from tests._data_helpers import hash_split, image_array, jpeg_bytes, png_bytes

DEMO = Path(__file__).resolve().parents[1] / "demo" / "emoji"


def _read_out(out: Path) -> dict[str, list]:
    """split -> [(source_id, captions, label, image sha or array)] read back through the reader."""
    result = {}
    for split in SPLITS:
        manifest = load_manifest(out / split, verify=True)
        result[split] = []
        for shard in manifest.shards:
            for key, files in iter_raw(out / split / shard.name):
                meta = json.loads(files["json"])
                result[split].append((meta["source_id"], key, tuple(meta["captions"]), meta.get("label")))
    return result


def _assert_hash_split(out_rows: dict[str, list], cfg: PrepareConfig) -> None:
    for split, rows in out_rows.items():
        for source_id, *_ in rows:
            assert hash_split(source_id, cfg.salt, cfg.test_percent, cfg.val_percent) == split


def _folder(tmp_path: Path, n: int = 12) -> tuple[Path, list[str]]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"sub/img.v{i}.png" if i % 4 == 0 else f"im_{i}.jpg"  # dots must not leak into keys
        (src / name).write_bytes(png_bytes(i) if name.endswith(".png") else jpeg_bytes(i))
        names.append(name)
    return src, names


def test_folder_csv(tmp_path: Path) -> None:
    src, names = _folder(tmp_path)
    lines = ["file,caption,label"] + [f"{n},first {i},L{i % 3}" for i, n in enumerate(names)]
    lines += [f'{names[1]},"second, with comma",L1']
    (src / "captions.csv").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out"), shard_size=4,
                        test_percent=25, val_percent=25, salt="s")
    summary = prepare(cfg)
    rows = _read_out(tmp_path / "out")
    _assert_hash_split(rows, cfg)
    flat = {r[0]: r for split in rows.values() for r in split}
    assert sorted(flat) == sorted(names)
    assert flat[names[1]][2] == ("first 1", "second, with comma") and flat[names[1]][3] == "L1"
    keys = [r[1] for r in flat.values()]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    assert summary["n_images"] == len(names)
    assert sum(s["n_texts"] for s in summary["splits"].values()) == len(names) + 1
    for split in SPLITS:
        assert summary["splits"][split]["fingerprint"] == load_manifest(tmp_path / "out" / split).fingerprint
    # images are copied byte for byte and decode to the original pixels
    sample = next(s for s in iter_samples(load_manifest(tmp_path / "out" / "train")) if s.key.startswith("sub"))
    idx = int(sample.key.split("_v")[-1])
    np.testing.assert_array_equal(np.asarray(sample.image), image_array(idx))


def test_folder_jsonl_and_pipe_csv(tmp_path: Path) -> None:
    src, names = _folder(tmp_path, n=6)
    lines = [json.dumps({"file": n, "captions": [f"a {i}", f"b {i}"], "label": "x"}) for i, n in enumerate(names)]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n\n")
    cfg = PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out"),
                        captions_file=str(tmp_path / "caps.jsonl"), test_percent=30, val_percent=30)
    prepare(cfg)
    rows = _read_out(tmp_path / "out")
    _assert_hash_split(rows, cfg)
    assert sorted(r[0] for split in rows.values() for r in split) == sorted(names)
    assert all(r[2] == (f"a {names.index(r[0])}", f"b {names.index(r[0])}") for s in rows.values() for r in s)
    (tmp_path / "caps.csv").write_text("file,captions\n" + "".join(f"{n},x {i}|y {i}| \n" for i, n in enumerate(names)))
    prepare(PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out"),
                          captions_file=str(tmp_path / "caps.csv")))
    rows = _read_out(tmp_path / "out")
    assert all(r[2] == (f"x {names.index(r[0])}", f"y {names.index(r[0])}") for s in rows.values() for r in s)


def test_folder_errors_name_file_and_line(tmp_path: Path) -> None:
    src, names = _folder(tmp_path, n=2)
    out = str(tmp_path / "out")
    (src / "captions.csv").write_text(f"file,caption\n{names[0]},ok\nmissing.png,hello\n")
    with pytest.raises(PipelineError, match=r"captions\.csv:3: image file .*missing\.png not found"):
        prepare(PrepareConfig(source="folder", src=str(src), out=out))
    (src / "captions.csv").write_text(f"file,caption\n{names[0]},\n")
    with pytest.raises(PipelineError, match=r"captions\.csv:2: empty"):
        prepare(PrepareConfig(source="folder", src=str(src), out=out))
    (tmp_path / "c.jsonl").write_text(json.dumps({"file": names[0], "caption": "x"}) + "\n{broken\n")
    with pytest.raises(PipelineError, match=r"c\.jsonl:2: invalid JSON"):
        prepare(PrepareConfig(source="folder", src=str(src), out=out, captions_file=str(tmp_path / "c.jsonl")))
    with pytest.raises(ConfigError, match="test_percent"):
        prepare(PrepareConfig(test_percent=90, val_percent=20))
    assert not (tmp_path / "out").exists()


def _coco(tmp_path: Path) -> tuple[Path, dict, dict]:
    src = tmp_path / "coco"
    (src / "val2014").mkdir(parents=True)
    images, anns, kimages = [], [], []
    splits = ["train", "restval", "val", "test"]
    for i in range(8):
        name = f"COCO_val2014_{i:012d}.jpg"
        (src / "val2014" / name).write_bytes(jpeg_bytes(i))
        images.append({"id": 100 + i, "file_name": name})
        anns += [{"id": 2 * i, "image_id": 100 + i, "caption": f"cap {i} a"},
                 {"id": 2 * i + 1, "image_id": 100 + i, "caption": f"cap {i} b"}]
        kimages.append({"filepath": "val2014", "filename": name, "cocoid": 100 + i, "split": splits[i % 4],
                        "sentences": [{"raw": f"k {i}", "tokens": ["k"]}]})
    return src, {"images": images, "annotations": anns}, {"images": kimages, "dataset": "coco"}


def test_coco_with_karpathy_split(tmp_path: Path) -> None:
    src, coco, karpathy = _coco(tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    cfg = PrepareConfig(source="coco", src=str(src), out=str(tmp_path / "out"), shard_size=3,
                        annotations_file=str(tmp_path / "ann.json"), split_file=str(tmp_path / "dataset_coco.json"))
    summary = prepare(cfg)
    rows = _read_out(tmp_path / "out")
    expected = {k["filename"]: {"restval": "train"}.get(k["split"], k["split"]) for k in karpathy["images"]}
    assert {r[0]: split for split, rs in rows.items() for r in rs} == expected
    assert {split: s["n_images"] for split, s in summary["splits"].items()} == {"train": 4, "val": 2, "test": 2}
    first = next(r for r in rows["train"] if r[0].endswith("0000.jpg"))
    assert first[2] == ("cap 0 a", "cap 0 b")  # captions from the annotations file
    # Karpathy file alone: its sentences become the captions
    prepare(PrepareConfig(source="coco", src=str(src), out=str(tmp_path / "out2"),
                          split_file=str(tmp_path / "dataset_coco.json")))
    assert next(r for r in _read_out(tmp_path / "out2")["test"])[2][0].startswith("k ")


def test_coco_hash_split_without_split_file(tmp_path: Path) -> None:
    src, coco, _ = _coco(tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    cfg = PrepareConfig(source="coco", src=str(src), out=str(tmp_path / "out"),
                        annotations_file=str(tmp_path / "ann.json"), test_percent=40, val_percent=20)
    prepare(cfg)
    _assert_hash_split(_read_out(tmp_path / "out"), cfg)


def test_demo_split_matches_hash_rule(tmp_path: Path) -> None:
    source = {}
    for shard in load_manifest(DEMO, verify=True).shards:
        for key, files in iter_raw(DEMO / shard.name):
            source[key] = files
    out = tmp_path / "emoji"
    cfg = PrepareConfig(source="demo", src=str(DEMO), out=str(out), shard_size=700)
    summary = prepare(cfg)
    expected = Counter(hash_split(k, cfg.salt, cfg.test_percent, cfg.val_percent) for k in source)
    assert {s: summary["splits"][s]["n_images"] for s in SPLITS} == {s: expected[s] for s in SPLITS}
    seen: Counter = Counter()
    for split in SPLITS:
        for shard in load_manifest(out / split).shards:
            for key, files in iter_raw(out / split / shard.name):
                seen[key] += 1
                assert files["png"] == source[key]["png"]
                assert hash_split(key, cfg.salt, cfg.test_percent, cfg.val_percent) == split
    assert set(seen) == set(source) and set(seen.values()) == {1}
    assert len(source) == 1911 and assign_split("1f600", cfg) == hash_split("1f600", cfg.salt, 10, 10)


def test_output_replaced_atomically(tmp_path: Path) -> None:
    src, names = _folder(tmp_path, n=4)
    (src / "captions.csv").write_text("file,caption\n" + "".join(f"{n},c{i}\n" for i, n in enumerate(names)))
    out = tmp_path / "data" / "ds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "stale-000009.tar").write_bytes(b"old")
    prepare(PrepareConfig(source="folder", src=str(src), out=str(out)))
    assert sorted(os.listdir(tmp_path / "data")) == ["ds"]  # no temporary or old siblings left
    assert not (out / "train" / "stale-000009.tar").exists()
    assert sorted(os.listdir(out)) == list(sorted(SPLITS))
    # a run failing half-way through writing leaves the previous output untouched
    (src / "z.gif").write_bytes(b"GIF89a")
    (src / "captions.csv").write_text(f"file,caption\n{names[0]},c\nz.gif,c\n")
    with pytest.raises(PipelineError, match=r"z\.gif: unsupported image type"):
        prepare(PrepareConfig(source="folder", src=str(src), out=str(out)))
    assert sum(load_manifest(out / s).n_images for s in SPLITS) == 4
    assert sorted(os.listdir(tmp_path / "data")) == ["ds"]


def test_captions_with_bom_are_read(tmp_path: Path) -> None:
    src, names = _folder(tmp_path, n=4)
    # Excel's "CSV UTF-8": a byte-order mark before the header, non-ASCII captions
    text = "file,caption\r\n" + "".join(f"{n},café n°{i}\r\n" for i, n in enumerate(names))
    (src / "captions.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    prepare(PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out")))
    rows = {r[0]: r[2] for split in _read_out(tmp_path / "out").values() for r in split}
    assert rows == {n: (f"café n°{i}",) for i, n in enumerate(names)}
    lines = [json.dumps({"file": n, "caption": f"ünï {i}"}, ensure_ascii=False) for i, n in enumerate(names)]
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    prepare(PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out"),
                          captions_file=str(tmp_path / "c.jsonl")))
    rows = {r[0]: r[2] for split in _read_out(tmp_path / "out").values() for r in split}
    assert rows == {n: (f"ünï {i}",) for i, n in enumerate(names)}


@pytest.mark.parametrize("suffix,bom", [("csv", False), ("csv", True), ("jsonl", False)])
def test_non_utf8_byte_names_file_line_and_offset(tmp_path: Path, suffix: str, bom: bool) -> None:
    src, names = _folder(tmp_path, n=3)
    if suffix == "csv":
        head = ("file,caption\n" + f"{names[0]},fine\n").encode()
        bad = f"{names[1]},caf".encode() + b"\xe9" + b"\n"  # latin-1 e-acute
    else:
        head = (json.dumps({"file": names[0], "caption": "fine"}) + "\n").encode()
        bad = f'{{"file": "{names[1]}", "caption": "caf'.encode() + b"\xe9" + b'"}\n'
    data = (b"\xef\xbb\xbf" if bom else b"") + head + bad
    path = tmp_path / f"caps.{suffix}"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(PipelineError) as exc:
        prepare(PrepareConfig(source="folder", src=str(src), out=str(tmp_path / "out"), captions_file=str(path)))
    line = 3 if suffix == "csv" else 2
    assert str(exc.value) == (f"{path}:{line}: byte 0xe9 at byte offset {offset} is not UTF-8 "
                              "(save the file as UTF-8)")


# Runs prepare in a child that SIGKILLs itself once the first split is written, as a kill would.
KILLED_PREPARE = """
import os, signal, sys
from stages.prepare import run as P
real = P._write_split
def write_then_die(*args, **kw):
    real(*args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)
P._write_split = write_then_die
P.prepare(P.PrepareConfig(source="folder", src=sys.argv[1], out=sys.argv[2]))
"""


def test_killed_prepare_leftovers_are_removed_by_the_next_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    src, names = _folder(tmp_path, n=4)
    (src / "captions.csv").write_text("file,caption\n" + "".join(f"{n},c{i}\n" for i, n in enumerate(names)))
    out = tmp_path / "data" / "ds"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(src), str(out)])
    assert proc.wait(timeout=120) == -9
    left = os.listdir(tmp_path / "data")
    assert len(left) == 1 and left[0] == f".ds.tmp-{proc.pid}"
    # a live process's temporary directory (a concurrent run) is not touched
    live = tmp_path / "data" / f".ds.tmp-{os.getppid()}"
    live.mkdir()
    prepare(PrepareConfig(source="folder", src=str(src), out=str(out)))
    assert sorted(os.listdir(tmp_path / "data")) == sorted(["ds", live.name])


# ----------------------------------------------------------------------------- webdataset, flickr30k


def _img2dataset_shards(folder: Path, n_shards: int = 3, per_shard: int = 5) -> dict[str, tuple]:
    """Shards laid out as img2dataset writes them, written by webdataset's own ShardWriter:
    ``.jpg`` + ``.txt`` + ``.json`` (its ``caption`` and other fields), a ``.parquet`` and
    ``_stats.json`` beside each shard; some samples carry their caption in the json only.
    Returns key -> (captions, category, sha256 of the jpeg)."""
    import hashlib

    import webdataset as wds

    folder.mkdir(parents=True)
    expected = {}
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in range(n_shards):
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                jpg, caption, category = jpeg_bytes(s * 100 + i), f"drawing {s} {i}", ["cat", "dog"][i % 2]
                sample = {"__key__": key, "jpg": jpg,
                          "json": {"url": f"https://example.com/{key}.jpg", "caption": caption,
                                   "category": category, "key": key, "status": "success"}}
                if i % 3:  # img2dataset writes the caption to .txt too; some sources only to json
                    sample["txt"] = caption
                sink.write(sample)
                expected[key] = ((caption,), category, hashlib.sha256(jpg).hexdigest())
    for s in range(n_shards):
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not a shard")
        (folder / f"{s:05d}_stats.json").write_text("{}")
    assert len(list(folder.glob("*.tar"))) == n_shards
    return expected


def test_webdataset_hash_split_reshards_by_key(tmp_path: Path) -> None:
    import hashlib

    expected = _img2dataset_shards(tmp_path / "wds")
    cfg = PrepareConfig(source="webdataset", src=str(tmp_path / "wds"), out=str(tmp_path / "out"),
                        split="hash", label_key="category", shard_size=4, test_percent=30, val_percent=20)
    summary = prepare(cfg)
    assert summary["shards_read"] == 3 and summary["n_images"] == 15
    seen = {}
    for split in SPLITS:
        manifest = load_manifest(tmp_path / "out" / split, verify=True)
        for sample in iter_samples(manifest, decode_images=False):
            key = sample.sample_id.split("/")[1]
            assert hash_split(key, cfg.salt, cfg.test_percent, cfg.val_percent) == split
            seen[key] = (sample.captions, sample.label)
        for shard in manifest.shards:  # image bytes copied as they are
            for key, files in iter_raw(tmp_path / "out" / split / shard.name):
                assert hashlib.sha256(files["jpg"]).hexdigest() == expected[key][2]
    assert seen == {k: (caps, cat) for k, (caps, cat, _) in expected.items()}
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_webdataset_split_none_lists_the_shards_in_place(tmp_path: Path) -> None:
    import hashlib

    expected = _img2dataset_shards(tmp_path / "wds")
    shards = sorted((tmp_path / "wds").glob("*.tar"))
    cfg = PrepareConfig(source="webdataset", src=str(tmp_path / "wds" / "*.tar"), out=str(tmp_path / "out"),
                        split="none", single_split="train")
    summary = prepare(cfg)
    assert summary["splits"]["train"]["copied"] is False
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train"]
    assert not list((tmp_path / "out").rglob("*.tar"))  # nothing copied
    manifest = load_manifest(tmp_path / "out" / "train", verify=True)
    assert [(s.name, s.bytes, s.sha256) for s in manifest.shards] == [
        (p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in shards]
    samples = list(iter_samples(manifest, decode_images=False))
    assert {s.sample_id.split("/")[1]: s.captions for s in samples} == {k: v[0] for k, v in expected.items()}
    # teach reads the shards where they are
    from pipeline.config import TeacherEntry
    from pipeline.stores.teacher import TeacherCache
    from stages.teach.run import TeachConfig, run_teach
    from tests.conftest import TINY_CLIP_CFG

    teach = TeachConfig(dataset=str(tmp_path / "out"), splits=("train",), out_root=str(tmp_path / "caches"),
                        rows_per_shard=16, rows_per_chunk=8, summary_dir=str(tmp_path / "reports"))
    run_teach(teach, "tiny", entry=TeacherEntry("open_clip", {"model_cfg": TINY_CLIP_CFG, "pretrained": None}),
              progress=False)
    cache = TeacherCache.open(tmp_path / "caches/tiny/train.zarr", expect_dataset=manifest.fingerprint)
    assert sorted(cache.image_ids) == sorted(f"{p.name}/{k}" for p in shards for k in expected if k[:5] == p.stem)
    # a list file and a shards list name the same shards
    (tmp_path / "list.txt").write_text("\n".join(f"file://{p}" for p in shards) + "\n")
    for other in (PrepareConfig(source="webdataset", src=str(tmp_path / "list.txt"), split="none",
                                out=str(tmp_path / "out2")),
                  PrepareConfig(source="webdataset", shards=tuple(str(p) for p in shards), split="none",
                                out=str(tmp_path / "out3"), src="unused")):
        prepare(other)
        assert load_manifest(Path(other.out) / "train").fingerprint == manifest.fingerprint


def test_webdataset_sample_without_caption_names_shard_and_key(tmp_path: Path) -> None:
    from pipeline.errors import ShardError
    from tests._data_helpers import write_tar

    (tmp_path / "wds").mkdir()
    write_tar(tmp_path / "wds" / "00000.tar", [("a1.jpg", jpeg_bytes(1)), ("a1.txt", b"ok"),
                                               ("a2.jpg", jpeg_bytes(2)), ("a2.json", b'{"url": "x"}')])
    for split in ("hash", "none"):
        with pytest.raises(ShardError, match=r"shard 00000.tar, key 'a2': sample has no caption"):
            prepare(PrepareConfig(source="webdataset", src=str(tmp_path / "wds"), split=split,
                                  out=str(tmp_path / "out")))
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="label_key"):
        PrepareConfig(source="webdataset", split="none", label_key="category")
    with pytest.raises(ConfigError, match="source 'webdataset' only"):
        PrepareConfig(source="folder", split="none")


def test_flickr30k_karpathy_split(tmp_path: Path) -> None:
    src = tmp_path / "flickr30k-images"
    src.mkdir()
    images = []
    for i in range(8):
        name = f"{1000 + i}.jpg"
        (src / name).write_bytes(jpeg_bytes(i))
        images.append({"filename": name, "imgid": i, "split": ["train", "val", "test", "train"][i % 4],
                       "sentences": [{"raw": f"person {i} number {c} ", "tokens": []} for c in range(5)],
                       "sentids": list(range(5 * i, 5 * i + 5))})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    cfg = PrepareConfig(source="flickr30k", src=str(src), out=str(tmp_path / "out"),
                        split_file=str(tmp_path / "dataset_flickr30k.json"))
    prepare(cfg)
    rows = _read_out(tmp_path / "out")
    assert {r[0]: split for split, rs in rows.items() for r in rs} == {im["filename"]: im["split"] for im in images}
    assert rows["test"][0][2] == tuple(f"person 2 number {c}" for c in range(5))
    with pytest.raises(ConfigError, match="dataset_flickr30k.json"):
        PrepareConfig(source="flickr30k", src=str(src))
