"""Writing datasets: WebDataset shards written atomically, and manifests built by reading every
shard once (sizes, sha256s, row counts, structure validated)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.data.shards import IMAGE_EXTS, _scan
from pipeline.data.sources import (
    SHARD_LIST_NAME,
    expand_sources,
    is_pipe,
    local_path,
    read_shard_list,
    remote_stat,
    source_name,
)
from pipeline.errors import ShardError
from pipeline.scratch import write_durable

# ----------------------------------------------------------------------------- manifests


def build_manifest(root: Path | str, sources: Sequence[str] | None = None) -> Manifest:
    """Scan and validate a dataset's shards; writes nothing.

    The shards, in order: ``sources`` when given, else the lines of ``root/shards.txt`` when it
    exists, else every ``*.tar`` in ``root`` (sorted by name). A source is a local path (relative
    to ``root``), a ``file://``/``s3://``/``gs://``/``http(s)://`` URL or a ``pipe:`` command;
    brace ranges ``{000000..000099}`` and ``*`` patterns expand. Each shard is read once, front to
    back: its size and sha256 are those of the bytes read.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: dataset directory not found; run `distill prepare` first")
    if sources is None and (root / SHARD_LIST_NAME).is_file():
        sources = read_shard_list(root / SHARD_LIST_NAME)
    if sources is None:
        paths = sorted(root.glob("*.tar"))
        return Manifest(root, tuple(_shard_info(path.name, None, root) for path in paths))
    specs = expand_sources(sources, root)
    names: dict[str, str] = {}
    for spec in specs:
        name = source_name(spec)
        if name in names:
            raise ShardError(f"{root}: sources {names[name]!r} and {spec!r} both give shard name "
                             f"{name!r} (sample ids are '<shard name>/<key>'); rename one")
        names[name] = spec
    return Manifest(root, tuple(_shard_info(name, spec, root) for name, spec in names.items()))


def _shard_info(name: str, spec: str | None, root: Path) -> ShardInfo:
    """Scan one shard; ``spec`` None (or a path that is ``root/name``) is the file ``root/name``."""
    path = root / name if spec is None else local_path(spec, root)
    if path is not None and path == root / name:
        spec = None
    n_samples, n_texts, size, digest = _scan(path or spec, name)  # type: ignore[arg-type]
    version = None
    if path is None and not is_pipe(spec):  # type: ignore[arg-type]
        stat_size, version = remote_stat(spec, name)  # type: ignore[arg-type]
        if stat_size is not None and stat_size != size:
            raise ShardError(f"shard {name}: {spec} changed while it was read ({size} bytes read, "
                             f"{stat_size} now); write the manifest again")
    return ShardInfo(name, size, digest, n_samples, n_texts, spec, version)


def write_manifest(root: Path | str, sources: Sequence[str] | None = None) -> Manifest:
    """Build the manifest of ``root`` (see :func:`build_manifest`) and write
    ``root/manifest.json`` atomically."""
    manifest = build_manifest(root, sources)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_durable(Path(root) / MANIFEST_NAME, text)
    return manifest


# ----------------------------------------------------------------------------- writing


def _member_payloads(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``[(ext, bytes)]`` of one sample dict, image first; validates the key and fields."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be a non-empty string without '.' or '/'")
    images = [e for e in IMAGE_EXTS if e in sample]
    if len(images) != 1:
        raise ValueError(f"sample {key!r}: needs exactly one image field of {list(IMAGE_EXTS)}")
    out = [(images[0], bytes(sample[images[0]]))]
    for ext in sorted(set(sample) - {"__key__", *images}):
        value = sample[ext]
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
        elif isinstance(value, str):
            value = value.encode()
        out.append((ext, bytes(value)))
    return out


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples always give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[dict[str, Any]], out_dir: Path | str, prefix: str,
                 max_samples_per_shard: int) -> list[Path]:
    """Write samples to ``out_dir/{prefix}-{i:06d}.tar``, at most ``max_samples_per_shard`` each.

    A sample is ``{"__key__": str, "png"|"jpg"|"jpeg"|"webp": bytes, "json": dict|bytes,
    "txt": str|bytes, ...}``. Each shard is written under a temporary name and renamed into place,
    so a reader never sees a half-written shard. Keys must be unique; existing files are replaced
    but stale higher-numbered shards are not removed (write into a fresh directory).
    """
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    batch: list[list[tuple[str, bytes]]] = []
    keys: set[str] = set()
    for sample in samples:
        members = _member_payloads(sample)
        if sample["__key__"] in keys:
            raise ValueError(f"duplicate sample key {sample['__key__']!r}")
        keys.add(sample["__key__"])
        batch.append([(f"{sample['__key__']}.{ext}", data) for ext, data in members])
        if len(batch) == max_samples_per_shard:
            paths.append(_write_one_shard(out_dir / f"{prefix}-{len(paths):06d}.tar", batch))
            batch = []
    if batch:
        paths.append(_write_one_shard(out_dir / f"{prefix}-{len(paths):06d}.tar", batch))
    return paths


def _write_one_shard(path: Path, batch: list[list[tuple[str, bytes]]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for members in batch:
                for name, data in members:
                    _add_member(tar, name, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
