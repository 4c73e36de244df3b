"""Where a store lives: a local directory, or a prefix in object storage (an fsspec URL).

A store root such as ``teach.out_root: s3://bucket/caches`` names stores as URLs
(``s3://bucket/caches/clip/train.zarr``). Zarr v3 reads and writes them through fsspec
(``zarr.storage.FsspecStore``, made from the URL); :class:`RemotePath` gives the store code the
few path operations it uses on a local directory (join, name, exists, read, size, listing), so
every check runs on a remote store as on a local one. The fsspec backend of the scheme must be
installed (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``), and reads its settings the way that
package does: for S3 the credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a
profile), the endpoint of an S3-compatible server from ``AWS_ENDPOINT_URL``.

A stage writing to a remote root keeps its lock and scratch directory on local disk
(:func:`local_shadow`) and publishes a finished store by uploading it, its root ``zarr.json``
last (:func:`upload_store`): a reader finds the complete store or none.
"""
from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import quote, urlparse


def is_remote(path: Any) -> bool:
    """True for a :class:`RemotePath` or a ``scheme://`` URL other than ``file://``."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str) or "://" not in path:
        return False
    scheme = urlparse(path).scheme
    return len(scheme) > 1 and scheme != "file"


def location(path: "str | Path | RemotePath") -> "Path | RemotePath":
    """A store path as the store code uses it: a :class:`RemotePath` for URLs, else a Path."""
    if isinstance(path, (Path, RemotePath)):
        return path
    return RemotePath(path) if is_remote(path) else Path(path)


def store_root(path: "str | Path") -> "Path | RemotePath":
    """A stage's store root setting: a URL as it is, a local path made absolute."""
    where = location(path)
    return where if isinstance(where, RemotePath) else where.resolve()


class RemotePath:
    """An fsspec URL with the path operations the store code uses (module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    # -- identity and joins
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part: "str | PurePosixPath") -> "RemotePath":
        return RemotePath(f"{self.url}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return posixpath.basename(urlparse(self.url).path)

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def resolve(self) -> "RemotePath":
        return self

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        if not self.url.startswith(other.url + "/"):
            raise ValueError(f"{self} is not below {other}")
        return PurePosixPath(self.url[len(other.url) + 1:])

    # -- the filesystem
    @property
    def fs(self) -> Any:
        return _filesystem(self.url)[0]

    @property
    def path(self) -> str:
        """The path within the filesystem (``bucket/key``)."""
        return _filesystem(self.url)[1]

    def _url_of(self, path: str) -> str:
        """The URL of a filesystem path below this one (as listings return them)."""
        rel = path[len(self.path):].strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=int(self.fs.size(self.path)))

    def files(self) -> dict[str, int]:
        """Every object below, as ``{relative path: size}`` (one listing request per page)."""
        found = self.fs.find(self.path, detail=True)
        return {self._url_of(p)[len(self.url) + 1:]: int(info.get("size") or 0) for p, info in found.items()}

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        for rel in self.files():
            if fnmatch.fnmatch(posixpath.basename(rel), pattern):
                yield self / rel

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        for path in sorted(self.fs.glob(f"{self.path}/{pattern}")):
            yield RemotePath(self._url_of(path))

    def iterdir(self) -> Iterator["RemotePath"]:
        for path in sorted(self.fs.ls(self.path, detail=False)):
            yield RemotePath(self._url_of(path))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to make."""


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(f"{url}: the fsspec backend for {urlparse(url).scheme}:// is not installed "
                          f"({exc}); e.g. pip install s3fs") from None


def local_shadow(out: RemotePath, root: Path | None = None) -> Path:
    """The local directory standing in for remote output ``out`` where a run keeps its lock and
    scratch work: ``<root>/.remote/<URL, escaped>`` (``root``: the working directory)."""
    return (root or Path.cwd()) / ".remote" / quote(out.url, safe="")


def upload_store(local: Path, remote: RemotePath) -> None:
    """Publish the finished store ``local`` at ``remote``: an old store there loses its root
    ``zarr.json`` first (from then on readers find no store, never a mix), then everything else,
    then the new store's files go up, its root ``zarr.json`` last."""
    fs, base = remote.fs, remote.path
    if fs.exists(f"{base}/zarr.json"):
        fs.rm_file(f"{base}/zarr.json")
    if fs.exists(base):
        fs.rm(base, recursive=True)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p != local / "zarr.json")
    if files:
        fs.put([str(p) for p in files], [f"{base}/{p.relative_to(local).as_posix()}" for p in files])
    fs.put_file(str(local / "zarr.json"), f"{base}/zarr.json")
