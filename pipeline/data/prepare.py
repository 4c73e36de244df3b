"""Stage 0: turn a raw image-caption source into split WebDataset dataset directories.

Output: ``<out>/<split>/<split>-NNNNNN.tar`` plus ``<out>/<split>/manifest.json`` for each split
in train/val/test. Everything is written into a temporary sibling directory and renamed into
place at the end, so an old ``<out>`` is only replaced once the new one is complete.

Sources (``PrepareConfig.source``):

* ``folder``: a folder of images plus a captions file, CSV or JSONL. CSV needs a ``file`` column and
  either ``caption`` (several rows per file allowed) or ``captions`` (``|``-separated); an optional
  ``label`` column. JSONL lines are ``{"file": ..., "captions": [...] | "caption": ..., "label": ...}``.
  ``file`` is relative to ``src``.
* ``coco``: a COCO captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with
  ``image_id``/``caption``) with images under ``src`` (``src/<file_name>`` or one sub-folder down,
  e.g. ``src/val2014/<file_name>``), optionally a Karpathy split file (``dataset_coco.json``:
  ``images`` with ``filename``, ``filepath``, ``split`` and ``sentences[].raw``); Karpathy
  ``restval`` counts as train. Without an annotations file the Karpathy sentences are the captions.
* ``flickr30k``: Flickr30k in its Karpathy split file (``dataset_flickr30k.json``, the layout of
  ``dataset_coco.json`` without ``filepath``) with the images under ``src``
  (``flickr30k-images/``); the file's splits are kept (1,000 test images, 5 captions each).
* ``webdataset``: shards as users have them (img2dataset output: ``.jpg``/``.png``/``.webp``,
  captions from ``.txt`` or json ``caption``/``captions``), listed in place (``split: none``) or
  hash-split into new shards (``split: hash``); see :mod:`pipeline.data.wds_source`.
* ``demo``: the shipped emoji shards in ``src`` (default ``demo/emoji``), re-split.
* ``refcoco``, ``grounding_wds``: visual grounding annotations (RefCOCO-style refs + instances,
  or WebDataset shards with ``expressions`` and boxes); see :mod:`pipeline.grounding.data`.

Split rule (used unless a Karpathy split file names the split)::

    h = int(sha1(f"{salt}:{source_id}".encode("utf-8")).hexdigest(), 16) % 100
    split = "test" if h < test_percent else "val" if h < test_percent + val_percent else "train"

``source_id`` is the image path relative to ``src`` (folder, coco) or the shard key of the demo
or webdataset sample. The split depends only on the sample itself, so adding samples never moves existing ones.
Samples are written in ``source_id`` order; image bytes are copied as they are.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import check_settings, setting
from pipeline.data.shards import IMAGE_EXTS, iter_raw, load_manifest, write_manifest, write_shards
from pipeline.errors import ConfigError, PipelineError
from pipeline.progress import note, progress_task
from pipeline.scratch import replace_dir

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of ``distill prepare`` (section ``prepare`` of params.yaml)."""

    source: Literal["demo", "folder", "coco", "flickr30k", "webdataset", "refcoco",
                    "grounding_wds"] = "demo"  # kind of input, see module docstring
    src: str = "demo/emoji"  # demo: shard folder; folder/coco/flickr30k: folder holding the images;
                             # webdataset: shard folder, pattern, list file (.txt), URL or pipe:
    out: str = "data/emoji"  # output root; gets train/ val/ test/ dataset directories
    shard_size: int = setting(1000, minimum=1)  # max samples per output shard
    test_percent: int = setting(10, minimum=0, maximum=100)  # share of samples hashed into test
    val_percent: int = setting(10, minimum=0, maximum=100)   # share of samples hashed into val
    salt: str = "split-v1"  # mixed into the split hash; change it to draw a different split
    captions_file: str | None = None  # folder: CSV/JSONL path; None -> src/captions.{csv,jsonl}
    annotations_file: str | None = None  # coco: captions_*.json (COCO format); refcoco: instances.json
    split_file: str | None = None  # coco: Karpathy dataset_coco.json, None -> hash rule; flickr30k:
                                   # Karpathy dataset_flickr30k.json (required); refcoco: refs(*).p
    split: Literal["hash", "none"] = "hash"  # webdataset: hash = re-shard into train/val/test by the
                                   # split rule; none = no copy, the shards as they are form one split
    single_split: str = setting("train", pattern=r"train|val|test")  # webdataset, split none: its name
    shards: tuple[str, ...] = ()   # webdataset: shard paths or URLs (instead of src)
    label_key: str | None = None   # webdataset: json field holding the label (None: "label")

    def __post_init__(self) -> None:
        check_settings(self, "prepare")
        from pipeline.data.wds_source import check_settings as check_webdataset

        check_webdataset(self)
        if self.source == "flickr30k" and not self.split_file:
            raise ConfigError("prepare.split_file: source 'flickr30k' needs the Karpathy split file "
                              "dataset_flickr30k.json (from the Karpathy splits archive)")
        if self.test_percent + self.val_percent > 100:
            raise ConfigError("prepare.test_percent + prepare.val_percent must be <= 100, got "
                              f"{self.test_percent} + {self.val_percent}")


