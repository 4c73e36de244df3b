"""Readers of the raw sources ``distill prepare`` shards: shipped demo shards, a folder of images
with a captions file, and COCO/Flickr30k captions with an optional Karpathy split file.

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
* ``demo``: the shipped emoji shards in ``src`` (default ``demo/emoji``), re-split.

Every reader returns :class:`~pipeline.data.samples.RawSample` objects; the webdataset source is
:mod:`pipeline.data.wds_source`, the grounding sources :mod:`pipeline.grounding.data`.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.manifest import load_manifest
from pipeline.data.samples import (
    SPLITS,
    RawSample,
    SourceSettings,
    coco_image,
    load_json,
    read_utf8,
)
from pipeline.data.shards import IMAGE_EXTS, iter_raw
from pipeline.errors import ConfigError, PipelineError


def read_demo(cfg: SourceSettings) -> list[RawSample]:
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


def read_folder(cfg: SourceSettings) -> list[RawSample]:
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


def read_coco(cfg: SourceSettings) -> list[RawSample]:
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
        path = coco_image(src, subdirs, file_name, subdir, cfg.annotations_file or cfg.split_file)
        samples.append(RawSample(file_name, path, None, tuple(caps), {}, split))
    return samples


def _read_coco_annotations(path: Path) -> dict[str, tuple[str | None, list[str]]]:
    """``file_name -> (None, captions)`` from a COCO captions file."""
    data = load_json(path)
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
    data = load_json(path)
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
