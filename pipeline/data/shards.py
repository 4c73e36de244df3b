"""WebDataset shards: reading, validation, manifests and atomic writing.

A *dataset directory* is a folder of ``*.tar`` shards plus ``manifest.json``. Inside a tar every
sample is a group of consecutive members named ``{key}.{ext}``:

* image: ``{key}.jpg|jpeg|png|webp``;
* captions: ``{key}.json`` field ``"captions"`` (list of str) if present, else field
  ``"expressions"`` (grounding samples, see :mod:`pipeline.grounding.data`), else ``{key}.txt``
  (one caption per non-empty line), else ``{key}.json`` field ``"caption"`` (the img2dataset layout);
* optional label: ``{key}.json`` field ``"label"``.

Other single-dot extensions (``.cls``, ``.parquet``...) are ignored.

Row numbering is fixed by the manifest: image row *i* is the *i*-th sample in shard order, then
tar order; text row *j* is the *j*-th caption in the same order. Anything that could shift rows is a
structural error and raises :class:`ShardError` naming the shard (and key): a truncated tar, a
duplicated key, a dotted basename (``a.b.jpg`` would be grouped under key ``a``), a sample with no
caption or no image. An image that fails to decode is *not* structural: it goes to the ``handler``
and the sample keeps its row.

Reading uses :mod:`tarfile` directly rather than ``webdataset``: webdataset splits keys at the first
dot, lets duplicated files escape handlers and can silently shorten a stream on a truncated tar,
while row alignment with the teacher caches needs every one of these cases to fail loudly.

Shards need not be files in the dataset directory: a ``shards.txt`` there (or the ``sources``
argument of :func:`write_manifest`) lists them as local paths, ``file://``, ``s3://``, ``gs://``,
``http(s)://`` URLs or ``pipe:`` commands (see :mod:`pipeline.data.sources`); the manifest records
each one's source. Every source is parsed by the same code, so the same structural errors name the
same shard and key. A shard's identity in the dataset fingerprint is its content (name, size,
sha256, counts), never where it is kept: a copy moved to object storage keeps its fingerprint.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image

from pipeline.data.sources import (SHARD_LIST_NAME, ForwardReader, expand_sources, is_pipe, local_path,
                                   open_seekable, open_stream, read_shard_list, remote_stat, source_name)
from pipeline.errors import SampleDecodeError, ShardError
from pipeline.fingerprint import fingerprint as _fingerprint
from pipeline.fingerprint import sha256_file
from pipeline.scratch import write_durable

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "vlm-distill.shard-manifest"
MANIFEST_SCHEMA_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BLOCK = tarfile.BLOCKSIZE
_RERUN = "re-run `distill prepare` to rebuild the dataset"
_RERUN_MANIFEST = ("re-run `distill prepare` to rebuild the dataset, or write its manifest again "
                   "(pipeline.data.shards.write_manifest) if the shards are meant to have changed")


# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Sample:
    """One image with its captions, as read from a shard."""

    shard: str  # shard file name, e.g. "train-000000.tar"
    key: str  # the sample's __key__ inside the shard
    image: Image.Image | None  # RGB; None if decode_images=False or undecodable
    captions: tuple[str, ...]
    label: str | None
    error: str | None = None  # why the image could not be decoded (lenient handler only)

    @property
    def sample_id(self) -> str:
        """Stable id stored in caches: ``"<shard>/<key>"``."""
        return f"{self.shard}/{self.key}"


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
                f"{data.get('schema_version')!r} (expected {MANIFEST_SCHEMA!r} v{MANIFEST_SCHEMA_VERSION}); {_RERUN}")
        try:
            shards = tuple(ShardInfo(**s) for s in data["shards"])
        except (KeyError, TypeError) as exc:
            raise ShardError(f"{where}: malformed shard list ({exc}); {_RERUN}") from None
        manifest = cls(Path(root), shards)
        if data.get("fingerprint") != manifest.fingerprint:
            raise ShardError(f"{where}: stored fingerprint {data.get('fingerprint')} does not match "
                             f"its shard list ({manifest.fingerprint}); the file was edited; {_RERUN}")
        return manifest


_OPTIONAL = ("source", "version")


def _prefix_sums(counts: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        out.append(total)
        total += n
    return out


# ----------------------------------------------------------------------------- error handlers

ErrorPolicy = Literal["strict", "skip"]


def strict_handler(exc: Exception) -> bool:
    """Handler that re-raises every error (the default: a bad image stops the run)."""
    raise exc


class SkipCounter:
    """Handler that records undecodable images and lets the run continue.

    Only :class:`SampleDecodeError` is skippable; anything else is re-raised because it would
    shift rows. ``skipped`` holds ``(shard, key, reason)`` tuples in reading order.
    """

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str, str]] = []

    def __call__(self, exc: Exception) -> bool:
        if not isinstance(exc, SampleDecodeError):
            raise exc
        self.skipped.append((exc.shard, exc.key, exc.reason))
        return True

    @property
    def count(self) -> int:
        """Number of samples whose image was skipped."""
        return len(self.skipped)


def make_handler(policy: ErrorPolicy) -> Callable[[Exception], bool]:
    """``"strict"`` -> :func:`strict_handler`; ``"skip"`` -> a fresh :class:`SkipCounter`."""
    if policy == "strict":
        return strict_handler
    if policy == "skip":
        return SkipCounter()
    raise ValueError(f"unknown error policy {policy!r}; known: ['skip', 'strict']")


# ----------------------------------------------------------------------------- tar parsing


def _split_name(shard: str, name: str) -> tuple[str, str]:
    """``"dir/key.ext"`` -> ``("dir/key", "ext")``; anything else is a ShardError."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    key = posixpath.join(dirname, stem) if dirname else stem
    if not stem or not ext:
        raise ShardError(f"shard {shard}: member {name!r} is not named '<key>.<ext>'; {_RERUN}")
    if "." in ext:
        # webdataset would take "{stem}" as the key and "{ext}" as the extension: a silent mix-up.
        raise ShardError(
            f"shard {shard}, key {key!r}: member {name!r} has a dotted basename (the key would be "
            f"cut at the first dot); rename it so the key has no dots and {_RERUN}")
    return key, ext.lower()


