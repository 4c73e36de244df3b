"""Hard-negative batches: put each anchor's nearest neighbours in its own batch.

In-batch losses (contrastive, similarity KL) only see the negatives that share a batch; with
random batches from a large dataset those are almost never the hard ones. ``plan_epoch`` builds
an epoch's batches of image rows from the teacher's cached image→image top-k neighbours
(``i2i_topk_idx`` of the ``neighbors`` stage):

1. The usable rows, sorted, are shuffled with ``np.random.default_rng([seed, epoch]).permutation``.
2. Each batch takes its ``B − H`` *random* rows, ``H = min(round(hard_fraction · B), B − 1)``,
   as the next unused rows of that shuffle. The first ``min(B − H, ceil(H / hard_per_anchor))``
   of them are the batch's *anchors*.
3. Its ``H`` *hard* rows are the anchors' nearest neighbours that are usable and not yet used
   this epoch, deduplicated, taken rank by rank (every anchor's 1st neighbour, then every 2nd …)
   at most ``hard_per_anchor`` per anchor; when those run out (late in an epoch, neighbours are
   used up), the anchors' further neighbours, then random unused rows, fill the batch.
4. A batch is laid out ``[random rows (anchors first), hard rows, fill rows]``.

Every usable row is in at most one batch of an epoch, every batch is full, and the last
``len(usable) % batch_size`` rows of the epoch are dropped. ``hard_fraction = 0`` is exactly the
shuffle cut into batches. The cost is O(N·k) per epoch: one pass over the shuffle, and one
``[anchors, k]`` array per batch.

A teacher without image embeddings has no ``i2i`` neighbours: ``image_neighbors_from_t2t`` maps
its caption→caption neighbours to images (and ``image_neighbors_from_i2t`` the image→caption
ones of a teacher whose store lacks ``i2i``).
"""
from __future__ import annotations

import math

import numpy as np

# Image rows per block when mapping caption neighbours to images (bounds the temporary arrays).
MAP_BLOCK_ROWS = 65536


def plan_epoch(usable_images: np.ndarray, neighbors: np.ndarray | None, batch_size: int,
               hard_fraction: float, seed: int, epoch: int,
               hard_per_anchor: int = 1) -> list[np.ndarray]:
    """Full batches of image rows for one epoch (``len(usable_images) // batch_size`` of them).

    ``usable_images``: the image rows that may be trained on (distinct, ``0 ≤ row < N``).
    ``neighbors [N, k]``: each image row's nearest image rows, nearest first, ``-1`` = none; rows
    outside ``usable_images`` are never placed in a batch. It may be None when ``hard_fraction``
    is 0. Deterministic in ``(seed, epoch)``; see the module docstring for the construction.
    """
    n_rows = _check_args(usable_images, neighbors, batch_size, hard_fraction, seed, epoch,
                         hard_per_anchor)
    # Sorted first: the plan depends on the set of usable rows, not on the order they came in.
    usable = np.sort(np.asarray(usable_images, dtype=np.int64))
    order = np.random.default_rng([seed, epoch]).permutation(usable)
    n_batches = len(order) // batch_size
    n_hard = min(int(round(hard_fraction * batch_size)), batch_size - 1)  # keep >= 1 anchor
    if n_hard == 0:  # plain shuffle: no bookkeeping needed
        return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
    n_random = batch_size - n_hard
    n_anchors = min(n_random, math.ceil(n_hard / hard_per_anchor))
    # A row is available while it is usable and not yet placed this epoch.
    available = np.zeros(n_rows, dtype=bool)
    available[usable] = True
    cursor = _Cursor(order, available)
    batches = []
    for _ in range(n_batches):
        random_rows = cursor.take(n_random)
        hard = _hard_rows(neighbors[random_rows[:n_anchors]], available, n_hard, hard_per_anchor)
        available[hard] = False
        fill = cursor.take(n_hard - len(hard))
        batches.append(np.concatenate([random_rows, hard, fill]))
    return batches


