"""Neighbour search over teacher stores read block by block: exact, or approximate (IVF).

**Exact** (:func:`exact_topk`): the queries of one unit stay in memory; the keys are read from
the store one block of ``key_block_rows`` rows at a time (decoded as every reader decodes them)
and merged into a running top-k (:class:`pipeline.topk.StreamingTopK`), so memory does not grow
with the store: the queries, one key block and the k best per query. The result is the one the
whole-array search (:func:`pipeline.topk.blocked_topk`) gives, bit for bit on the same backend.
Reading the keys again for every unit is cheap next to the search itself: a unit of 16,384
queries spends ~16 MFLOP on each 512-d key, which decodes in about a microsecond.

**IVF** (:class:`IvfIndex`): a faiss ``IndexIVFFlat`` (inner product) whose ``nlist`` centroids
are trained on a random sample of ``train_rows`` valid keys, filled with every valid key block
by block, searched with ``nprobe`` lists per query. Its similarities are exact dot products of
the candidates it visits; candidates are ordered as the exact search orders them (higher
similarity, then the lower row). The index holds every valid key (4·D bytes each) in memory.

**Recall** (:func:`recall_at_k`): the share of the exact top-k that the approximate lists hold,
averaged over queries, measured on a random sample of queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.stores.rows import paired_blocks
from pipeline.topk import StreamingTopK, _faiss, _exact_order


def key_blocks(keys: Any, valid: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, float32 rows, valid flags)`` of consecutive key blocks of about ``rows`` rows
    (whole chunks of the store), in row order."""
    for start, (block,) in paired_blocks(keys, rows=rows):
        yield start, np.asarray(block, dtype=np.float32), valid[start:start + len(block)]


def exact_topk(queries: np.ndarray, keys: Any, key_valid: np.ndarray, k: int, *, block_rows: int = 4096,
               key_block_rows: int = 65536, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` over the row array ``keys`` (a store reader or numpy), read a
    block at a time; keys whose ``key_valid`` is False are never returned. ``device`` cpu:
    faiss (where installed), else the torch backend on that device."""
    search = StreamingTopK(queries, k, device=device, block_rows=block_rows)
    for start, block, valid in key_blocks(keys, key_valid, key_block_rows):
        search.add(block, start, valid)
    return search.result()


@dataclass(frozen=True)
class IvfParams:
    """What an IVF index is built and searched with (recorded in the neighbour store)."""

    nlist: int           # inverted lists (k-means centroids)
    nprobe: int          # lists visited per query
    train_rows: int      # keys sampled to train the centroids
    seed: int            # of the training sample and of k-means

    def attrs(self) -> dict[str, int]:
        """The parameters as store attributes."""
        return {"nlist": self.nlist, "nprobe": self.nprobe, "train_rows": self.train_rows, "seed": self.seed}


class IvfIndex:
    """An ``IndexIVFFlat`` over the valid rows of one key array (module docstring)."""

    def __init__(self, index: Any, params: IvfParams) -> None:
        self.index, self.params = index, params

    @classmethod
    def build(cls, keys: Any, key_valid: np.ndarray, params: IvfParams,
              key_block_rows: int = 65536) -> "IvfIndex":
        """Train on a sample of valid keys, then add every valid key (ids = store rows)."""
        faiss = _require_faiss()
        rows = np.flatnonzero(key_valid)
        if rows.size == 0:
            raise ValueError("no valid key rows to index")
        nlist = min(params.nlist, rows.size)  # k-means needs a point per centroid at least
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(rows, size=min(params.train_rows, rows.size), replace=False))
        train = np.ascontiguousarray(np.asarray(keys[sample], dtype=np.float32))
        dim = train.shape[1]
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = params.seed
        index.cp.min_points_per_centroid = 1  # a small store: no warning, the centroids it can get
        index.train(train)
        for start, block, valid in key_blocks(keys, key_valid, key_block_rows):
            keep = np.flatnonzero(valid)
            if keep.size:
                index.add_with_ids(np.ascontiguousarray(block[keep]), (start + keep).astype(np.int64))
        index.nprobe = min(params.nprobe, nlist)
        return cls(index, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(idx int32 [Nq, k], sim float32 [Nq, k]) of the lists visited, ordered by similarity
        then row; -1 and -inf where the visited lists held fewer than k keys."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        # one candidate more than k: ties at the k-th place are ordered among what was found
        sim, idx = self.index.search(q, k + 1)
        top, top_sim, _ = _exact_order(idx, sim, None, k, complete=True)
        return top, top_sim

    def to_bytes(self) -> bytes:
        """The index serialised (faiss's own format)."""
        return _require_faiss().serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, params: IvfParams) -> "IvfIndex":
        """An index :meth:`to_bytes` wrote."""
        index = _require_faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        index.nprobe = min(params.nprobe, index.nlist)
        return cls(index, params)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (the exact lists' -1 slots not counted;
    queries without any exact neighbour are left out). 1.0 when no query has one."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        wanted = e[e >= 0]
        if wanted.size:
            hits += np.isin(wanted, a[a >= 0]).sum() / wanted.size
            total += 1
    return float(hits / total) if total else 1.0


def _require_faiss() -> Any:
    faiss = _faiss()
    if faiss is None:
        raise ValueError("neighbors.method: ivf needs the faiss-cpu package (pip install faiss-cpu)")
    return faiss