def _iter_groups(tar: tarfile.TarFile, shard: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Yield ``(key, {ext: member})`` for each sample; checks keys are unique and the tar is whole."""
    seen: set[str] = set()
    key: str | None = None
    group: dict[str, tarfile.TarInfo] = {}
    for info in _members(tar, shard):
        if not info.isfile():
            continue
        k, ext = _split_name(shard, info.name)
        if k != key:
            if key is not None:
                yield key, group
                _release(tar, info.offset)
            if k in seen:
                raise ShardError(f"shard {shard}, key {k!r}: duplicate key (appears twice in the tar); {_RERUN}")
            seen.add(k)
            key, group = k, {}
        if ext in group:
            raise ShardError(f"shard {shard}, key {k!r}: duplicate key (two '.{ext}' files); {_RERUN}")
        group[ext] = info
    if key is not None:
        yield key, group


def _release(tar: tarfile.TarFile, offset: int) -> None:
    """A streamed shard may forget the bytes before ``offset``: the previous sample is done."""
    if isinstance(tar.fileobj, ForwardReader):
        tar.fileobj.release(offset)


def _members(tar: tarfile.TarFile, shard: str) -> Iterator[tarfile.TarInfo]:
    """Iterate tar headers, turning every read failure and a missing end marker into ShardError."""
    try:
        while (info := tar.next()) is not None:
            yield info
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"shard {shard}: truncated or corrupt tar ({exc}); {_RERUN}") from None
    # tarfile stops quietly when the file ends at a member boundary or in a partial header, so
    # require the end-of-archive zero block that every writer appends.
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    tail = fileobj.read(_BLOCK)
    if len(tail) != _BLOCK or tail.count(0) != _BLOCK:
        raise ShardError(f"shard {shard}: truncated tar (no end-of-archive marker at byte "
                         f"{tar.offset}); {_RERUN}")


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo, shard: str) -> bytes:
    """Bytes of one member; a short read means the tar was truncated."""
    try:
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"shard {shard}: truncated or corrupt tar at {info.name!r} ({exc}); {_RERUN}") from None
    if len(data) != info.size:
        raise ShardError(f"shard {shard}: truncated tar at {info.name!r}; {_RERUN}")
    return data


def _image_ext(shard: str, key: str, group: dict[str, tarfile.TarInfo]) -> str:
    """The one image extension of a sample."""
    found = [e for e in IMAGE_EXTS if e in group]
    if not found:
        raise ShardError(f"shard {shard}, key {key!r}: sample has no image "
                         f"(expected one of {list(IMAGE_EXTS)}); {_RERUN}")
    if len(found) > 1:
        raise ShardError(f"shard {shard}, key {key!r}: sample has several images {found}; {_RERUN}")
    return found[0]


def _text_fields(tar: tarfile.TarFile, group: dict[str, tarfile.TarInfo], shard: str,
                 key: str) -> tuple[tuple[str, ...], str | None]:
    """Captions and label of one sample (see module docstring for the precedence)."""
    files = {ext: _read(tar, group[ext], shard) for ext in ("json", "txt") if ext in group}
    return parse_text_fields(files, shard, key)


def parse_text_fields(files: dict[str, bytes], shard: str, key: str) -> tuple[tuple[str, ...], str | None]:
    """Captions and label from a sample's ``json``/``txt`` bytes (the module docstring's rules);
    a sample without a caption is a :class:`ShardError` naming the shard and key."""
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"shard {shard}, key {key!r}: unreadable {key}.json ({exc}); {_RERUN}") from None
        if not isinstance(meta, dict):
            raise ShardError(f"shard {shard}, key {key!r}: {key}.json is not an object; {_RERUN}")
    captions = _captions(files.get("txt"), meta, shard, key)
    if not captions:
        raise ShardError(f"shard {shard}, key {key!r}: sample has no caption (need json 'captions', "
                         f"a .txt file or json 'caption'); {_RERUN}")
    label = meta.get("label")
    return captions, None if label is None else str(label)


def _captions(txt: bytes | None, meta: dict[str, Any], shard: str, key: str) -> tuple[str, ...]:
    if isinstance(meta.get("captions"), list):
        raw = [str(c) for c in meta["captions"]]
    elif isinstance(meta.get("expressions"), list):  # grounding samples: expressions are captions
        raw = [str(c) for c in meta["expressions"]]
    elif txt is not None:
        try:
            raw = txt.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ShardError(f"shard {shard}, key {key!r}: {key}.txt is not UTF-8 ({exc}); {_RERUN}") from None
    elif isinstance(meta.get("caption"), str):
        raw = [meta["caption"]]
    else:
        raw = []
    return tuple(c.strip() for c in raw if c.strip())


# ----------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited onto white (not black)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so corrupt data fails here, not later) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


# ----------------------------------------------------------------------------- reading


class _SourceTar(tarfile.TarFile):
    """A TarFile that closes the stream it was given (tarfile leaves a given file object open)."""

    source: BinaryIO | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.source is not None:
                self.source.close()


def _open_tar(location: Path | str, shard: str, by_id: bool = False) -> tarfile.TarFile:
    """Open a shard: a local file in place, any other source as a stream (``by_id``: seekable,
    for reads in any order)."""
    # "r:" = seekable, uncompressed: headers are read in order and data we skip is never read.
    if isinstance(location, Path):
        try:
            return tarfile.open(location, mode="r:")
        except FileNotFoundError:
            raise ShardError(f"shard {shard}: file {location} is missing; {_RERUN}") from None
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"shard {shard}: not a readable tar ({exc}); {_RERUN}") from None
    stream = open_seekable(location, shard) if by_id else open_stream(location, shard)
    try:
        tar = _SourceTar.open(fileobj=stream, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        stream.close()
        raise ShardError(f"shard {shard}: not a readable tar ({exc}); {_RERUN}") from None
    except BaseException:
        stream.close()
        raise
    tar.source = stream
    return tar


def _finish_stream(tar: tarfile.TarFile, shard: str, expect: ShardInfo | None) -> tuple[int, str] | None:
    """After a whole pass over a streamed shard: its ``(size, sha256)``, checked against the
    manifest entry ``expect`` when given (None for local files, which are checked by ``stat``)."""
    if not isinstance(tar.fileobj, ForwardReader):
        return None
    size, digest = tar.fileobj.finish()
    if expect is not None and (size, digest) != (expect.bytes, expect.sha256):
        raise ShardError(f"shard {shard}: content changed since the manifest was written (read "
                         f"{size} bytes, sha256 {digest[:12]}...; manifest: {expect.bytes} bytes, "
                         f"sha256 {expect.sha256[:12]}...); {_RERUN_MANIFEST}")
    return size, digest


def scan_shard(path: Path | str, shard: str | None = None) -> tuple[int, int]:
    """Validate a shard's structure (not its images); return ``(n_samples, n_texts)``.

    ``path``: a local path, or any source of :mod:`pipeline.data.sources`.
    """
    return _scan(path, shard or _name_of(path))[:2]


def _name_of(location: Path | str) -> str:
    return location.name if isinstance(location, Path) else source_name(location)


def _scan(location: Path | str, shard: str) -> tuple[int, int, int, str]:
    """``(n_samples, n_texts, size, sha256)`` of one shard, its structure validated."""
    n_samples = n_texts = 0
    with _open_tar(location, shard) as tar:
        for key, group in _iter_groups(tar, shard):
            _image_ext(shard, key, group)
            captions, _ = _text_fields(tar, group, shard, key)
            n_samples += 1
            n_texts += len(captions)
        streamed = _finish_stream(tar, shard, None)
    if streamed is None:
        assert isinstance(location, Path)
        streamed = location.stat().st_size, sha256_file(location)
    return n_samples, n_texts, *streamed


def iter_raw(path: Path | str, shard: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for every sample of one shard, validating structure.

    For re-packing shards without decoding (e.g. ``prepare`` from the demo shards). ``path``: a
    local path or any source (:meth:`Manifest.location` gives a manifest shard's).
    """
    shard = shard or _name_of(path)
    with _open_tar(path, shard) as tar:
        for key, group in _iter_groups(tar, shard):
            _image_ext(shard, key, group)
            _text_fields(tar, group, shard, key)
            yield key, {ext: _read(tar, info, shard) for ext, info in group.items()}