@dataclass(frozen=True)
class RawSample:
    """One source sample before sharding."""

    source_id: str  # stable id the split hash is computed from
    image_path: Path | None  # file to copy (folder/coco)
    image: tuple[str, bytes] | None  # (ext, bytes) already in memory (demo)
    captions: tuple[str, ...]
    meta: dict[str, Any]  # extra json fields kept in the output (label, ...)
    split: str | None = None  # fixed split (Karpathy), else the hash rule decides


def assign_split(source_id: str, cfg: PrepareConfig) -> str:
    """The hash split rule of the module docstring."""
    h = int(hashlib.sha1(f"{cfg.salt}:{source_id}".encode("utf-8")).hexdigest(), 16) % 100
    if h < cfg.test_percent:
        return "test"
    if h < cfg.test_percent + cfg.val_percent:
        return "val"
    return "train"


def prepare(cfg: PrepareConfig, progress: bool | None = None) -> dict[str, Any]:
    """Read the source, split it and write ``<out>/<split>/`` atomically; return a summary.

    progress: see :func:`pipeline.progress.progress_task` (None = a bar on a terminal, else lines).
    """
    if cfg.source == "webdataset":
        from pipeline.data.wds_source import prepare_webdataset

        return prepare_webdataset(cfg, progress) | {"config": dataclasses.asdict(cfg)}
    note(f"prepare: reading the {cfg.source} source {cfg.src}", progress)
    samples = sorted(_read_source(cfg), key=lambda s: s.source_id)
    _check_samples(samples)
    by_split: dict[str, list[RawSample]] = {s: [] for s in SPLITS}
    for sample in samples:
        by_split[sample.split or assign_split(sample.source_id, cfg)].append(sample)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with progress_task("prepare: write shards", len(samples), progress) as advance:
            summary = {split: _write_split(rows, tmp / split, split, cfg.shard_size, advance)
                       for split, rows in by_split.items()}
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": cfg.source, "out": str(out), "n_images": len(samples),
            "splits": summary, "config": dataclasses.asdict(cfg)}


def remove_dead_temporaries(out: Path) -> list[Path]:
    """Delete the ``.<out>.tmp-<pid>`` directories of earlier runs whose process is gone (a killed
    ``prepare`` cannot clean up after itself); a live process's directory is left alone."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_utf8(path: Path) -> str:
    """The text of ``path``, UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" writes
    one); a byte that is not UTF-8 is an error naming the file, line and byte offset."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise PipelineError(
            f"{path}:{line}: byte 0x{data[offset]:02x} at byte offset {offset} is not UTF-8 "
            "(save the file as UTF-8)") from None


def _check_samples(samples: list[RawSample]) -> None:
    """Every sample has a caption and a unique id (``samples`` sorted by id)."""
    for a, b in zip(samples, samples[1:]):
        if a.source_id == b.source_id:
            raise PipelineError(f"source sample {a.source_id!r} is listed twice; "
                                "merge its captions into one entry")
    for s in samples:
        if not s.captions:
            raise PipelineError(f"source sample {s.source_id!r} has no caption")


# ----------------------------------------------------------------------------- writing


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe_keys(samples: list[RawSample]) -> list[str]:
    """Unique keys without dots or slashes, derived from the source ids (stable across runs)."""
    keys, used = [], set()
    for s in samples:
        stem = s.source_id.rsplit(".", 1)[0] if s.image_path is not None else s.source_id
        key = _UNSAFE.sub("_", stem).strip("_")[:80] or "sample"
        if key in used:
            key = f"{key}_{hashlib.sha1(s.source_id.encode()).hexdigest()[:10]}"
        used.add(key)
        keys.append(key)
    return keys


