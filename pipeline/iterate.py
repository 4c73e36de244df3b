"""Small iterator stages: fixed-size batches, and iteration ahead in a background thread."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead (decode overlaps compute).

    When the consumer stops early (an error, a closed generator) the thread is told to stop and
    joined, so it does not linger holding open shards.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            put(exc)
            return
        put(done)

    thread = threading.Thread(target=worker, daemon=True, name="teach-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