def iter_samples(manifest: Manifest, shards: Sequence[str] | None = None, decode_images: bool = True,
                 handler: Callable[[Exception], bool] = strict_handler,
                 start: int | None = None, stop: int | None = None) -> Iterator[Sample]:
    """Yield samples in manifest order.

    shards: only these shard names (manifest order is kept; unknown names raise ShardError).
    decode_images: False skips reading image bytes altogether (``image`` is None).
    handler: called with a :class:`SampleDecodeError` for an undecodable image; if it returns True
        the sample is still yielded with ``image=None`` and ``error`` set, so rows stay aligned;
        if it returns False the error is raised (stopping early would silently drop rows).
    start, stop: global image-row bounds ``[start, stop)`` in manifest numbering. Samples outside
        are not yielded and their images are never read; whole shards outside are not opened.
    """
    wanted = _select_shards(manifest, shards)
    lo = 0 if start is None else start
    hi = manifest.n_images if stop is None else stop
    for info, offset in zip(manifest.shards, manifest.image_offsets()):
        if info.name not in wanted or offset >= hi or offset + info.n_samples <= lo:
            continue
        yield from _iter_shard(manifest.location(info), info, offset, lo, hi, decode_images, handler)


def _select_shards(manifest: Manifest, shards: Sequence[str] | None) -> set[str]:
    names = {s.name for s in manifest.shards}
    if shards is None:
        return names
    unknown = sorted(set(shards) - names)
    if unknown:
        raise ShardError(f"{manifest.root}: shard(s) {unknown} are not in the manifest "
                         f"(known: {sorted(names)})")
    return set(shards)


