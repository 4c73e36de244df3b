"""What every source reader shares: the raw sample, the split rule, and reading UTF-8 and JSON files.

Split rule (used unless the source names a sample's split, as a Karpathy split file does)::

    h = int(sha1(f"{salt}:{source_id}".encode("utf-8")).hexdigest(), 16) % 100
    split = "test" if h < test_percent else "val" if h < test_percent + val_percent else "train"

``source_id`` is the image path relative to ``src`` (folder, coco) or the shard key of a demo or
webdataset sample. The split depends only on the sample itself, so adding samples never moves
existing ones.
"""
from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")


class SourceSettings(Protocol):
    """The settings source readers read (the ``prepare`` section of params.yaml)."""

    source: str
    src: str
    out: str
    shard_size: int
    test_percent: int
    val_percent: int
    salt: str
    captions_file: str | None
    annotations_file: str | None
    split_file: str | None
    split: str
    single_split: str
    shards: tuple[str, ...]
    label_key: str | None


@dataclass(frozen=True)
class RawSample:
    """One source sample before sharding."""

    source_id: str  # stable id the split hash is computed from
    image_path: Path | None  # file to copy (folder/coco)
    image: tuple[str, bytes] | None  # (ext, bytes) already in memory (demo)
    captions: tuple[str, ...]
    meta: dict[str, Any]  # extra json fields kept in the output (label, ...)
    split: str | None = None  # fixed split (Karpathy), else the hash rule decides


def assign_split(source_id: str, cfg: SourceSettings) -> str:
    """The hash split rule of the module docstring."""
    h = int(hashlib.sha1(f"{cfg.salt}:{source_id}".encode("utf-8")).hexdigest(), 16) % 100
    if h < cfg.test_percent:
        return "test"
    if h < cfg.test_percent + cfg.val_percent:
        return "val"
    return "train"


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


def load_json(path: Path) -> Any:
    """The JSON document in ``path`` (UTF-8); invalid JSON is an error naming the file."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from None


def coco_image(src: Path, subdirs: list[Path], file_name: str, subdir: str | None, where: Any) -> Path:
    """``src/<subdir>/<file_name>``, ``src/<file_name>`` or ``src/*/<file_name>``, first found."""
    candidates = [src / subdir / file_name] if subdir else []
    candidates += [src / file_name, *(d / file_name for d in subdirs)]
    for path in candidates:
        if path.is_file():
            return path
    raise PipelineError(f"{where}: image file {file_name} not found under {src}")
