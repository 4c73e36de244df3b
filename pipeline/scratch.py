"""Resumable work in a scratch directory, published into the stage output by an atomic rename.

``dvc repro`` deletes a stage's declared outputs before running it, so partial work kept inside
the output would be lost on every interruption. It lives beside it instead, in
``<out parent>/.scratch/<out name>/``: ``staging/`` grows into the final output, ``done/`` holds one
marker file per finished unit of work (written durably), and ``run.json`` the fingerprint of the
run, so a rerun with other inputs starts afresh instead of mixing old and new results.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def replace_dir(new: Path, dest: Path) -> None:
    """Put directory ``new`` at ``dest`` by renames; an old ``dest`` is deleted only afterwards."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def creating(path: Path) -> Iterator[Path]:
    """Build something at a temporary sibling of ``path``, renamed to ``path`` only when done,
    so an interruption never leaves a half-created store that later runs would trust."""
    tmp = path.with_name(f".{path.name}.creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    yield tmp
    os.replace(tmp, path)


class ScratchRun:
    """Scratch space for producing ``out``; see the module docstring."""

    def __init__(self, out: Path, run_fingerprint: str, scratch_root: Path | None = None) -> None:
        self.out = Path(out)
        self.dir = (Path(scratch_root) if scratch_root else self.out.parent / ".scratch") / self.out.name
        self.staging = self.dir / "staging"
        self.done_dir = self.dir / "done"
        self.run_fingerprint = run_fingerprint
        self._open()

    def _open(self) -> None:
        """Reuse matching scratch state; discard state left by a run with other inputs."""
        run_file = self.dir / "run.json"
        if run_file.exists():
            if json.loads(run_file.read_text()).get("fingerprint") == self.run_fingerprint:
                return
            shutil.rmtree(self.dir)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        write_durable(run_file, json.dumps({"fingerprint": self.run_fingerprint}))

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
        """Move ``staging`` to ``out`` by renames; an existing ``out`` is replaced only then."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(self.staging, self.out)
        shutil.rmtree(self.dir)
        scratch_parent = self.dir.parent
        if scratch_parent.exists() and not any(scratch_parent.iterdir()):
            scratch_parent.rmdir()