def _iter_shard(location: Path | str, info: ShardInfo, offset: int, lo: int, hi: int,
                decode_images: bool, handler: Callable[[Exception], bool]) -> Iterator[Sample]:
    """Samples of one shard with global rows in ``[lo, hi)``; checks counts against the manifest
    (and, after a whole pass over a streamed shard, its size and sha256)."""
    shard = info.name
    row, n_texts = offset, 0
    with _open_tar(location, shard) as tar:
        for key, group in _iter_groups(tar, shard):
            if row >= hi:
                return  # later rows are not wanted; the count check below needs the whole shard
            ext = _image_ext(shard, key, group)
            captions, label = _text_fields(tar, group, shard, key)
            n_texts += len(captions)
            if row >= lo:
                yield _make_sample(tar, group[ext], shard, key, captions, label, decode_images, handler)
            row += 1
        _finish_stream(tar, shard, info)
    if row - offset != info.n_samples or n_texts != info.n_texts:
        raise ShardError(f"shard {shard}: holds {row - offset} samples / {n_texts} captions but the "
                         f"manifest says {info.n_samples} / {info.n_texts}; {_RERUN}")


def _make_sample(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, key: str,
                 captions: tuple[str, ...], label: str | None, decode_images: bool,
                 handler: Callable[[Exception], bool]) -> Sample:
    if not decode_images:
        return Sample(shard, key, None, captions, label)
    data = _read(tar, member, shard)
    try:
        image = decode_image(data)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        # no memory addresses in the reason: it is stored in caches, which must be reproducible
        reason = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")
        err = SampleDecodeError(shard, key, reason)
        if not handler(err):
            raise err from exc
        return Sample(shard, key, None, captions, label, error=reason)
    return Sample(shard, key, image, captions, label)


