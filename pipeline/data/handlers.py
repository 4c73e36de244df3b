"""Error handlers of sample reading, as webdataset passes them (``handler=``): a handler gets
the exception of a sample that failed to decode and returns True to skip the sample (it keeps its
row, marked invalid) or raises to stop. Structural errors (a truncated tar, a duplicated key)
never reach a handler: they always stop the read."""
from __future__ import annotations

from typing import Callable, Literal

from pipeline.errors import SampleDecodeError

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