def _check_args(usable_images, neighbors, batch_size, hard_fraction, seed, epoch,
                hard_per_anchor) -> int:
    """Validate ``plan_epoch``'s arguments; returns the number of image rows ``N``."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (in-batch negatives), "
                         f"got {batch_size!r}")
    if not 0.0 <= hard_fraction < 1.0:
        raise ValueError(f"hard_fraction must lie in [0, 1) (a batch needs random anchors), "
                         f"got {hard_fraction!r}")
    if hard_per_anchor < 1:
        raise ValueError(f"hard_per_anchor must be >= 1, got {hard_per_anchor!r}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed!r}, epoch={epoch!r}")
    usable = np.asarray(usable_images)
    if usable.ndim != 1 or not np.issubdtype(usable.dtype, np.integer):
        raise ValueError(f"usable_images must be a 1-d integer array of image rows, got "
                         f"shape {usable.shape} dtype {usable.dtype}")
    if len(usable) < batch_size:
        raise ValueError(f"only {len(usable)} usable images, fewer than batch_size={batch_size}: "
                         "lower train.batch_size or add data")
    if hard_fraction > 0 and neighbors is None:
        raise ValueError("hard_fraction > 0 needs the image→image neighbour array "
                         "(i2i_topk_idx of the `neighbors` stage)")
    n_rows = int(usable.max()) + 1 if neighbors is None else _check_neighbors(neighbors)
    if usable.min() < 0 or usable.max() >= n_rows:
        raise ValueError(f"usable_images holds rows outside [0, {n_rows}) "
                         "(the neighbour array's rows)")
    if len(np.unique(usable)) != len(usable):
        raise ValueError("usable_images holds a row more than once")
    return n_rows


def _check_neighbors(neighbors: np.ndarray) -> int:
    if neighbors.ndim != 2 or not np.issubdtype(neighbors.dtype, np.integer):
        raise ValueError(f"neighbors must be a [N, k] integer array of image rows, got shape "
                         f"{neighbors.shape} dtype {neighbors.dtype}")
    n_rows = neighbors.shape[0]
    if _outside(neighbors, n_rows):
        raise ValueError(f"neighbors holds rows outside [-1, {n_rows}): it must index the same "
                         "image rows as usable_images (-1 = none)")
    return n_rows


def _outside(neighbors, n_rows: int, rows: int = MAP_BLOCK_ROWS) -> bool:
    """Whether any neighbour lies outside ``[-1, n_rows)``, read a block of rows at a time
    (neighbours may be a store read on demand)."""
    for start in range(0, n_rows, rows):
        block = np.asarray(neighbors[start:start + rows])
        if block.size and (block.min() < -1 or block.max() >= n_rows):
            return True
    return False


class _Cursor:
    """Walks a shuffled order once, handing out rows still available (marking them used)."""

    def __init__(self, order: np.ndarray, available: np.ndarray) -> None:
        self.order, self.available, self.pos = order, available, 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` available rows of the order; rows placed as hard negatives are skipped."""
        taken: list[np.ndarray] = []
        need = n
        while need > 0:
            # Look a bit past `need` in one step: most rows ahead are still available.
            window = self.order[self.pos:self.pos + 2 * need + 16]
            if len(window) == 0:
                raise RuntimeError("sampler cursor ran past the end of the epoch")  # cannot happen
            free = np.flatnonzero(self.available[window])[:need]
            taken.append(window[free])
            need -= len(free)
            self.pos += int(free[-1]) + 1 if need == 0 else len(window)
        rows = np.concatenate(taken) if taken else np.empty(0, dtype=self.order.dtype)
        self.available[rows] = False
        return rows


def _hard_rows(candidates: np.ndarray, available: np.ndarray, n_hard: int,
               per_anchor: int) -> np.ndarray:
    """Up to ``n_hard`` distinct available rows from ``candidates [anchors, k]`` (nearest first).

    Priority: the first ``per_anchor`` usable neighbours of every anchor, rank by rank, then the
    anchors' further neighbours, rank by rank.
    """
    ok = candidates >= 0
    ok[ok] = available[candidates[ok]]
    # Rank-major flattening (column by column) so the first occurrence of a shared neighbour
    # goes to whichever anchor ranks it nearer.
    flat_rows, flat_ok = candidates.T.ravel(), ok.T.ravel()
    where = np.flatnonzero(flat_ok)
    _, first = np.unique(flat_rows[where], return_index=True)
    keep = np.zeros_like(flat_ok)
    keep[where[first]] = True
    keep = keep.reshape(candidates.shape[1], candidates.shape[0]).T  # back to [anchors, k]
    ordinal = np.cumsum(keep, axis=1) - 1  # position among an anchor's kept neighbours
    over_cap = (ordinal >= per_anchor).T.ravel()
    ranked = np.flatnonzero(keep.T.ravel())
    ranked = ranked[np.argsort(over_cap[ranked], kind="stable")][:n_hard]
    return flat_rows[ranked]


