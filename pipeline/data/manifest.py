"""The manifest of a dataset directory: its ordered shards, their sizes, hashes and row counts.

A *dataset directory* is a folder of ``*.tar`` shards (or a ``shards.txt`` listing them elsewhere,
:mod:`pipeline.data.sources`) plus ``manifest.json``. The manifest fixes row numbering: image row
*i* is the *i*-th sample in shard order, then tar order; text row *j* is the *j*-th caption in the
same order. A shard's identity in the dataset fingerprint is its content (name, size, sha256,
counts), never where it is kept: a copy moved to object storage keeps its fingerprint.

Here: the model (:class:`ShardInfo`, :class:`Manifest`) and :func:`load_manifest` with its checks
of the shard files. Building and writing a manifest (which reads every shard) is
:mod:`pipeline.data.writing`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.sources import is_pipe, local_path, remote_stat
from pipeline.errors import ShardError
from pipeline.fingerprint import fingerprint as _fingerprint
from pipeline.fingerprint import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "vlm-distill.shard-manifest"
MANIFEST_SCHEMA_VERSION = 1
RERUN = "re-run `distill prepare` to rebuild the dataset"
RERUN_MANIFEST = ("re-run `distill prepare` to rebuild the dataset, or write its manifest again "
                   "(pipeline.data.writing.write_manifest) if the shards are meant to have changed")



@dataclass(frozen=True)
class ShardInfo:
    """Size, hash and row counts of one shard, and where it is read from."""

    name: str
    bytes: int
    sha256: str
    n_samples: int
    n_texts: int
    source: str | None = None  # path, URL or pipe: command; None: the file <root>/<name>
    version: str | None = None  # "<field>=<value>" of an fsspec object's version tag (ETag...) when written


@dataclass(frozen=True)
class Manifest:
    """The ordered shards of a dataset directory; defines image and text row numbering."""

    root: Path
    shards: tuple[ShardInfo, ...]

    @property
    def n_images(self) -> int:
        """Total number of samples (image rows)."""
        return sum(s.n_samples for s in self.shards)

    @property
    def n_texts(self) -> int:
        """Total number of captions (text rows)."""
        return sum(s.n_texts for s in self.shards)

    def image_offsets(self) -> list[int]:
        """Global image row of the first sample of each shard."""
        return _prefix_sums([s.n_samples for s in self.shards])

    def text_offsets(self) -> list[int]:
        """Global text row of the first caption of each shard."""
        return _prefix_sums([s.n_texts for s in self.shards])

    def location(self, info: ShardInfo) -> Path | str:
        """Where shard ``info`` is read: a local :class:`Path`, else the URL or ``pipe:`` command."""
        if info.source is None:
            return self.root / info.name
        return local_path(info.source, self.root) or info.source

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the shard contents (name, size, sha256, counts); independent of
        ``root`` and of each shard's source, so copies kept elsewhere match."""
        rows = [[s.name, s.bytes, s.sha256, s.n_samples, s.n_texts] for s in self.shards]
        return _fingerprint({"schema": MANIFEST_SCHEMA, "version": MANIFEST_SCHEMA_VERSION,
                             "shards": rows})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``root`` is left out: a dataset directory may move)."""
        return {
            "schema": MANIFEST_SCHEMA,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "n_images": self.n_images,
            "n_texts": self.n_texts,
            "fingerprint": self.fingerprint,
            # source/version only when set: manifests of plain shard folders stay as they were
            "shards": [{k: v for k, v in vars(s).items() if v is not None or k not in _OPTIONAL}
                       for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path | str) -> Manifest:
        """Inverse of :meth:`to_dict`; checks schema and the stored fingerprint."""
        where = Path(root) / MANIFEST_NAME
        if data.get("schema") != MANIFEST_SCHEMA or data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ShardError(
                f"{where}: unknown manifest schema {data.get('schema')!r} version "
                f"{data.get('schema_version')!r} (expected {MANIFEST_SCHEMA!r} v{MANIFEST_SCHEMA_VERSION}); {RERUN}")
        try:
            shards = tuple(ShardInfo(**s) for s in data["shards"])
        except (KeyError, TypeError) as exc:
            raise ShardError(f"{where}: malformed shard list ({exc}); {RERUN}") from None
        manifest = cls(Path(root), shards)
        if data.get("fingerprint") != manifest.fingerprint:
            raise ShardError(f"{where}: stored fingerprint {data.get('fingerprint')} does not match "
                             f"its shard list ({manifest.fingerprint}); the file was edited; {RERUN}")
        return manifest


_OPTIONAL = ("source", "version")


def _prefix_sums(counts: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out


def load_manifest(root: Path | str, verify: bool = False) -> Manifest:
    """Read ``root/manifest.json``.

    Always checks that every local shard exists with the recorded size (a cheap ``stat``); with
    ``verify=True`` also re-hashes each local shard, and asks the store of each fsspec shard for
    its size and version tag (one metadata request each, compared with those recorded), naming
    the shards that changed. Remote and ``pipe:`` shards are not re-hashed here: every whole read
    of one compares its size and sha256 with the manifest instead (a ``pipe:`` source has no
    size until it is read, so it is only checked then).
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest not found; run `distill prepare` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc}); {RERUN}") from None
    manifest = Manifest.from_dict(data, root)
    _check_shard_files(manifest, verify)
    return manifest


def _check_shard_files(manifest: Manifest, rehash: bool) -> None:
    problems = []
    for info in manifest.shards:
        path = manifest.location(info)
        if not isinstance(path, Path):
            if rehash and not is_pipe(path):
                problems.extend(_remote_changes(info, path))
        elif not path.is_file():
            problems.append(f"{info.name}: missing")
        elif (size := path.stat().st_size) != info.bytes:
            problems.append(f"{info.name}: size {size} != {info.bytes} in manifest")
        elif rehash and (digest := sha256_file(path)) != info.sha256:
            problems.append(f"{info.name}: sha256 {digest[:12]}... != {info.sha256[:12]}... in manifest")
    if problems:
        raise ShardError(f"{manifest.root}: shard(s) changed since the manifest was written: "
                         + "; ".join(problems) + f"; {RERUN_MANIFEST}")


def _remote_changes(info: ShardInfo, spec: str) -> list[str]:
    """Differences between an fsspec shard's current size/version and the manifest's."""
    try:
        size, version = remote_stat(spec, info.name)
    except ShardError as exc:
        return [str(exc)]
    if size is not None and size != info.bytes:
        return [f"{info.name}: size {size} != {info.bytes} in manifest ({spec})"]
    if info.version is not None and version is not None and version != info.version:
        return [f"{info.name}: version {version} != {info.version} in manifest ({spec})"]
    return []
