"""Rows of a Zarr store read on demand: training and evaluation never load a store whole.

A teacher cache of ten million rows at D = 512 is 10 GB of float16 per modality; training reads
only the rows of the current batch. :class:`RowReader` wraps one row-chunked array of a store:
indexing it with rows (an int, a slice, an integer array in any order, with repeats; optionally
followed by a column index) decodes only the chunks holding those rows, keeps decoded chunks in
a bounded LRU (``cache_bytes``), and returns a numpy array in the store's own dtype (float16
embeddings stay float16 on the host; the device converts them). Every chunk read is checked
(crc32c by zarr, then ``check``): a damaged chunk is a :class:`CacheError` naming the store, the
array and the rows.

The stream of a training epoch reads tar shards one after the other, and ``teach`` writes rows
in manifest order, so a shard's rows are a contiguous slice and a shuffle buffer's rows fall in
a few chunks: the LRU turns a batch into a handful of chunk reads, and :meth:`prefetch` decodes
the next batch's chunks in a background thread while the current step runs.

A reader pickles without its open array and cache (DataLoader workers reopen the store).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr

from pipeline.errors import CacheError

# Decoded chunks kept per reader: 64 MiB is 256 chunks of 256 rows x 512 float16 columns, a
# whole shuffle buffer's worth of rows many times over.
DEFAULT_CACHE_BYTES = 64 << 20

ChunkCheck = Callable[[int, np.ndarray], None]  # (first row, decoded rows) -> raise if damaged


class RowReader:
    """Lazy, checked, LRU-cached row access to array ``name`` of the Zarr group at ``path``."""

    def __init__(self, path: str | Path, name: str, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 check: ChunkCheck | None = None, convert: Callable[[np.ndarray], np.ndarray] | None = None,
                 stored: str = "float16") -> None:
        from pipeline.stores.location import location

        self.path, self.name = location(path), name
        self.cache_bytes, self.check, self.convert = cache_bytes, check, convert
        self.stored = stored  # an embedding array's store dtype: bfloat16/int8 rows decode to float32
        arr = self._array()
        self.shape: tuple[int, ...] = tuple(arr.shape)
        # Converted rows (strings) are objects: a fixed width taken from one chunk could truncate.
        self.dtype = np.dtype(arr.dtype) if convert is None else np.dtype(object)
        if stored != "float16":
            self.dtype = np.dtype(np.float32)
        self.chunk_rows = int(arr.chunks[0]) if self.shape[0] else 1
        self.shard_rows = int(arr.shards[0]) if arr.shards and self.shape[0] else self.chunk_rows
        self.chunk_reads = 0  # chunks decoded so far (what the LRU saved shows in tests/benchmarks)

    # -- pickling: workers get the location and settings, not the open array or its cache --
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_arr", "_scale", "_lru", "_lock", "_pool", "_pending", "_nbytes"):
            state.pop(key, None)
        return state

    def _array(self, name: str | None = None) -> zarr.Array:
        """The open array (``name``: a companion array of the same store, e.g. int8 scales)."""
        slot = "_arr" if name is None else "_scale"
        arr = self.__dict__.get(slot)
        if arr is None:
            try:
                arr = zarr.open_group(str(self.path), mode="r")[name or self.name]
            except (KeyError, FileNotFoundError, ValueError) as exc:
                raise CacheError(f"{self.path}: array {name or self.name} cannot be opened ({exc}); "
                                 "run `distill cache verify` on the store") from None
            self.__dict__[slot] = arr
        return arr

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as readers get them: embeddings of a bfloat16 or int8 store
        decoded to float32 (:mod:`pipeline.stores.encoding`), everything else as stored."""
        values = np.asarray(self._array()[start:stop])
        if self.stored == "float16":
            return values
        from pipeline.stores.encoding import decode, has_scale, scale_name

        scale = (np.asarray(self._array(scale_name(self.name))[start:stop])
                 if has_scale(self.stored) else None)
        return decode(values, self.stored, scale)

    def _state(self) -> tuple[OrderedDict, threading.Lock]:
        if "_lru" not in self.__dict__:
            self._lru: OrderedDict[int, np.ndarray] = OrderedDict()
            self._lock = threading.Lock()
            self._nbytes = 0
        return self._lru, self._lock

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _decode(self, start: int, stop: int) -> np.ndarray:
        try:
            values = self._read(start, stop)
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            raise CacheError(
                f"{self.path}: array {self.name} rows [{start}, {stop}) cannot be read "
                f"({type(exc).__name__}: {exc}): a shard file is damaged. Run `distill cache "
                "verify` for details; restore the store with `dvc checkout`/`dvc pull` or rebuild "
                "it with the stage that made it.") from None
        return values if self.convert is None else self.convert(values)

    def _chunk(self, c: int) -> np.ndarray:
        """Decoded chunk ``c`` (rows ``[c * chunk_rows, (c + 1) * chunk_rows)``), via the LRU."""
        lru, lock = self._state()
        with lock:
            block = lru.get(c)
            if block is not None:
                lru.move_to_end(c)
                return block
        start = c * self.chunk_rows
        block = self._decode(start, min(start + self.chunk_rows, self.shape[0]))
        if self.check is not None:
            self.check(start, block)
        block.setflags(write=False)
        with lock:
            self.chunk_reads += 1
            if c not in lru:
                lru[c] = block
                self._nbytes += block.nbytes
            while self._nbytes > self.cache_bytes and len(lru) > 1:
                _, old = lru.popitem(last=False)
                self._nbytes -= old.nbytes
        return block

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        n = self.shape[0]
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            bad = flat[(flat < -n) | (flat >= n)][:5].tolist()
            raise IndexError(f"{self.path}/{self.name}: rows {bad} outside [0, {n})")
        flat = np.where(flat < 0, flat + n, flat)
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        chunk_of = flat // self.chunk_rows
        for c in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == c)
            out[where] = self._chunk(int(c))[flat[where] - c * self.chunk_rows]
        return out.reshape(*rows.shape, *self.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # (rows, columns...): rows read here, the rest by numpy
            rows, rest = key[0], key[1:]
            lead = 1 if isinstance(rows, slice) else np.ndim(rows)
            return self[rows][(slice(None),) * lead + rest]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:  # a contiguous range: read it directly, past the LRU
                values = self._decode(start, max(start, stop))
                if self.check is not None and len(values):
                    self.check(start, values)
                return values
            return self._rows(np.arange(start, stop, step))
        if np.ndim(key) == 0:
            return self._rows(np.asarray([key]))[0]
        return self._rows(np.asarray(key))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole array (for small splits and stage-1 code that needs all rows at once)."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, values)`` of consecutive row blocks, bounded memory (whole-array passes);
        a block is ``rows`` rows rounded to whole chunks (default: one Zarr shard)."""
        for start, (values,) in paired_blocks(self, rows=rows or self.shard_rows):
            yield start, values

    def prefetch(self, rows: np.ndarray) -> Future:
        """Decode the chunks of ``rows`` into the LRU in a background thread."""
        if "_pool" not in self.__dict__:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"prefetch-{self.name}")
        chunks = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1) // self.chunk_rows)
        return self._pool.submit(lambda: [self._chunk(int(c)) for c in chunks])


class ViewRows:
    """One view of a lazily read ``[N, V, D]`` embedding array, as ``[N, D]`` rows (the rows of
    every view are read and cached together: a chunk holds them all)."""

    def __init__(self, reader: RowReader, view: int) -> None:
        self.reader, self.view = reader, view
        self.shape = (reader.shape[0], reader.shape[2])
        self.dtype, self.ndim = reader.dtype, 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) * (1 if isinstance(key[0], slice) else np.ndim(key[0]))
                                + key[1:]]
        return self.reader[key][..., self.view, :]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def prefetch(self, rows: np.ndarray) -> Any:
        return self.reader.prefetch(rows)


def paired_blocks(*arrays: Any, rows: int = 1 << 16) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(start, [block of each array])`` over the rows of row arrays (numpy or
    :class:`RowReader`) of one length, about ``rows`` rows at a time (rounded to whole chunks of
    the readers, so no chunk is decoded twice): whole-store passes in bounded memory."""
    n = arrays[0].shape[0]
    chunk = math.lcm(*(a.chunk_rows for a in arrays if isinstance(a, RowReader)))
    step = max(chunk, rows // chunk * chunk)
    for start in range(0, n, step):
        stop = min(start + step, n)
        yield start, [a[start:stop] for a in arrays]


def array_equal_blocks(a: Any, b: Any, rows: int = 1 << 16) -> bool:
    """Whether two row arrays (numpy or :class:`RowReader`) are equal, read block by block."""
    return tuple(a.shape) == tuple(b.shape) and all(
        np.array_equal(x, y) for _, (x, y) in paired_blocks(a, b, rows=rows))