def _to_wds(sample: RawSample, key: str) -> dict[str, Any]:
    ext, data = sample.image if sample.image is not None else _load_image(sample.image_path)
    meta = {**sample.meta, "captions": list(sample.captions), "source_id": sample.source_id}
    return {"__key__": key, ext: data, "json": meta}


def _load_image(path: Path | None) -> tuple[str, bytes]:
    assert path is not None
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise PipelineError(f"{path}: unsupported image type '.{ext}' (use one of {list(IMAGE_EXTS)})")
    return ext, path.read_bytes()


def _write_split(rows: list[RawSample], out_dir: Path, split: str, shard_size: int,
                 advance: Callable[..., None] = lambda n=1, info="": None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = _safe_keys(rows)

    def samples() -> Iterator[dict[str, Any]]:  # only one shard's images in memory at a time
        for row, key in zip(rows, keys):
            yield _to_wds(row, key)
            advance(1, split)

    paths = write_shards(samples(), out_dir, split, shard_size)
    manifest = write_manifest(out_dir)
    return {"n_images": manifest.n_images, "n_texts": manifest.n_texts, "n_shards": len(paths),
            "fingerprint": manifest.fingerprint}


# ----------------------------------------------------------------------------- sources


def _read_source(cfg: PrepareConfig) -> list[RawSample]:
    from pipeline.grounding.data import read_grounding_wds, read_refcoco

    readers = {"demo": _read_demo, "folder": _read_folder, "coco": _read_coco, "flickr30k": _read_coco,
               "refcoco": read_refcoco, "grounding_wds": read_grounding_wds}
    if cfg.source not in readers:
        raise ConfigError(f"prepare.source: unknown source {cfg.source!r}; known: {sorted(readers)}")
    return readers[cfg.source](cfg)


def _read_demo(cfg: PrepareConfig) -> list[RawSample]:
    """Shipped emoji shards (any dataset directory works): keys are the source ids."""
    manifest = load_manifest(cfg.src, verify=True)
    samples = []
    for info in manifest.shards:
        for key, files in iter_raw(manifest.location(info), info.name):
            meta = json.loads(files["json"])
            ext = next(e for e in IMAGE_EXTS if e in files)
            captions = tuple(c.strip() for c in meta.pop("captions", []) if c.strip())
            samples.append(RawSample(key, None, (ext, files[ext]), captions, meta))
    return samples


def _image_file(src: Path, rel: str, where: str) -> Path:
    """Existing image ``src/rel``, else a clear error naming the captions file and line."""
    path = src / rel
    if not path.is_file():
        raise PipelineError(f"{where}: image file {path} not found")
    return path


def _read_folder(cfg: PrepareConfig) -> list[RawSample]:
    src = Path(cfg.src)
    cap_file = Path(cfg.captions_file) if cfg.captions_file else _default_captions(src)
    rows = _read_jsonl(cap_file) if cap_file.suffix == ".jsonl" else _read_csv(cap_file)
    merged: dict[str, dict[str, Any]] = {}
    for where, rel, captions, label in rows:
        rel = Path(rel).as_posix()  # "./a.png" and "a.png" are one sample
        entry = merged.setdefault(rel, {"where": where, "captions": [], "label": label})
        entry["captions"].extend(captions)
        if label is not None:
            entry["label"] = label
    samples = []
    for rel, entry in merged.items():
        path = _image_file(src, rel, entry["where"])
        meta = {} if entry["label"] is None else {"label": entry["label"]}
        samples.append(RawSample(rel, path, None, tuple(entry["captions"]), meta))
    return samples


def _default_captions(src: Path) -> Path:
    for name in ("captions.csv", "captions.jsonl"):
        if (src / name).is_file():
            return src / name
    raise PipelineError(f"{src}: no captions.csv or captions.jsonl; set prepare.captions_file")


Row = tuple[str, str, list[str], str | None]  # (file:line, image path, captions, label)


def _clean(captions: list[Any]) -> list[str]:
    return [str(c).strip() for c in captions if str(c).strip()]


def _read_csv(path: Path) -> Iterator[Row]:
    """Rows of a ``file,caption`` or ``file,captions`` CSV (``|`` separates captions)."""
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if "file" not in cols or not cols & {"caption", "captions"}:
            raise PipelineError(f"{path}:1: header needs 'file' and 'caption' or 'captions', got {sorted(cols)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise PipelineError(f"{where}: wrong number of columns")
            text = row.get("caption") or row.get("captions") or ""
            captions = _clean([text] if "caption" in row else text.split("|"))
            if not row["file"].strip() or not captions:
                raise PipelineError(f"{where}: empty file name or caption")
            yield where, row["file"].strip(), captions, (row.get("label") or None)


def _read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a JSONL file: ``{"file", "captions" | "caption", "label"?}`` per line."""
    with io.StringIO(read_utf8(path)) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{where}: invalid JSON ({exc})") from None
            yield _jsonl_row(obj, where)


def _jsonl_row(obj: Any, where: str) -> Row:
    """Validate one parsed JSONL line."""
    if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
        raise PipelineError(f"{where}: need an object with a string 'file'")
    raw = obj.get("captions", [obj["caption"]] if "caption" in obj else [])
    captions = _clean(raw if isinstance(raw, list) else [raw])
    if not captions:
        raise PipelineError(f"{where}: need non-empty 'captions' (list) or 'caption' (string)")
    label = obj.get("label")
    return where, obj["file"], captions, None if label is None else str(label)


def _read_coco(cfg: PrepareConfig) -> list[RawSample]:
    """COCO captions JSON and/or a Karpathy split file."""
    if not cfg.annotations_file and not cfg.split_file:
        raise ConfigError("prepare: source 'coco' needs annotations_file and/or split_file")
    karpathy = _read_karpathy(Path(cfg.split_file)) if cfg.split_file else {}
    if cfg.annotations_file:
        captions = _read_coco_annotations(Path(cfg.annotations_file))
    else:
        captions = {name: (sub, caps) for name, (sub, _, caps) in karpathy.items()}
    src = Path(cfg.src)
    if not src.is_dir():
        raise PipelineError(f"prepare.src: image folder {src} not found")
    subdirs = sorted(d for d in src.iterdir() if d.is_dir())  # listed once, not per image
    samples = []
    for file_name, (subdir, caps) in sorted(captions.items()):
        split = karpathy[file_name][1] if file_name in karpathy else None
        if karpathy_sub := karpathy.get(file_name, (None,))[0]:
            subdir = karpathy_sub
        path = _coco_image(src, subdirs, file_name, subdir, cfg.annotations_file or cfg.split_file)
        samples.append(RawSample(file_name, path, None, tuple(caps), {}, split))
    return samples


def _read_coco_annotations(path: Path) -> dict[str, tuple[str | None, list[str]]]:
    """``file_name -> (None, captions)`` from a COCO captions file."""
    data = _load_json(path)
    try:
        names = {img["id"]: img["file_name"] for img in data["images"]}
        caps: dict[str, list[str]] = {name: [] for name in names.values()}
        for i, ann in enumerate(data["annotations"]):
            if ann["image_id"] not in names:
                raise PipelineError(f"{path}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
            caps[names[ann["image_id"]]].extend(_clean([ann["caption"]]))
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a COCO captions file (missing {exc})") from None
    empty = sorted(n for n, c in caps.items() if not c)
    if empty:
        raise PipelineError(f"{path}: image(s) without captions, e.g. {empty[:3]}")
    return {name: (None, c) for name, c in caps.items()}


def _read_karpathy(path: Path) -> dict[str, tuple[str | None, str, list[str]]]:
    """``filename -> (filepath, split, sentences)``; ``restval`` becomes train."""
    data = _load_json(path)
    out = {}
    try:
        for img in data["images"]:
            split = {"restval": "train"}.get(img["split"], img["split"])
            if split not in SPLITS:
                raise PipelineError(f"{path}: image {img['filename']} has unknown split {img['split']!r}")
            sentences = _clean([s["raw"] for s in img.get("sentences", [])])
            out[img["filename"]] = (img.get("filepath"), split, sentences)
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a Karpathy split file (missing {exc})") from None
    return out


def _coco_image(src: Path, subdirs: list[Path], file_name: str, subdir: str | None, where: Any) -> Path:
    """``src/<subdir>/<file_name>``, ``src/<file_name>`` or ``src/*/<file_name>``, first found."""
    candidates = [src / subdir / file_name] if subdir else []
    candidates += [src / file_name, *(d / file_name for d in subdirs)]
    for path in candidates:
        if path.is_file():
            return path
    raise PipelineError(f"{where}: image file {file_name} not found under {src}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from None
