"""Resumable work in a scratch directory, published into the stage output by an atomic rename.

``dvc repro`` deletes a stage's declared outputs before running it, so partial work kept inside
the output would be lost on every interruption. It lives beside it instead, in
``<out parent>/.scratch/<out name>/``: ``staging/`` grows into the final output, ``done/`` holds one
marker file per finished unit of work (written durably), and ``run.json`` the fingerprint of the
run, so a rerun with other inputs starts afresh instead of mixing old and new results.

Publishing leaves nothing temporary behind in the output: Zarr's ``*.partial`` files (a write that
a SIGKILL cut short) are removed from ``staging/`` before it is renamed, a publish interrupted
between its two renames is finished or rolled back by the next run (:func:`recover_replaced`), and
a disk-full error is reported as such, naming the output that was left untouched
(:func:`disk_full_errors`).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

# Errors of a full disk, an exceeded quota, or a file-size limit (RLIMIT_FSIZE).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(PipelineError):
    """Writing failed because the disk (or quota, or file-size limit) is full."""


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync dir): readers
    see the old file or the new one, never a torn one, and a power cut keeps the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _old_copies(dest: Path) -> list[Path]:
    """``.<name>.old<pid>`` siblings of ``dest`` (left by an interrupted :func:`replace_dir`),
    newest first."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.old\d+$")
    if not dest.parent.is_dir():
        return []
    olds = [p for p in dest.parent.iterdir() if pattern.match(p.name)]
    return sorted(olds, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def recover_replaced(dest: Path) -> list[Path]:
    """Clean up after a :func:`replace_dir` that was interrupted between its two renames.

    Then ``dest`` is missing and the previous output waits as ``.<name>.old<pid>``: it is renamed
    back, so what the user had is never lost (the interrupted run publishes again when it
    reruns). Old copies beside an existing ``dest`` are deleted. Returns the copies acted on.
    """
    dest = Path(dest)
    olds = _old_copies(dest)
    if olds and not dest.exists():
        os.replace(olds[0], dest)
        fsync_dir(dest.parent)
        olds_to_delete = olds[1:]
    else:
        olds_to_delete = olds
    for old in olds_to_delete:
        shutil.rmtree(old, ignore_errors=True)
    return olds


def replace_dir(new: Path, dest: Path) -> None:
    """Put directory ``new`` at ``dest`` by renames; an old ``dest`` is deleted only afterwards."""
    recover_replaced(dest)
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)


def remove_temporaries(root: Path) -> list[Path]:
    """Delete what interrupted writers leave under ``root``: Zarr's ``*.partial`` files (a
    ``LocalStore`` write cut short by SIGKILL) and ``.*.creating`` directories. Returns them."""
    found = [p for p in Path(root).rglob("*.partial") if p.is_file()]
    found += [p for p in Path(root).rglob(".*.creating") if p.is_dir()]
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def discard_scratch(out: Any, scratch_root: Path | None = None) -> bool:
    """Delete the scratch directory of ``out`` if one is left (e.g. by a run killed after it
    published); returns whether there was one."""
    where = scratch_dir(out, scratch_root)
    if not where.exists():
        return False
    shutil.rmtree(where)
    if where.parent.exists() and not any(where.parent.iterdir()):
        where.parent.rmdir()
    return True


@contextmanager
def disk_full_errors(out: Path, scratch_dir: Path | None = None) -> Iterator[None]:
    """Turn a disk-full ``OSError`` (ENOSPC, EDQUOT, EFBIG) raised in the block into a
    :class:`DiskFullError` that names the file, says the published ``out`` was not touched and
    that finished work in ``scratch_dir`` is kept for the rerun."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        kept = f" Finished units stay in {scratch_dir}, so a rerun computes only the rest." \
            if scratch_dir else ""
        raise DiskFullError(
            f"disk full while writing {exc.filename or f'under {scratch_dir or out}'} "
            f"({os.strerror(exc.errno)}). "
            f"Nothing was published: {out} is as it was.{kept} Free space on that filesystem "
            "(or point the output elsewhere) and rerun.") from exc


@contextmanager
def creating(path: Path) -> Iterator[Path]:
    """Build something at a temporary sibling of ``path``, renamed to ``path`` only when done,
    so an interruption never leaves a half-created store that later runs would trust."""
    tmp = path.with_name(f".{path.name}.creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    yield tmp
    os.replace(tmp, path)


def scratch_dir(out: Any, scratch_root: Path | None = None) -> Path:
    """The scratch directory of output ``out`` (``<out parent>/.scratch/<out name>``; an output
    in object storage: beside its local stand-in, :func:`pipeline.stores.location.local_shadow`)."""
    from pipeline.stores.location import is_remote, local_shadow, location

    out = local_shadow(location(out)) if is_remote(out) else Path(out)
    return (Path(scratch_root) if scratch_root else out.parent / ".scratch") / out.name


class ScratchRun:
    """Scratch space for producing ``out``; see the module docstring."""

    def __init__(self, out: Any, run_fingerprint: str, scratch_root: Path | None = None) -> None:
        from pipeline.stores.location import location

        self.out = location(out)
        self.dir = scratch_dir(self.out, scratch_root)
        self.staging = self.dir / "staging"
        self.done_dir = self.dir / "done"
        self.run_fingerprint = run_fingerprint
        self._open()

    def _open(self) -> None:
        """Reuse matching scratch state; discard state left by a run with other inputs."""
        run_file = self.dir / "run.json"
        if run_file.exists():
            # done markers are only worth their staging data: a run killed after publishing
            # moved staging away and left the markers behind
            if self._recorded_fingerprint(run_file) == self.run_fingerprint and self.staging.is_dir():
                return
            shutil.rmtree(self.dir)
        elif self.dir.exists():  # killed before run.json was written: nothing finished yet
            shutil.rmtree(self.dir)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        write_durable(run_file, json.dumps({"fingerprint": self.run_fingerprint}))

    @staticmethod
    def _recorded_fingerprint(run_file: Path) -> str | None:
        try:
            return json.loads(run_file.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            return None

    def is_done(self, unit: str) -> bool:
        """Whether unit ``unit`` was finished by this or an earlier, interrupted run."""
        return (self.done_dir / f"{unit}.json").exists()

    def mark_done(self, unit: str, info: dict[str, Any] | None = None) -> None:
        """Record durably that ``unit`` is finished (after its data was written)."""
        write_durable(self.done_dir / f"{unit}.json", json.dumps(info or {}, sort_keys=True))

    def done_info(self, unit: str) -> dict[str, Any]:
        """What :meth:`mark_done` recorded for ``unit``."""
        return json.loads((self.done_dir / f"{unit}.json").read_text())

    def publish(self) -> None:
        """Move ``staging`` to ``out`` by renames; an existing ``out`` is replaced only then.
        Temporary files of interrupted writes are removed from ``staging`` first. An output in
        object storage gets each store uploaded, its root ``zarr.json`` last
        (:func:`pipeline.stores.location.upload_store`)."""
        from pipeline.stores.location import RemotePath, upload_store

        remove_temporaries(self.staging)
        if isinstance(self.out, RemotePath):
            for store in sorted(p for p in self.staging.iterdir() if p.is_dir()):
                upload_store(store, self.out / store.name)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(self.staging, self.out)
        shutil.rmtree(self.dir)
        scratch_parent = self.dir.parent
        if scratch_parent.exists() and not any(scratch_parent.iterdir()):
            scratch_parent.rmdir()
