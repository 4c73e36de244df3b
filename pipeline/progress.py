"""Progress of long work, on stderr only (stdout carries the stages' JSON summaries).

Every stage reports through :func:`progress_task`:

* stderr is a terminal: a rich progress bar (count, elapsed time, ETA);
* stderr is not a terminal (a cluster job's log, ``dvc repro 2> log``, CI): plain lines such as
  ``train open_clip_tiny: 120/800 (15.0%) 42 s elapsed, ETA 238 s``, one at the start, then at
  most one every ``DISTILL_PROGRESS_SECONDS`` (default 30), and one at the end, so a job of a few
  seconds prints two lines; ``DISTILL_PROGRESS_PERCENT`` (default off) adds one whenever the work
  has advanced by that many percent since the last;
* ``enabled=False`` (``--no-progress``): nothing.

Work resumed from an earlier run (``start`` units already done) says so, and its rate and ETA
count only the units this process did: ``train open_clip_tiny: 564/690 (81.7%) 65 s elapsed
since resuming at 550, ETA 585 s``.

Third-party bars (Hugging Face downloads, transformers' "Loading weights") are hidden unless
asked for (:func:`library_progress`), so they neither clutter logs nor land in captured output.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

Advance = Callable[..., None]

SECONDS_ENV, PERCENT_ENV = "DISTILL_PROGRESS_SECONDS", "DISTILL_PROGRESS_PERCENT"
DEFAULT_SECONDS, DEFAULT_PERCENT = 30.0, 0.0  # percent 0: no lines by share of work


def make_progress(enabled: bool | None = None, get_time: Callable[[], float] | None = None):
    """A rich progress bar on stderr with count, elapsed time and ETA; ``None`` = only on a TTY.
    ``get_time``: the clock (rich's own by default)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    if enabled is None:
        enabled = sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False, get_time=get_time,
    )


def add_bar_task(progress: Any, description: str, total: int, start: int = 0) -> Any:
    """A task of ``progress`` with ``start`` units already done by an earlier run: they count in
    the bar but not in the rate (rich's speed is taken from the advances it sees), so the ETA
    is that of this process's work."""
    if start:
        description = f"{description} (resumed at {start})"
    return progress.add_task(description, total=total, completed=start, info="")


@contextmanager
def progress_task(description: str, total: int, enabled: bool | None = None,
                  start: int = 0) -> Iterator[Advance]:
    """Context manager yielding ``advance(n=1, info="")`` for one piece of work of ``total`` units.

    ``enabled``: ``None`` = a bar on a terminal, plain lines otherwise; ``True`` = the same;
    ``False`` = silent. ``start``: units an earlier, interrupted run already did (a resumed run):
    shown as done and named, but left out of the rate and the ETA.
    """
    if enabled is False:
        yield lambda n=1, info="": None
    elif sys.stderr.isatty():
        with make_progress(True) as progress:
            task = add_bar_task(progress, description, total, start)
            yield lambda n=1, info="": progress.update(task, advance=n, info=info)
    else:
        lines = ProgressLines(description, total, sys.stderr, start=start)
        yield lines.advance
        lines.finish()


class ProgressLines:
    """Plain progress lines for logs: at the start, at most one per interval of time (and, when
    ``percent`` is set, of work), and at the end.

    ``start``: units done by an earlier run this one resumes; the rate and ETA come from the
    units done since (``clock`` is the time source, ``time.monotonic`` unless a test sets one).
    """

    def __init__(self, description: str, total: int, stream: TextIO,
                 seconds: float | None = None, percent: float | None = None, start: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.stream = description, max(0, int(total)), stream
        self.seconds = _env_float(SECONDS_ENV, DEFAULT_SECONDS) if seconds is None else seconds
        self.percent = _env_float(PERCENT_ENV, DEFAULT_PERCENT) if percent is None else percent
        self.resumed_at = max(0, int(start))
        self.done, self.info, self.clock = self.resumed_at, "", clock
        self.start = self.last_time = clock()
        self.last_done = self.done
        self.first: tuple[float, int] | None = None  # (time, count) at the first advance
        self._emit()

    def advance(self, n: int = 1, info: str = "") -> None:
        """Count ``n`` more units done; print a line when the interval has passed."""
        self.done += n
        self.info = info or self.info
        now = self.clock()
        if self.first is None:
            self.first = (now, self.done)
        by_work = self.percent > 0 and self.total and self.done - self.last_done >= self.total * self.percent / 100
        if now - self.last_time >= self.seconds or by_work:
            self._emit(now)

    def finish(self) -> None:
        """The closing line (unless the last line already said the same)."""
        if self.done != self.last_done or self.done == self.resumed_at:
            self._emit()

    def eta(self, now: float) -> float | None:
        """Seconds left at this process's rate since its first advance (as rich's bar measures it:
        the set-up and the first unit, which warm caches and start readers, are left out, and so
        are the units of an earlier run); None until there is such a rate."""
        if self.first is None or not self.done < self.total:
            return None
        since, done_since = now - self.first[0], self.done - self.first[1]
        if since <= 0 or done_since <= 0:
            return None
        return since * (self.total - self.done) / done_since

    def _emit(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        elapsed = now - self.start
        line = f"{self.description}: {self.done}/{self.total}"
        if self.total:
            line += f" ({100 * self.done / self.total:.1f}%)"
        line += f" {elapsed:.0f} s elapsed"
        if self.resumed_at:
            line += f" since resuming at {self.resumed_at}"
        eta = self.eta(now)
        if eta is not None:
            line += f", ETA {eta:.0f} s"
        if self.info:
            line += f" [{self.info}]"
        print(line, file=self.stream, flush=True)
        self.last_time, self.last_done = now, self.done


def note(message: str, enabled: bool | None = None) -> None:
    """One line on stderr saying what a stage is doing now (for steps with no count of their own)."""
    if enabled is not False:
        print(message, file=sys.stderr, flush=True)


def library_progress(show: bool) -> None:
    """Show or hide third-party progress bars (Hugging Face Hub downloads, transformers' weight
    loading). Set before those libraries are imported it holds for them too."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if show else "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if show else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        return default