def hard_negative_rate(batches: list[np.ndarray], neighbors: np.ndarray, top_m: int = 1) -> float:
    """Share of (row, one of its ``top_m`` nearest neighbours) pairs that fall in one batch.

    Only pairs whose two rows are both placed in ``batches`` count. With random batches of size
    ``B`` holding ``M`` rows in all the expectation is ``(B − 1) / (M − 1)``
    (``random_batch_rate``); hard-negative batches raise it.
    """
    _check_neighbors(neighbors)
    if top_m < 1 or top_m > neighbors.shape[1]:
        raise ValueError(f"top_m must lie in [1, {neighbors.shape[1]}], got {top_m}")
    batch_of = np.full(neighbors.shape[0], -1, dtype=np.int64)
    for b, rows in enumerate(batches):
        batch_of[rows] = b
    placed = np.flatnonzero(batch_of >= 0)
    pairs = neighbors[placed, :top_m]
    partner = np.where(pairs >= 0, batch_of[np.maximum(pairs, 0)], -1)
    counted = partner >= 0
    if not counted.any():
        return float("nan")
    same = partner == batch_of[placed][:, None]
    return float(same[counted].mean())


def random_batch_rate(n_placed: int, batch_size: int) -> float:
    """Chance that two given rows share a batch when ``n_placed`` rows are cut at random into
    batches of ``batch_size``: the partner is one of the ``B − 1`` other slots of ``M − 1``."""
    return (batch_size - 1) / (n_placed - 1)


def image_neighbors_from_i2t(i2t_idx: np.ndarray, text_to_image: np.ndarray,
                             k: int | None = None) -> np.ndarray:
    """Image→image neighbours from image→caption ones: each caption replaced by its image,
    the query image itself and repeats dropped, order kept, ``-1``-padded to ``k`` columns
    (default ``i2t_idx.shape[1]``)."""
    n_images = i2t_idx.shape[0]
    return _map_to_images(lambda rows: i2t_idx[rows], text_to_image, n_images,
                          k or i2t_idx.shape[1])


def image_neighbors_from_t2t(t2t_idx: np.ndarray, text_to_image: np.ndarray, n_images: int,
                             k: int | None = None) -> np.ndarray:
    """Image→image neighbours for a text-only teacher, from caption→caption ones.

    An image's candidates are its captions' neighbour lists merged rank by rank (every caption's
    1st neighbour, then every 2nd …), each caption replaced by its image, the image itself and
    repeats dropped, ``-1``-padded to ``k`` columns (default ``t2t_idx.shape[1]``).
    """
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if len(text_to_image) != t2t_idx.shape[0]:
        raise ValueError(f"text_to_image has {len(text_to_image)} rows, t2t_idx {t2t_idx.shape[0]}")
    captions = _captions_by_image(text_to_image, n_images)  # [N_img, c_max], -1 padded

    def candidates(rows: np.ndarray) -> np.ndarray:
        caps = captions[rows]  # [b, c]
        lists = np.where(caps[..., None] >= 0, t2t_idx[np.maximum(caps, 0)], -1)  # [b, c, k]
        return lists.transpose(0, 2, 1).reshape(len(rows), -1)  # rank-major

    return _map_to_images(candidates, text_to_image, n_images, k or t2t_idx.shape[1])


def _captions_by_image(text_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """``[N_img, c_max]`` caption rows of each image, in caption-row order, ``-1``-padded."""
    order = np.argsort(text_to_image, kind="stable")
    counts = np.bincount(text_to_image, minlength=n_images)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(order)) - starts[text_to_image[order]]
    table = np.full((n_images, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    table[text_to_image[order], slot] = order
    return table


def _map_to_images(candidates, text_to_image: np.ndarray, n_images: int, k: int) -> np.ndarray:
    """Apply ``candidates(image rows) -> [b, m] caption rows`` block by block and reduce each
    row to its first ``k`` distinct images other than itself."""
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    out = np.full((n_images, k), -1, dtype=np.int32)
    for start in range(0, n_images, MAP_BLOCK_ROWS):
        rows = np.arange(start, min(start + MAP_BLOCK_ROWS, n_images))
        texts = candidates(rows)
        images = np.where(texts >= 0, text_to_image[np.maximum(texts, 0)], -1)
        images[images == rows[:, None]] = -1
        out[rows] = _first_distinct(images, k)
    return out


def _first_distinct(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first ``k`` distinct non-negative values in their original order, -1 padded."""
    order = np.argsort(values, axis=1, kind="stable")  # equal values keep their column order
    ordered = np.take_along_axis(values, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    drop = np.zeros_like(repeat)
    np.put_along_axis(drop, order, repeat | (ordered < 0), axis=1)
    compact = np.argsort(drop, axis=1, kind="stable")  # kept entries first, in column order
    kept = np.where(np.take_along_axis(drop, compact, axis=1), -1,
                    np.take_along_axis(values, compact, axis=1))
    result = np.full((values.shape[0], k), -1, dtype=values.dtype)
    width = min(k, kept.shape[1])
    result[:, :width] = kept[:, :width]
    return result