class RandomAccess:
    """Read samples by id (``shard/key``), seeking inside each tar instead of streaming it.

    A shard's headers are scanned (and its structure checked) on first use and the tar is kept
    open, so each later read costs one seek. For batch orders no stream can give (hard-negative
    batches); on local disks this is nearly as fast as streaming.
    """

    def __init__(self, manifest: Manifest, handler: Callable[[Exception], bool] = strict_handler) -> None:
        self.manifest, self.handler = manifest, handler
        self._info = {s.name: s for s in manifest.shards}
        self._open: dict[str, tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]]]] = {}

    def _shard(self, shard: str) -> tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]]]:
        if shard not in self._open:
            if shard not in self._info:
                raise ShardError(f"{self.manifest.root}: shard {shard} is not in the manifest")
            tar = _open_tar(self.manifest.location(self._info[shard]), shard, by_id=True)
            groups = dict(_iter_groups(tar, shard))
            if len(groups) != self._info[shard].n_samples:
                tar.close()
                raise ShardError(f"shard {shard}: holds {len(groups)} samples but the manifest "
                                 f"says {self._info[shard].n_samples}; {_RERUN}")
            self._open[shard] = (tar, groups)
        return self._open[shard]

    def read(self, sample_id: str) -> Sample:
        """The sample ``shard/key``, image decoded (through the handler) and captions read."""
        shard, _, key = sample_id.partition("/")
        tar, groups = self._shard(shard)
        group = groups.get(key)
        if group is None:
            raise ShardError(f"shard {shard}: no sample with key {key!r}; {_RERUN}")
        captions, label = _text_fields(tar, group, shard, key)
        return _make_sample(tar, group[_image_ext(shard, key, group)], shard, key, captions,
                            label, True, self.handler)

    def close(self) -> None:
        """Close every open tar."""
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()


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
        raise ShardError(f"{path}: unreadable manifest ({exc}); {_RERUN}") from None
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
                         + "; ".join(problems) + f"; {_RERUN_MANIFEST}")


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
