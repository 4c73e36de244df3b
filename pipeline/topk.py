"""Exact top-k by dot product in bounded memory.

Results are exactly reproducible: ties are broken by the lower key index. Two backends follow
that rule: faiss (the default where it is installed, below) and torch.

The torch backend computes similarities block by block (``block_rows`` queries x ``block_keys``
keys, float32 matmul) and merges them into a running top-k per query, so memory never holds the
full [Nq, Nk] matrix. Two tricks keep this exact and cheap:

* Each (similarity, key index) pair is packed into one int64 whose integer order is
  "higher similarity first, then lower index": the upper 32 bits are the float32 bits mapped
  to a monotone signed integer, the lower 32 bits are ``2**32 - 1 - index``. Packed values are
  distinct, so ``torch.topk`` on them is deterministic, and similarity and index decode back
  from the winners.
* Only block entries that can still enter the running top-k are packed: those strictly above
  the current k-th best similarity (an equal one loses the tie, since key blocks are visited
  in index order). After the first key block that is a small fraction of the block, so the
  cost is dominated by the matmul instead of a full top-k over every block.

The faiss backend (``faiss-cpu`` is a dependency; about 1.5x faster than torch here, with less
memory, BENCHMARKS.md §5) lets faiss do the heavy part: its ``knn`` (the search of
``IndexFlatIP`` without building an index, so without a copy of the keys) returns one more
than k candidates per query, and the exact order is restored here. faiss keeps the right *set*
of the top candidates but not the order of equal similarities, so each row's candidates are
re-sorted by (similarity desc, index asc); the result is exact whenever the k-th similarity is
strictly above the last candidate's, because then every key that could still tie or beat it is
among the candidates. The rare rows where that fails (a run of equal similarities across the
boundary) are searched again with more candidates until it holds.
Both backends follow the same rule on their own float32 similarities, which can differ in the
last bits (two BLAS libraries): two neighbours within a rounding error of each other may come
out in either order depending on the backend (a few rows in 50,000 in BENCHMARKS.md §5).
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Literal

import numpy as np
import torch

_LOW32 = 0xFFFFFFFF
_MAX_KEYS = _LOW32  # indices must fit in the low 32 bits, one value kept for the sentinel


def _monotone_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 bits viewed as int32 -> int32 whose integer order is the float order (in place;
    negative floats order backwards as integers, so their magnitude bits flip; self-inverse)."""
    x ^= (x >> 31) & 0x7FFFFFFF
    return x


