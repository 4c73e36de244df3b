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
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ScratchRun:
    """Scratch space for producing ``out``; see the module docstring."""

    def __init__(self, out: Path, run_fingerprint: str, scratch_root: Path | None = None) -> None:
        self.out = Path(out)
        self.dir = (Path(scratch_root) if scratch_root else self.out.parent / ".scratch") / self.out.name
        self.staging = self.dir / "staging"
        self.done_dir = self.dir / "done"
        self.run_fingerprint = run_fingerprint
        self.resumed = self._open()

    def _open(self) -> bool:
        """Reuse matching scratch state; discard state left by a run with other inputs."""
        run_file = self.dir / "run.json"
        if run_file.exists():
            if json.loads(run_file.read_text()).get("fingerprint") == self.run_fingerprint:
                return True
            shutil.rmtree(self.dir)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        write_durable(run_file, json.dumps({"fingerprint": self.run_fingerprint}))
        return False

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
        old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        fsync_dir(self.out.parent)
        if old.exists():
            shutil.rmtree(old)
        shutil.rmtree(self.dir)
        scratch_parent = self.dir.parent
        if scratch_parent.exists() and not any(scratch_parent.iterdir()):
            scratch_parent.rmdir()
