"""``prepare source: webdataset``: WebDataset shards as users have them (img2dataset output).

Each sample is read by the same rules as everywhere else (:mod:`pipeline.data.shards`): the image
from ``.jpg``/``.jpeg``/``.png``/``.webp``, the captions from ``.json`` ``captions``, else ``.txt``
(one per line), else ``.json`` ``caption``; files beside the shards (img2dataset's ``.parquet``,
``_stats.json``) are not shards and are left alone. A sample without image or caption is an error
naming its shard and key, as everywhere.

``src`` names the shards: a folder (its ``*.tar``), a path or URL pattern with ``*`` or a brace
range (``s3://bucket/cc3m-{00000..00331}.tar``), a list file (``*.txt``, one source per line), a
single URL or ``pipe:`` command; or ``shards`` lists them. Two modes (``prepare.split``):

* ``none`` (for training sets too large to copy): nothing is copied. ``<out>/<single_split>/``
  gets a ``manifest.json`` that lists the original shards (local paths made absolute, URLs and
  ``pipe:`` commands as given) with their sizes and sha256 (for remote shards also the store's
  version tag), which is what the dataset fingerprint is made of.
* ``hash``: every sample goes to train/val/test by the split rule of :mod:`pipeline.data.samples`
  on its key (``source_id`` = the sample key), and each split is written as new shards with the
  same atomic writes as every other source. Samples keep their source order within a split;
  the shards are read once to assign splits and once per split to copy, so no more than one
  output shard of images is held in memory.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.data.samples import SPLITS, SourceSettings, assign_split
from pipeline.data.shards import IMAGE_EXTS, iter_raw, parse_text_fields
from pipeline.data.sources import expand_sources, local_path, read_shard_list, source_name
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import ConfigError, PipelineError, ShardError
from pipeline.progress import note, progress_task
from pipeline.scratch import replace_dir


def shard_sources(cfg: SourceSettings) -> list[str]:
    """The shards ``src`` (or ``shards``) names, each a single source (local paths absolute)."""
    if cfg.shards:
        specs = expand_sources(cfg.shards, Path.cwd())
    else:
        src = Path(cfg.src)
        if src.is_dir():
            specs = [str(p) for p in sorted(src.glob("*.tar"))]
            if not specs:
                raise PipelineError(f"prepare.src: no *.tar shards in the folder {src}")
        elif src.suffix == ".txt" and src.is_file():
            specs = expand_sources(read_shard_list(src), src.parent)
        else:
            specs = expand_sources([cfg.src], Path.cwd())
    out = []
    for spec in specs:
        path = local_path(spec, Path.cwd())
        if path is not None and not path.is_file():
            raise PipelineError(f"prepare: shard {path} not found (from prepare.src {cfg.src!r})")
        out.append(str(path.resolve()) if path is not None else spec)
    if not out:
        raise PipelineError(f"prepare: prepare.src {cfg.src!r} names no shard")
    names: dict[str, str] = {}
    for spec in out:
        if (name := source_name(spec)) in names:
            raise ShardError(f"prepare: shards {names[name]!r} and {spec!r} have the same name {name!r} "
                             "(sample ids are '<shard name>/<key>'); rename one")
        names[name] = spec
    return out


def prepare_webdataset(cfg: SourceSettings, progress: bool | None = None) -> dict[str, Any]:
    """Bring shards in as they are (``split: none``) or hash-split them into new shards."""
    sources = shard_sources(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    note(f"prepare: {len(sources)} shard(s) from {cfg.src if not cfg.shards else 'prepare.shards'}, "
         f"split {cfg.split}", progress)
    try:
        if cfg.split == "none":
            summary = {cfg.single_split: _list_in_place(sources, tmp / cfg.single_split)}
        else:
            summary = _hash_split(cfg, sources, tmp, progress)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": "webdataset", "out": str(out), "split": cfg.split, "shards_read": len(sources),
            "n_images": sum(s["n_images"] for s in summary.values()), "splits": summary}


def _list_in_place(sources: list[str], split_dir: Path) -> dict[str, Any]:
    """A manifest of the original shards: nothing is copied."""
    split_dir.mkdir(parents=True)
    manifest = write_manifest(split_dir, sources)
    return {"n_images": manifest.n_images, "n_texts": manifest.n_texts, "n_shards": len(sources),
            "fingerprint": manifest.fingerprint, "copied": False}


def _label(files: dict[str, bytes], label_key: str | None) -> Any:
    """The sample's label under ``label_key`` of its json (None when absent)."""
    if label_key is None or "json" not in files:
        return None
    return json.loads(files["json"]).get(label_key)


def _hash_split(cfg: SourceSettings, sources: list[str], tmp: Path,
                progress: bool | None) -> dict[str, Any]:
    """Assign every sample a split by its key, then write each split's samples as new shards."""
    split_of: dict[str, str] = {}
    where: dict[str, str] = {}
    for spec in sources:  # pass 1: validate and assign (no image kept)
        shard = source_name(spec)
        for key, _ in iter_raw(spec, shard):
            if key in split_of:
                raise PipelineError(f"prepare: sample key {key!r} is in shard {where[key]} and in "
                                    f"shard {shard}; keys must be unique across the shards")
            split_of[key], where[key] = assign_split(key, cfg), shard
    summary = {}
    with progress_task("prepare: write shards", len(split_of), progress) as advance:
        for split in SPLITS:
            rows = _samples_of(split, sources, split_of, cfg.label_key, advance)
            summary[split] = _write(rows, tmp / split, split, cfg.shard_size)
    return summary


def _samples_of(split: str, sources: list[str], split_of: dict[str, str], label_key: str | None,
                advance: Callable[..., None]) -> Iterator[dict[str, Any]]:
    """The samples of one split, in source order, as new shard samples (image, captions json)."""
    for spec in sources:
        shard = source_name(spec)
        for key, files in iter_raw(spec, shard):
            if split_of[key] != split:
                continue
            captions, label = parse_text_fields(files, shard, key)
            meta: dict[str, Any] = {"captions": list(captions), "source_id": key, "source_shard": shard}
            label = _label(files, label_key) if label_key is not None else label
            if label is not None:
                meta["label"] = str(label)
            ext = next(e for e in IMAGE_EXTS if e in files)
            advance(1, split)
            yield {"__key__": key, ext: files[ext], "json": meta}


def _write(rows: Iterator[dict[str, Any]], out_dir: Path, split: str, shard_size: int) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_shards(rows, out_dir, split, shard_size)
    manifest = write_manifest(out_dir)
    return {"n_images": manifest.n_images, "n_texts": manifest.n_texts, "n_shards": len(paths),
            "fingerprint": manifest.fingerprint, "copied": True}


def check_settings(cfg: SourceSettings) -> None:
    """Settings that only make sense with (or without) this source."""
    if cfg.source != "webdataset":
        if cfg.split != "hash" or cfg.shards:
            raise ConfigError(f"prepare.split and prepare.shards apply to source 'webdataset' only "
                              f"(source is {cfg.source!r})")
        return
    if cfg.split == "none" and cfg.label_key not in (None, "label"):
        raise ConfigError(f"prepare.label_key: {cfg.label_key!r} needs split: hash (the shards are "
                          "copied with the label moved to json 'label'); with split: none the shards "
                          "are read as they are, labels from json 'label'")