def _pack(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float32 similarities and int64 key indices (same shape, ``sim`` is consumed) -> int64."""
    sim.add_(0.0)  # -0.0 -> +0.0: equal floats must get equal upper bits
    packed = _monotone_bits(sim.view(torch.int32)).to(torch.int64)
    packed <<= 32
    packed |= _LOW32 - index
    return packed


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int64 -> (index int64, similarity float32)."""
    index = _LOW32 - (packed & _LOW32)
    bits = _monotone_bits((packed >> 32).to(torch.int32))
    return index, bits.view(torch.float32)


# "no entry": decodes to similarity -inf and ranks below every real pair
_SENTINEL = int(_pack(torch.tensor([float("-inf")]), torch.tensor([_LOW32]))[0])


def _as_f32(name: str, x: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; top-k order would be undefined")
    return torch.from_numpy(arr)


def _block_sims(
    q: torch.Tensor, kb: torch.Tensor, q0: int, k0: int,
    invalid: torch.Tensor | None, exclude_self: bool,
) -> torch.Tensor:
    """Similarities of one query block to one key block, excluded pairs set to -inf
    (``invalid``: the key block's own mask)."""
    sim = q @ kb.T
    if invalid is not None:
        sim.masked_fill_(invalid, float("-inf"))
    if exclude_self:
        lo, hi = max(q0, k0), min(q0 + q.shape[0], k0 + kb.shape[0])
        if lo < hi:
            rows = torch.arange(lo, hi, device=sim.device)
            sim[rows - q0, rows - k0] = float("-inf")
    return sim


def _candidates(best: torch.Tensor, sim: torch.Tensor, ties_win: bool = False) -> torch.Tensor:
    """Bool mask of block entries that may enter the running top-k ``best`` [b,k] (``ties_win``:
    the block's keys may have lower indices than those in ``best``, so an equal one can win)."""
    kth_best = _unpack(best[:, -1:])[1]  # -inf where fewer than k entries so far
    cand = (sim >= kth_best) & (sim > float("-inf")) if ties_win else sim > kth_best
    # (both drop excluded (-inf) pairs)
    if not bool(torch.isfinite(kth_best).all()):
        # rows still filling up: bound by the block's own k-th value, or every entry would pass
        k = min(best.shape[1], sim.shape[1])
        block_kth = torch.topk(sim, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        cand &= sim >= block_kth
    return cand


def _merge(best: torch.Tensor, sim: torch.Tensor, k0: int, ties_win: bool = False) -> torch.Tensor:
    """Running packed top-k [b,k] merged with the similarities [b,m] of keys k0..k0+m."""
    rows, cols = _candidates(best, sim, ties_win).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return best
    # lay each row's candidates out left-aligned in a [b, max count] sentinel-padded matrix
    counts = torch.bincount(rows, minlength=sim.shape[0])
    slot = torch.arange(rows.numel(), device=sim.device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.full((sim.shape[0], int(counts.max())), _SENTINEL, dtype=torch.int64, device=sim.device)
    padded[rows, slot] = _pack(sim[rows, cols], cols + k0)
    merged = torch.cat([best, padded], dim=1)
    return torch.topk(merged, best.shape[1], dim=1, sorted=True).values


def _topk_rows(
    q: torch.Tensor, keys: torch.Tensor, q0: int, k: int, block_keys: int,
    invalid: torch.Tensor | None, exclude_self: bool,
) -> torch.Tensor:
    """Packed top-k [b,k] (best first) of one query block over all key blocks in index order."""
    best = torch.full((q.shape[0], k), _SENTINEL, dtype=torch.int64, device=q.device)
    return _merge_keys(best, q, keys, q0, 0, block_keys, invalid, exclude_self)


def _merge_keys(best: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, q0: int, k0: int,
                block_keys: int, invalid: torch.Tensor | None, exclude_self: bool,
                ties_win: bool = False) -> torch.Tensor:
    """``best`` merged with keys ``k0..`` (``keys``, ``invalid`` its mask), ``block_keys`` at a
    time (``ties_win``: ``best`` may hold keys of higher index than these)."""
    for j in range(0, keys.shape[0], block_keys):
        kb = keys[j:j + block_keys]
        mask = None if invalid is None else invalid[j:j + block_keys]
        best = _merge(best, _block_sims(q, kb, q0, k0 + j, mask, exclude_self), k0 + j, ties_win)
    return best


def _check(q: torch.Tensor, keys: torch.Tensor, k: int, key_valid, exclude_self: bool):
    """Validate shapes; return the invalid-key mask (or None)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if q.shape[1] != keys.shape[1]:
        raise ValueError(f"dimension mismatch: queries D={q.shape[1]}, keys D={keys.shape[1]}")
    if exclude_self and q.shape[0] != keys.shape[0]:
        raise ValueError("exclude_self needs queries and keys from the same set (Nq == Nk)")
    if keys.shape[0] >= _MAX_KEYS:
        raise ValueError(f"at most {_MAX_KEYS - 1} keys are supported")
    if key_valid is None:
        return None
    valid = np.asarray(key_valid, dtype=bool)
    if valid.shape != (keys.shape[0],):
        raise ValueError(f"key_valid must have shape ({keys.shape[0]},), got {valid.shape}")
    return torch.from_numpy(~valid)


Backend = Literal["auto", "faiss", "torch"]
_SLACK = 1  # candidates searched beyond k: one suffices to prove the k-th is exact unless it ties


def blocked_topk(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    block_rows: int = 4096,
    key_valid: np.ndarray | None = None,
    exclude_self: bool = False,
    block_keys: int = 4096,
    backend: Backend = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k keys by dot product for every query.

    queries [Nq,D], keys [Nk,D] (any float dtype; computed in float32). Returns
    (idx int32 [Nq,k], sim float32 [Nq,k]) sorted by descending similarity, ties broken by the
    lower key index. Keys with ``key_valid`` False are never returned; ``exclude_self`` (same
    set: Nq == Nk) drops key i for query i. Rows with fewer than k candidates are padded with
    idx -1 and sim -inf. Queries are processed ``block_rows`` at a time.

    backend: ``"faiss"`` (``faiss.knn`` on as many threads as torch uses, plus the exact tie
    order; peak extra memory ~ faiss's 4096 x 1024 float32 block, the candidates of a query
    block and, only when some keys are invalid, a copy of the valid keys), ``"torch"`` (matmul
    blocks of ``block_rows`` x ``block_keys``; peak extra memory ~ block_rows x block_keys x 6
    bytes plus the running top-k, block_rows x k x 8 bytes), or ``"auto"``: faiss when installed.
    """
    q_all, key_t = _as_f32("queries", queries), _as_f32("keys", keys)
    invalid = _check(q_all, key_t, k, key_valid, exclude_self)
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown top-k backend {backend!r}; known: ['auto', 'faiss', 'torch']")
    if backend == "faiss" and _faiss() is None:
        raise ValueError("top-k backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
    if backend != "torch" and _faiss() is not None:
        return _faiss_topk(q_all.numpy(), key_t.numpy(), k, block_rows, invalid, exclude_self)
    return _torch_topk(q_all, key_t, k, block_rows, block_keys, invalid, exclude_self)


def _torch_topk(q_all: torch.Tensor, key_t: torch.Tensor, k: int, block_rows: int, block_keys: int,
                invalid: torch.Tensor | None, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """The torch backend: packed running top-k over key blocks (module docstring)."""
    idx = np.empty((q_all.shape[0], k), dtype=np.int32)
    sim = np.empty((q_all.shape[0], k), dtype=np.float32)
    for q0 in range(0, q_all.shape[0], block_rows):
        q_block = q_all[q0:q0 + block_rows]
        best = _topk_rows(q_block, key_t, q0, k, block_keys, invalid, exclude_self)
        b_idx, b_sim = _unpack(best)
        found = torch.isfinite(b_sim)  # sentinel slots decode to -inf
        idx[q0:q0 + best.shape[0]] = torch.where(found, b_idx, -1).numpy()
        sim[q0:q0 + best.shape[0]] = b_sim.numpy()
    return idx, sim


# ----------------------------------------------------------------------------- keys in blocks


class StreamingTopK:
    """Exact top-k of a fixed set of queries over keys that arrive block by block (a store read
    a block at a time, never whole): :func:`blocked_topk`'s result, in memory bounded by the
    queries, one key block and the running top-k.

    Every block is searched by the chosen backend as :func:`blocked_topk` searches the whole
    key set (faiss: exact top-k of the block with the tie order restored; torch: packed running
    top-k, on ``device``), and the blocks' winners are merged by the same packed order, higher
    similarity first, then the lower key index. So the result does not depend on how the keys
    are cut into blocks, nor on the order of the blocks, and equals the whole-array search
    wherever each pair's float32 similarity does (the same backend on the same query blocks).

    ``device``: ``cpu`` (faiss where installed, as ``backend: auto``), or a CUDA device: the
    torch backend runs there (matmul blocks and the packed merge on the GPU).
    """

    def __init__(self, queries: np.ndarray, k: int, *, backend: Backend = "auto", device: str = "cpu",
                 block_rows: int = 4096, block_keys: int = 4096) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"unknown top-k backend {backend!r}; known: ['auto', 'faiss', 'torch']")
        self.device = torch.device(device)
        if backend == "faiss" and (_faiss() is None or self.device.type != "cpu"):
            raise ValueError("top-k backend 'faiss' needs the faiss-cpu package and device cpu")
        self.backend = "faiss" if backend != "torch" and self.device.type == "cpu" and \
            _faiss() is not None else "torch"
        self.q = _as_f32("queries", queries)
        self.k, self.block_rows, self.block_keys = k, block_rows, block_keys
        self._q_dev = self.q.to(self.device) if self.backend == "torch" else None
        self.best = torch.full((self.q.shape[0], k), _SENTINEL, dtype=torch.int64, device=self.device)
        self._next_key = 0  # blocks in index order: an equal similarity never wins (cheaper merge)

    def add(self, keys: np.ndarray, start: int, key_valid: np.ndarray | None = None) -> None:
        """Merge keys ``start .. start + len(keys)`` (``key_valid``: False for keys never to be
        returned). Each key must be added once; blocks may come in any order."""
        kb = _as_f32("keys", keys)
        if kb.shape[1] != self.q.shape[1]:
            raise ValueError(f"dimension mismatch: queries D={self.q.shape[1]}, keys D={kb.shape[1]}")
        if start + kb.shape[0] >= _MAX_KEYS:
            raise ValueError(f"at most {_MAX_KEYS - 1} keys are supported")
        invalid = None
        if key_valid is not None and not np.asarray(key_valid, bool).all():
            invalid = torch.from_numpy(~np.asarray(key_valid, dtype=bool))
        if self.backend == "faiss":
            idx, sim = _faiss_topk(self.q.numpy(), kb.numpy(), self.k, self.block_rows, invalid, False)
            index = torch.from_numpy(idx).long() + start
            packed = torch.where(index >= start, _pack(torch.from_numpy(sim), index), _SENTINEL)
            self.best = torch.topk(torch.cat([self.best, packed], dim=1), self.k, dim=1).values
            return
        kb = kb.to(self.device)
        invalid = None if invalid is None else invalid.to(self.device)
        ties_win = start < self._next_key
        self._next_key = max(self._next_key, start + kb.shape[0])
        for q0 in range(0, self.q.shape[0], self.block_rows):
            rows = slice(q0, q0 + self.block_rows)
            self.best[rows] = _merge_keys(self.best[rows], self._q_dev[rows], kb, q0, start,
                                          self.block_keys, invalid, False, ties_win)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(idx int32 [Nq, k], sim float32 [Nq, k]), best first; -1 and -inf where fewer than k
        keys were allowed."""
        index, sim = _unpack(self.best)
        index = torch.where(torch.isfinite(sim), index, -1)
        return index.to(torch.int32).cpu().numpy(), sim.cpu().numpy()


# ----------------------------------------------------------------------------- faiss backend


@functools.cache
def _faiss() -> ModuleType | None:
    """The faiss module, or None where it is not installed (imported on first use: it is slow)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_topk(queries: np.ndarray, keys: np.ndarray, k: int, block_rows: int,
                invalid: torch.Tensor | None, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """The faiss backend (module docstring): ``faiss.knn`` candidates, exact order restored."""
    faiss = _faiss()
    faiss.omp_set_num_threads(torch.get_num_threads())  # same thread budget as the torch backend
    key_rows = None if invalid is None else np.flatnonzero(~invalid.numpy())
    base = keys if key_rows is None else np.ascontiguousarray(keys[key_rows])
    idx = np.full((queries.shape[0], k), -1, dtype=np.int32)
    sim = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    for q0 in range(0, queries.shape[0], block_rows):
        q = queries[q0:q0 + block_rows]
        rows = np.arange(q0, q0 + q.shape[0])
        todo = np.arange(q.shape[0])
        n_cand = k + int(exclude_self) + _SLACK
        while todo.size and base.shape[0]:
            n_cand = min(n_cand, base.shape[0])
            cand_sim, cand = faiss.knn(q[todo], base, n_cand, metric=faiss.METRIC_INNER_PRODUCT)
            if key_rows is not None:
                cand = np.where(cand >= 0, key_rows[np.maximum(cand, 0)], -1)
            b_idx, b_sim, exact = _exact_order(cand, cand_sim, rows[todo] if exclude_self else None,
                                               k, complete=n_cand == base.shape[0])
            idx[q0 + todo[exact]], sim[q0 + todo[exact]] = b_idx[exact], b_sim[exact]
            todo = todo[~exact]
            n_cand *= 4
    return idx, sim


def _exact_order(cand: np.ndarray, cand_sim: np.ndarray, self_rows: np.ndarray | None, k: int,
                 complete: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of each row's candidates by (similarity desc, index asc), and whether that is the
    exact top-k: the candidates are every key (``complete``), or the k-th similarity is above
    the last candidate's, so no key left out can reach it."""
    missing = cand < 0
    if self_rows is not None:
        missing |= cand == self_rows[:, None]
    # faiss sorts by similarity: only rows with equal neighbours or dropped entries need a sort
    fix = np.flatnonzero((cand_sim[:, 1:] == cand_sim[:, :-1]).any(axis=1) | missing.any(axis=1))
    if fix.size:
        miss = missing[fix]
        neg = np.where(miss, np.inf, -cand_sim[fix])  # dropped entries sort last
        order = np.lexsort((np.where(miss, np.iinfo(np.int64).max, cand[fix]), neg), axis=-1)
        cand, cand_sim, missing = cand.copy(), cand_sim.copy(), missing.copy()
        cand[fix] = np.take_along_axis(cand[fix], order, axis=1)
        cand_sim[fix] = np.take_along_axis(cand_sim[fix], order, axis=1)
        missing[fix] = np.take_along_axis(miss, order, axis=1)
    top = np.where(missing[:, :k], -1, cand[:, :k]).astype(np.int32)
    top_sim = np.where(missing[:, :k], -np.inf, cand_sim[:, :k]).astype(np.float32)
    if top.shape[1] < k:  # fewer keys than k: pad
        pad = ((0, 0), (0, k - top.shape[1]))
        top, top_sim = np.pad(top, pad, constant_values=-1), np.pad(top_sim, pad, constant_values=-np.inf)
    if complete:
        return top, top_sim, np.ones(len(cand), dtype=bool)
    last = cand_sim.min(axis=1)  # the lowest similarity faiss kept (dropped entries included)
    return top, top_sim, top_sim[:, -1] > last
