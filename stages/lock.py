"""One writer per stage output: a lock file beside the output, held for the whole run.

Two runs writing the same output would write the same Zarr shards, and a shard is rewritten as a
whole, so one run's rows silently replace the other's. :func:`output_lock` refuses the second run
instead. The lock is the file ``<out parent>/.<out name>.lock``, outside the output (``dvc repro``
deletes a stage's outputs before it runs), holding who took it: pid, host, boot id, the process
start time and the command.

How a lock is judged:

* An advisory ``flock`` on the file is held while the run lasts. The kernel drops it when the
  process dies, even by SIGKILL, so a live holder on this host is always detected, and a dead one
  never blocks: its leftover file is *taken over* when the record proves the holder is gone (same
  host, and its pid no longer runs, or now belongs to another process, or the machine rebooted).
* A record written on another host is never taken over: on a shared filesystem this host cannot
  see that host's processes, nor always its locks. The run is refused with the record and the
  command that clears the lock once the user knows that run is over.
* On a filesystem without ``flock`` support the record alone decides, as above.

A process may take the lock again while it holds it (the ``distill teach`` command locks before
building the teacher, then :func:`stages.teach.run.run_teach` locks again); other threads may not.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: the record alone decides
    fcntl = None  # type: ignore[assignment]

from pipeline.errors import PipelineError
from pipeline.scratch import DISK_FULL_ERRNOS, DiskFullError

log = logging.getLogger(__name__)

# Locks this process holds: lock path -> [fd, depth, owning thread id, owning pid].
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


class LockError(PipelineError):
    """Another run writes (or may still write) the same output."""


@dataclass(frozen=True)
class Holder:
    """Who took a lock (the lock file's content)."""

    pid: int | None
    host: str | None
    boot_id: str | None = None
    start_ticks: int | None = None  # process start time in clock ticks since boot (Linux)
    started: str | None = None      # UTC time the lock was taken
    command: str | None = None

    def describe(self) -> str:
        """One line for messages: pid, host, time and command."""
        if self.pid is None:
            return "an unknown process (the lock file holds no readable record)"
        return (f"pid {self.pid} on host {self.host or '?'} since {self.started or '?'} "
                f"(command: {self.command or '?'})")


def lock_path(out: Any) -> Path:
    """The lock file of output ``out``: ``<parent>/.<name>.lock`` (an output in object storage:
    beside its local stand-in, :func:`pipeline.stores.location.local_shadow`)."""
    out = _local(out)
    return out.parent / f".{out.name}.lock"


def _local(out: Any) -> Path:
    """The local path of an output (a remote one's local stand-in)."""
    from pipeline.stores.location import is_remote, local_shadow, location

    return local_shadow(location(out)) if is_remote(out) else Path(out)


@contextmanager
def output_lock(out: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold the lock of output ``out`` for the block; refuse (:class:`LockError`) if another
    process holds it or may hold it. ``what`` names the run in messages (e.g. ``distill teach``).
    Yields the lock file's path."""
    path = lock_path(out)
    key = str(path.resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[3] == os.getpid():
            if held[2] != threading.get_ident():
                raise LockError(f"{out}: another thread of this process is writing it")
            held[1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, _local(out), what)
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(f"disk full: cannot write the lock file {path} ({os.strerror(exc.errno)}); "
                            "free space on that filesystem and rerun") from exc
    with _HELD_GUARD:
        _HELD[key] = [fd, 1, threading.get_ident(), os.getpid()]
    try:
        yield path
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        _release(fd, path)


def _acquire(path: Path, out: Path, what: str) -> int:
    """Open, lock and stamp the lock file; the returned descriptor keeps the lock."""
    for _ in range(20):  # the file may be removed between our open and our flock: retry
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is False:
                raise LockError(_busy_message(out, path, holder, what))
            if not _same_file(fd, path):
                os.close(fd)
                continue
            if holder is not None:
                _judge_stale(holder, out, path, flock_held=locked is True, what=what)
            _write_holder(fd, _me())
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise LockError(f"{path}: could not take the lock of {out} (the file keeps being replaced)")


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then close it (which drops the flock)."""
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _read_holder(fd: int) -> Holder | None:
    """The record in the lock file; None if empty (a fresh file)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    if not raw.strip():
        return None
    try:
        data: dict[str, Any] = json.loads(raw)
        return Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__})
    except (ValueError, TypeError):
        return Holder(pid=None, host=None)


def _write_holder(fd: int, holder: Holder) -> None:
    data = (json.dumps(asdict(holder), sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _me() -> Holder:
    pid = os.getpid()
    return Holder(pid=pid, host=socket.gethostname(), boot_id=_boot_id(), start_ticks=_start_ticks(pid),
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first); None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat


def holder_alive(holder: Holder) -> bool:
    """Whether the recorded process provably still runs on this host (the caller checked the
    host). A pid that now belongs to another process, a zombie, or a record from before the
    last reboot counts as dead."""
    if holder.pid is None:
        return False
    if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _proc_stat(holder.pid)
    if fields is None:
        return True  # no /proc: the pid exists, assume it is the holder
    if fields[0] == "Z":
        return False
    return holder.start_ticks is None or _start_ticks(holder.pid) == holder.start_ticks


def _judge_stale(holder: Holder, out: Path, path: Path, flock_held: bool, what: str) -> None:
    """A record is present: take it over only if its process is provably gone, else refuse."""
    here = socket.gethostname()
    if holder.pid is None:
        if flock_held:  # a holder died while writing its record; the kernel freed the lock
            log.warning("%s: taking over a lock file without a readable record", path)
            return
        raise LockError(f"{path}: the lock of {out} holds no readable record and this filesystem "
                        f"has no file locks to tell whether a run still writes it. If none does, "
                        f"remove it (rm '{path}') and rerun.")
    if holder.host != here:
        raise LockError(
            f"{out} is locked by {holder.describe()} — another host, whose processes this host "
            f"cannot see. If that run is over (it crashed or its machine went down), remove the "
            f"stale lock with: rm '{path}' and rerun {what}.")
    if holder_alive(holder) and holder.pid != os.getpid():
        raise LockError(_busy_message(out, path, holder, what))
    log.warning("%s: taking over the stale lock of %s: that process no longer runs",
                path, holder.describe())


def _busy_message(out: Path, path: Path, holder: Holder | None, what: str) -> str:
    who = holder.describe() if holder else "another process (it has not written its record yet)"
    msg = (f"{out} is being written by {who}. Two writers on one output would overwrite each "
           f"other's Zarr shards, so this {what} is refused: wait for that run to finish or stop it")
    if holder is not None and holder.host == socket.gethostname() and holder.pid is not None \
            and not holder_alive(holder):
        msg += (f". Its pid no longer runs, yet the lock ({path}) is still held: a child process "
                "it started may still be alive; stop it")
    return msg + "."
