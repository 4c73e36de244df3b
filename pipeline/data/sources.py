"""Where shard bytes come from: local paths, ``file://``, fsspec URLs and ``pipe:`` commands.

A *shard source* is a string as a user writes it in a shard list:

* a local path (relative paths are relative to the dataset directory) or a ``file://`` URL;
* an fsspec URL: ``s3://bucket/train-000000.tar``, ``gs://...``, ``https://...`` (the backend
  package, e.g. ``s3fs`` or ``gcsfs``, must be installed; credentials come from the usual
  environment of that backend);
* a webdataset-style command whose standard output is the tar: ``pipe:aws s3 cp s3://b/x.tar -``,
  ``pipe:curl -sf https://host/x.tar``. A command that exits non-zero is an error naming the command
  and the end of its standard error.

Local files are read in place and seek past data that is not needed. Every other source is read
front to back through :class:`ForwardReader`, which keeps only the bytes of the sample being
parsed (so :mod:`tarfile`'s seekable mode, and with it every structural check, works unchanged),
and counts and hashes the bytes as they pass so a whole read can be compared with the manifest.
Reading samples by id (:class:`~pipeline.data.shards.RandomAccess`) needs a seekable source: a
local file or an fsspec file that seeks (object stores; http(s) servers that accept range
requests); a ``pipe:`` source is refused there with an error that says so.
"""
from __future__ import annotations

import glob
import hashlib
import io
import posixpath
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from pipeline.errors import ShardError

PIPE_PREFIX = "pipe:"
SHARD_LIST_NAME = "shards.txt"
# fields of fsspec's ``info()`` that change whenever an object's content does, in order of
# preference (s3fs: VersionId/ETag; gcsfs: generation/etag/md5Hash; http: ETag/Content-MD5/Digest)
VERSION_FIELDS = ("VersionId", "generation", "ETag", "etag", "md5Hash", "Content-MD5", "Digest")
_CHUNK = 1 << 20
_STDERR_TAIL = 2000
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ----------------------------------------------------------------------------- kinds of source


def is_pipe(spec: str) -> bool:
    """True for a ``pipe:`` command source."""
    return spec.startswith(PIPE_PREFIX)


def is_url(spec: str) -> bool:
    """True for ``scheme://...`` sources other than ``file://`` (read through fsspec)."""
    scheme = urlparse(spec).scheme
    return "://" in spec and len(scheme) > 1 and scheme != "file"


def local_path(spec: str | Path, root: Path) -> Path | None:
    """The file a local source names (``file://`` URLs included), or None for other sources."""
    if isinstance(spec, Path):
        return spec if spec.is_absolute() else root / spec
    if is_pipe(spec) or is_url(spec):
        return None
    if spec.startswith("file://"):
        url = urlparse(spec)
        if url.netloc not in ("", "localhost"):
            raise ShardError(f"shard source {spec!r}: file:// URLs must name a local file "
                             f"(file:///absolute/path.tar)")
        return Path(unquote(url.path))
    path = Path(spec)
    return path if path.is_absolute() else root / path


def source_name(spec: str) -> str:
    """The shard name a source is known by (its file name): it prefixes every sample id.

    For ``pipe:`` commands, the file name of the last argument that ends in ``.tar``.
    """
    if is_pipe(spec):
        tars = [a for a in shlex.split(spec[len(PIPE_PREFIX):]) if a.endswith(".tar")]
        if not tars:
            raise ShardError(f"shard source {spec!r}: cannot name the shard (no argument ends in "
                             f"'.tar'); make the command name the tar file, e.g. 'pipe:cat x.tar'")
        return posixpath.basename(tars[-1])
    path = urlparse(spec).path if (is_url(spec) or spec.startswith("file://")) else spec
    name = posixpath.basename(unquote(path).replace("\\", "/"))
    if not name:
        raise ShardError(f"shard source {spec!r}: names a directory, not a tar file")
    return name


# ----------------------------------------------------------------------------- shard lists


def read_shard_list(path: Path) -> list[str]:
    """Sources listed in a ``shards.txt``: one per line; blank lines and comments skipped (a
    comment starts with ``#`` at the start of a line or after a space, so URLs keep theirs)."""
    lines = path.read_text().splitlines()
    specs = [re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip() for line in lines]
    return [spec for spec in specs if spec]


def expand_sources(specs: Iterable[str], root: Path) -> list[str]:
    """Expand webdataset brace ranges (``train-{000000..000009}.tar``) and ``*``/``?`` patterns
    (local paths and fsspec URLs; matches sorted by name) into single-shard sources."""
    out: list[str] = []
    for spec in specs:
        for one in _expand_braces(spec):
            out.extend(_expand_glob(one, root) if not is_pipe(one) and any(c in one for c in "*?") else [one])
    return out


def _expand_braces(spec: str) -> list[str]:
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise ShardError(f"shard source {spec!r}: empty brace range {match.group(0)}")
    width = len(lo)  # webdataset's rule: the lower bound's digits give the zero padding
    head, tail = spec[:match.start()], spec[match.end():]
    return [x for i in range(int(lo), int(hi) + 1) for x in _expand_braces(f"{head}{i:0{width}d}{tail}")]


def _expand_glob(spec: str, root: Path) -> list[str]:
    if is_url(spec):
        fs, pattern = _filesystem(spec)
        found = sorted(fs.glob(pattern))
        matches = [fs.unstrip_protocol(p) for p in found]
    else:
        path = local_path(spec, root)
        assert path is not None
        matches = sorted(glob.glob(str(path)))
        if not spec.startswith("file://") and not Path(spec).is_absolute():
            matches = [str(Path(m).relative_to(root)) for m in matches]
    if not matches:
        raise ShardError(f"shard source {spec!r}: the pattern matches no file")
    return matches


