"""WebDataset shards: reading and validation (manifests: :mod:`pipeline.data.manifest`; writing
shards and manifests: :mod:`pipeline.data.writing`).

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
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from pipeline.data.handlers import strict_handler
from pipeline.data.manifest import RERUN, RERUN_MANIFEST, Manifest, ShardInfo
from pipeline.data.sources import ForwardReader, open_seekable, open_stream, source_name
from pipeline.errors import SampleDecodeError, ShardError
from pipeline.fingerprint import sha256_file

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BLOCK = tarfile.BLOCKSIZE


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



# ----------------------------------------------------------------------------- tar parsing


def _split_name(shard: str, name: str) -> tuple[str, str]:
    """``"dir/key.ext"`` -> ``("dir/key", "ext")``; anything else is a ShardError."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    key = posixpath.join(dirname, stem) if dirname else stem
    if not stem or not ext:
        raise ShardError(f"shard {shard}: member {name!r} is not named '<key>.<ext>'; {RERUN}")
    if "." in ext:
        # webdataset would take "{stem}" as the key and "{ext}" as the extension: a silent mix-up.
        raise ShardError(
            f"shard {shard}, key {key!r}: member {name!r} has a dotted basename (the key would be "
            f"cut at the first dot); rename it so the key has no dots and {RERUN}")
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
                raise ShardError(f"shard {shard}, key {k!r}: duplicate key (appears twice in the tar); {RERUN}")
            seen.add(k)
            key, group = k, {}
        if ext in group:
            raise ShardError(f"shard {shard}, key {k!r}: duplicate key (two '.{ext}' files); {RERUN}")
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
        raise ShardError(f"shard {shard}: truncated or corrupt tar ({exc}); {RERUN}") from None
    # tarfile stops quietly when the file ends at a member boundary or in a partial header, so
    # require the end-of-archive zero block that every writer appends.
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    tail = fileobj.read(_BLOCK)
    if len(tail) != _BLOCK or tail.count(0) != _BLOCK:
        raise ShardError(f"shard {shard}: truncated tar (no end-of-archive marker at byte "
                         f"{tar.offset}); {RERUN}")


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo, shard: str) -> bytes:
    """Bytes of one member; a short read means the tar was truncated."""
    try:
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"shard {shard}: truncated or corrupt tar at {info.name!r} ({exc}); {RERUN}") from None
    if len(data) != info.size:
        raise ShardError(f"shard {shard}: truncated tar at {info.name!r}; {RERUN}")
    return data


def _image_ext(shard: str, key: str, group: dict[str, tarfile.TarInfo]) -> str:
    """The one image extension of a sample."""
    found = [e for e in IMAGE_EXTS if e in group]
    if not found:
        raise ShardError(f"shard {shard}, key {key!r}: sample has no image "
                         f"(expected one of {list(IMAGE_EXTS)}); {RERUN}")
    if len(found) > 1:
        raise ShardError(f"shard {shard}, key {key!r}: sample has several images {found}; {RERUN}")
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
            raise ShardError(f"shard {shard}, key {key!r}: unreadable {key}.json ({exc}); {RERUN}") from None
        if not isinstance(meta, dict):
            raise ShardError(f"shard {shard}, key {key!r}: {key}.json is not an object; {RERUN}")
    captions = _captions(files.get("txt"), meta, shard, key)
    if not captions:
        raise ShardError(f"shard {shard}, key {key!r}: sample has no caption (need json 'captions', "
                         f"a .txt file or json 'caption'); {RERUN}")
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
            raise ShardError(f"shard {shard}, key {key!r}: {key}.txt is not UTF-8 ({exc}); {RERUN}") from None
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
            raise ShardError(f"shard {shard}: file {location} is missing; {RERUN}") from None
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"shard {shard}: not a readable tar ({exc}); {RERUN}") from None
    stream = open_seekable(location, shard) if by_id else open_stream(location, shard)
    try:
        tar = _SourceTar.open(fileobj=stream, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        stream.close()
        raise ShardError(f"shard {shard}: not a readable tar ({exc}); {RERUN}") from None
    except BaseException:
        stream.close()
        raise
    tar.source = stream
    return tar


@contextmanager
def _naming(location: Path | str, shard: str) -> Iterator[None]:
    """A shard error of a source other than a local file names the source too (a URL or
    command): its name alone does not say which object was truncated or missing."""
    try:
        yield
    except ShardError as exc:
        if isinstance(location, Path) or str(location) in str(exc):
            raise
        raise ShardError(f"{exc} [source: {location}]") from None


def _finish_stream(tar: tarfile.TarFile, shard: str, expect: ShardInfo | None) -> tuple[int, str] | None:
    """After a whole pass over a streamed shard: its ``(size, sha256)``, checked against the
    manifest entry ``expect`` when given (None for local files, which are checked by ``stat``)."""
    if not isinstance(tar.fileobj, ForwardReader):
        return None
    size, digest = tar.fileobj.finish()
    if expect is not None and (size, digest) != (expect.bytes, expect.sha256):
        raise ShardError(f"shard {shard}: content changed since the manifest was written (read "
                         f"{size} bytes, sha256 {digest[:12]}...; manifest: {expect.bytes} bytes, "
                         f"sha256 {expect.sha256[:12]}...); {RERUN_MANIFEST}")
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
    with _naming(location, shard), _open_tar(location, shard) as tar:
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
    with _naming(path, shard), _open_tar(path, shard) as tar:
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
    with _naming(location, shard), _open_tar(location, shard) as tar:
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
                         f"manifest says {info.n_samples} / {info.n_texts}; {RERUN}")


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
                                 f"says {self._info[shard].n_samples}; {RERUN}")
            self._open[shard] = (tar, groups)
        return self._open[shard]

    def read(self, sample_id: str) -> Sample:
        """The sample ``shard/key``, image decoded (through the handler) and captions read."""
        shard, _, key = sample_id.partition("/")
        tar, groups = self._shard(shard)
        group = groups.get(key)
        if group is None:
            raise ShardError(f"shard {shard}: no sample with key {key!r}; {RERUN}")
        captions, label = _text_fields(tar, group, shard, key)
        return _make_sample(tar, group[_image_ext(shard, key, group)], shard, key, captions,
                            label, True, self.handler)

    def close(self) -> None:
        """Close every open tar."""
        for tar, _ in self._open.values():
            tar.close()
        self._open.clear()
