"""The ``prepare`` stage: turn a raw image-caption source into split WebDataset dataset directories.

Output: ``<out>/<split>/<split>-NNNNNN.tar`` plus ``<out>/<split>/manifest.json`` for each split
in train/val/test. Everything is written into a temporary sibling directory and renamed into
place at the end, so an old ``<out>`` is only replaced once the new one is complete.

Sources (``PrepareConfig.source``): ``folder``, ``coco``, ``flickr30k`` and ``demo``
(:mod:`pipeline.data.readers`), ``webdataset`` (shards as users have them, listed in place or
hash-split: :mod:`pipeline.data.wds_source`), ``refcoco`` and ``grounding_wds`` (visual grounding
annotations: :mod:`pipeline.grounding.data`). Samples are split by the rule of
:mod:`pipeline.data.samples` unless the source names their split, written in ``source_id``
order, image bytes copied as they are.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import check_settings, setting
from pipeline.data.readers import read_coco, read_demo, read_folder
from pipeline.data.samples import SPLITS, RawSample, assign_split
from pipeline.data.shards import IMAGE_EXTS
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import ConfigError, PipelineError
from pipeline.grounding.data import read_grounding_wds, read_refcoco
from pipeline.progress import note, progress_task
from pipeline.scratch import replace_dir


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
    readers = {"demo": read_demo, "folder": read_folder, "coco": read_coco, "flickr30k": read_coco,
               "refcoco": read_refcoco, "grounding_wds": read_grounding_wds}
    if cfg.source not in readers:
        raise ConfigError(f"prepare.source: unknown source {cfg.source!r}; known: {sorted(readers)}")
    return readers[cfg.source](cfg)