# ----------------------------------------------------------------------------- fsspec


def _filesystem(spec: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL, with a clear error when its backend is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(spec)
    except ImportError as exc:
        raise ShardError(f"shard source {spec!r}: the fsspec backend for "
                         f"{urlparse(spec).scheme}:// is not installed ({exc})") from None
    except ValueError as exc:
        raise ShardError(f"shard source {spec!r}: unknown URL protocol ({exc})") from None


def remote_stat(spec: str, shard: str) -> tuple[int | None, str | None]:
    """``(size, version)`` of an fsspec source from one metadata request; version is
    ``"<field>=<value>"`` of the first of :data:`VERSION_FIELDS` the backend reports, or None."""
    fs, path = _filesystem(spec)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: {spec} not found") from None
    except OSError as exc:
        raise ShardError(f"shard {shard}: cannot stat {spec} ({exc})") from None
    version = next((f"{f}={info[f]}" for f in VERSION_FIELDS if info.get(f) not in (None, "")), None)
    size = info.get("size")
    return (None if size is None else int(size)), version


def open_seekable(spec: str, shard: str) -> BinaryIO:
    """A seekable binary file for an fsspec source; a ShardError for one that cannot seek."""
    if is_pipe(spec):
        raise ShardError(
            f"shard {shard}: source {spec!r} is a command, which can only be read front to back; "
            f"reading samples by id (hard-negative batches, train.hard_negative_fraction > 0) needs a "
            f"seekable shard: list it as a local path or an s3://, gs:// or http(s):// URL, or copy it "
            f"to local disk")
    fs, path = _filesystem(spec)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: {spec} not found") from None
    except OSError as exc:
        raise ShardError(f"shard {shard}: cannot open {spec} ({exc})") from None
    if not f.seekable():
        f.close()
        raise ShardError(
            f"shard {shard}: {spec} cannot seek (the server gives no size or refuses range "
            f"requests); reading samples by id (hard-negative batches) needs a seekable shard: "
            f"copy it to local disk or serve it from storage that supports range requests")
    return f


def open_stream(spec: str, shard: str) -> ForwardReader:
    """A :class:`ForwardReader` over a ``pipe:`` command's output or an fsspec file."""
    if is_pipe(spec):
        return ForwardReader(_CommandOutput(spec, shard), shard)
    fs, path = _filesystem(spec)
    try:
        return ForwardReader(fs.open(path, "rb"), shard)
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: {spec} not found") from None
    except OSError as exc:
        raise ShardError(f"shard {shard}: cannot open {spec} ({exc})") from None


# ----------------------------------------------------------------------------- streams


class _CommandOutput:
    """Standard output of a shell command; at its end, a non-zero exit is a ShardError."""

    def __init__(self, spec: str, shard: str) -> None:
        self.command, self.shard = spec[len(PIPE_PREFIX):], shard
        self._stderr = tempfile.TemporaryFile()  # a file, so a chatty command never blocks on it
        self._proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._stderr)

    def read(self, n: int) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(n)
        if not data:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        status = self._proc.wait()
        if status != 0:
            self._stderr.seek(0)
            err = self._stderr.read().decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise ShardError(f"shard {self.shard}: command `{self.command}` exited with status "
                             f"{status}: {err or '(no error output)'}; fix the command or the "
                             f"object it reads")

    def close(self) -> None:
        if self._proc.poll() is None:  # stopped early: the rest of the output is not wanted
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


class ForwardReader(io.RawIOBase):
    """A front-to-back byte stream that can seek backwards over the bytes it still holds.

    :mod:`tarfile`'s seekable mode reads a sample's headers before its data; the reader keeps
    every byte from the last :meth:`release` point on, so those backward seeks work, and drops
    them once the caller is done with a sample. Bytes are counted and hashed as they arrive.
    """

    def __init__(self, raw: Any, shard: str) -> None:
        super().__init__()
        self._raw, self.shard = raw, shard
        self._buf = bytearray()  # bytes [self._base, self._base + len(self._buf))
        self._base = self._pos = 0
        self._eof = False
        self._sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence != io.SEEK_SET:
            raise OSError(f"shard {self.shard}: a streamed shard cannot seek from its end")
        if pos < self._base:
            raise OSError(f"shard {self.shard}: cannot seek back to byte {pos} of a streamed "
                          f"shard (bytes before {self._base} were released)")
        self._pos = pos
        return pos

    def read(self, n: int = -1) -> bytes:
        end = None if n is None or n < 0 else self._pos + n
        self._fill(end)
        lo = self._pos - self._base
        hi = len(self._buf) if end is None else min(end - self._base, len(self._buf))
        data = bytes(self._buf[lo:hi]) if hi > lo else b""
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _fill(self, end: int | None) -> None:
        """Read from the source until byte ``end`` (None: its end) is held or the source ends."""
        while not self._eof and (end is None or self._base + len(self._buf) < end):
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                self._eof = True
                break
            self._sha.update(chunk)
            self._buf += chunk

    @property
    def held(self) -> int:
        """Bytes held for backward seeks (one sample plus read-ahead when reading a tar)."""
        return len(self._buf)

    def release(self, before: int) -> None:
        """Forget bytes before offset ``before`` (never past the current position)."""
        drop = min(before, self._pos) - self._base
        if drop > 0:
            del self._buf[:drop]
            self._base += drop

    def finish(self) -> tuple[int, str]:
        """Read the source to its end (tar padding included); return its ``(size, sha256)``."""
        while not self._eof:
            self._pos = self._base + len(self._buf)
            self.release(self._pos)
            self._fill(self._pos + _CHUNK)
        return self._base + len(self._buf), self._sha.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
