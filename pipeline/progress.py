"""Progress bars (rich) that fall back to silence when output is not a terminal."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def make_progress(enabled: bool | None = None) -> Progress:
    """A rich progress bar with count, rate-friendly columns and ETA; ``None`` = only on a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


@contextmanager
def progress_task(description: str, total: int, enabled: bool | None = None) -> Iterator:
    """Context manager yielding ``advance(n, info="")`` for one progress task."""
    with make_progress(enabled) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance
