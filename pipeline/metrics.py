"""Retrieval metrics for dual encoders: cross-modal Recall@K / RSUM and single-modal graded NDCG.

Every function here is pure (numpy arrays in, numbers out) and bounded in memory: similarities are
computed tile by tile (``block_rows`` queries x ``block_cols`` keys), so a 100k-image x 500k-caption
test set never materialises the full similarity matrix.

Conventions shared by every metric:

* similarity is the dot product of the given embeddings (L2-normalised embeddings give cosine);
* a ranked list is ordered by descending similarity, ties broken by the lower key index (stable);
* ranks are 0-based: rank 0 is the first item of the list, so "in the top K" means ``rank < K``;
* Recall@K is reported in percent (0-100) and RSUM is the sum of the six Recall@K values for
  K in ``ks`` over both directions (600 at most with the default K = 1, 5, 10); NDCG is in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

NDCG_DEFINITION = (
    "NDCG@k with linear gain: DCG@k(q) = sum_{r=1..k} rel(q, d_r) / log2(r + 1) over the k most "
    "similar items d_1..d_k (the query itself excluded; ties broken by lower index); "
    "IDCG@k(q) = the same sum over the ideal ordering of all relevances for q; NDCG = DCG / IDCG, "
    "averaged over queries with at least one relevant item (the others are excluded and counted). "
    "image->image: rel = 1 if the two images share a label, else 0. "
    "text->text: rel = 2 if d is another caption of the same image, 1 if d is a caption of a "
    "different image with the same label, else 0. Items without a label share no label."
)


# ----------------------------------------------------------------------------- recall

# Tiles of a query block: yields (key indices [m], similarities [rows, m]) blocks that together
# cover every key once. Both passes of the ranking read the same tiles, so a positive and the
# negatives it is compared with come from the very same computed values.
TileFn = Callable[[slice], Iterator[tuple[np.ndarray, np.ndarray]]]


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of ``x`` (bitwise) and, per row, the index of its distinct row."""
    x = np.ascontiguousarray(x)
    if len(x) == 0 or x.shape[1] == 0:
        return x[:1], np.zeros(len(x), dtype=np.int64)
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return x[first], inverse.ravel().astype(np.int64)


def _embedding_tiles(queries: np.ndarray, keys: np.ndarray, block_cols: int) -> TileFn:
    """Tiles of ``queries @ keys.T`` in float32, computed on demand.

    Identical key rows are computed once (as one distinct row) and their similarity is copied to
    every duplicate, so exact duplicates tie exactly: a matrix product may round the same dot
    product differently at different positions of its output, which would let a duplicate
    caption rank ahead of the positive it copies, depending on the block size.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    distinct, inverse = _unique_rows(np.ascontiguousarray(keys, dtype=np.float32))
    order = np.argsort(inverse, kind="stable")   # keys grouped by their distinct row
    sorted_uid = inverse[order]

    def tiles(rows: slice) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for u0 in range(0, len(distinct) if len(keys) else 0, block_cols):
            u1 = min(u0 + block_cols, len(distinct))
            lo, hi = np.searchsorted(sorted_uid, [u0, u1])
            sims = q[rows] @ distinct[u0:u1].T
            yield order[lo:hi], sims[:, sorted_uid[lo:hi] - u0]
    return tiles


def _matrix_tiles(block: Callable[[slice, slice], np.ndarray], n_keys: int, block_cols: int) -> TileFn:
    """Tiles read from a precomputed similarity matrix (``block(rows, cols)``)."""
    def tiles(rows: slice) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for c0 in range(0, n_keys, block_cols):
            c1 = min(c0 + block_cols, n_keys)
            yield np.arange(c0, c1), block(rows, slice(c0, c1))
    return tiles


def _best_positive(tile: TileFn, n_queries: int, query_group: np.ndarray, key_group: np.ndarray,
                   block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: similarity and index of its best positive key (ties: lower index), read from
    the tiles. Queries without any positive get index -1."""
    best_sim = np.full(n_queries, -np.inf, dtype=np.float64)  # holds float32 values exactly
    best_idx = np.full(n_queries, -1, dtype=np.int64)
    no_key = np.iinfo(np.int64).max
    for r0 in range(0, n_queries, block_rows):
        rows = slice(r0, min(r0 + block_rows, n_queries))
        g = query_group[rows, None]
        for key_idx, sims in tile(rows):
            pos = key_group[key_idx][None, :] == g
            has = pos.any(axis=1)
            if not has.any():
                continue
            masked = np.where(pos, sims, -np.inf)
            top = masked.max(axis=1)
            first = np.where(pos & (masked == top[:, None]), key_idx[None, :], no_key).min(axis=1)
            cur_sim, cur_idx = best_sim[rows], best_idx[rows]
            better = has & ((cur_idx < 0) | (top > cur_sim) | ((top == cur_sim) & (first < cur_idx)))
            cur_sim[better], cur_idx[better] = top[better], first[better]
    return best_sim, best_idx


def _ranks_by_counting(
    tile: TileFn,
    n_queries: int,
    query_group: np.ndarray,
    key_group: np.ndarray,
    block_rows: int,
) -> np.ndarray:
    """0-based rank of each query's best positive: the number of negatives ordered before it.

    A key is positive for a query when ``key_group[key] == query_group[query]``. Positives are
    never counted, so the result is the position of the first positive in the ranked list (every
    item before the best positive is a negative). Queries without a positive get rank -1.
    """
    best_sim, best_idx = _best_positive(tile, n_queries, query_group, key_group, block_rows)
    ranks = np.zeros(n_queries, dtype=np.int64)
    for r0 in range(0, n_queries, block_rows):
        rows = slice(r0, min(r0 + block_rows, n_queries))
        s = best_sim[rows, None]
        b = best_idx[rows, None]
        g = query_group[rows, None]
        for key_idx, sims in tile(rows):
            before = (sims > s) | ((sims == s) & (key_idx[None, :] < b))
            before &= key_group[None, key_idx] != g
            ranks[rows] += before.sum(axis=1)
    ranks[best_idx < 0] = -1
    return ranks


def _check_alignment(n_images: int, n_texts: int, text_to_image: np.ndarray) -> np.ndarray:
    """Validate ``text_to_image`` against the row counts; return it as int64."""
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_image has shape {t2i.shape}, expected ({n_texts},)")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError(f"text_to_image values must lie in [0, {n_images}); "
                         f"got [{t2i.min()}, {t2i.max()}]")
    return t2i


def _ranks(tile_i2t: TileFn, tile_t2i: TileFn, t2i: np.ndarray, n_images: int,
           block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Both directions' ranks, given the tile providers of each direction."""
    image_idx = np.arange(n_images)
    i2t = _ranks_by_counting(tile_i2t, n_images, query_group=image_idx, key_group=t2i,
                             block_rows=block_rows)
    t2i_ranks = _ranks_by_counting(tile_t2i, len(t2i), query_group=t2i, key_group=image_idx,
                                   block_rows=block_rows)
    return i2t, t2i_ranks


def retrieval_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    block_rows: int = 1024,
    block_cols: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks for image->text and text->image retrieval, computed in tiles.

    Returns ``(i2t_ranks [N_img], t2i_ranks [N_txt])``. ``i2t_ranks[i]`` is the position of the
    first of image i's captions in its ranked caption list (-1 if the image has no caption), so
    "hit at K" means any of its captions is in the top K. ``t2i_ranks[j]`` is the position of
    caption j's one image. Positives and negatives are compared on the same computed float32
    similarities, and identical embeddings get identical similarities, so the lower-row tie rule
    holds for exact duplicates whatever the block sizes. Each tile is computed twice (once to find
    the best positive, once to count what ranks ahead of it); peak extra memory is about
    ``block_rows x block_cols`` floats.
    """
    t2i = _check_alignment(len(image_emb), len(text_emb), text_to_image)
    img = np.ascontiguousarray(image_emb, dtype=np.float32)
    txt = np.ascontiguousarray(text_emb, dtype=np.float32)
    return _ranks(_embedding_tiles(img, txt, block_cols), _embedding_tiles(txt, img, block_cols),
                  t2i, len(img), block_rows)


def retrieval_ranks_from_sims(sims: np.ndarray, text_to_image: np.ndarray,
                              block_rows: int = 1024, block_cols: int = 16384
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`retrieval_ranks` but from a precomputed ``[N_img, N_txt]`` similarity matrix."""
    sims = np.asarray(sims)
    t2i = _check_alignment(sims.shape[0], sims.shape[1], text_to_image)
    return _ranks(_matrix_tiles(lambda r, c: sims[r, c], sims.shape[1], block_cols),
                  _matrix_tiles(lambda r, c: sims[c, r].T, sims.shape[0], block_cols),
                  t2i, sims.shape[0], block_rows)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Recall@K in percent for each K; queries with rank -1 (no positive) are left out."""
    valid = ranks[ranks >= 0]
    if len(valid) == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): 100.0 * float(np.mean(valid < k)) for k in ks}


def recall_curve(ranks: np.ndarray, k_max: int) -> np.ndarray:
    """Recall@K in percent for K = 1..k_max (element K-1), for the Recall@K plot."""
    valid = ranks[ranks >= 0]
    if len(valid) == 0:
        return np.full(k_max, np.nan)
    hits = np.bincount(np.minimum(valid, k_max), minlength=k_max + 1)[:k_max]
    return 100.0 * np.cumsum(hits) / len(valid)


def summarize_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray,
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Flat metrics dict from ranks: ``i2t_R@K``, ``t2i_R@K``, ``rsum``, median ranks, counts.

    Median ranks are 1-based (MedR = 1 means the positive is usually first), as in the literature.
    """
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k, value in recall_at_k(ranks, ks).items():
            out[f"{direction}_R@{k}"] = value
        valid = ranks[ranks >= 0]
        out[f"{direction}_MedR"] = float(np.median(valid) + 1) if len(valid) else float("nan")
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks))
    out["n_images"] = int(len(i2t_ranks))
    out["n_texts"] = int(len(t2i_ranks))
    out["n_images_without_caption"] = int(np.sum(i2t_ranks < 0))
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS, block_rows: int = 1024,
                      block_cols: int = 16384) -> dict[str, float]:
    """Image->text and text->image Recall@K (percent), RSUM and MedR from embeddings.

    i2t: a hit at K if ANY of the image's captions is in the top K captions; t2i: a hit if the
    caption's one image is in the top K images. See the module docstring for the tie rule.
    """
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, block_rows, block_cols)
    return summarize_ranks(i2t, t2i, ks)


# ----------------------------------------------------------------------------- NDCG


def encode_labels(labels: Sequence[str | None]) -> np.ndarray:
    """Integer codes for labels; ``None`` (no label) becomes -1 and matches nothing."""
    codes: dict[str, int] = {}
    return np.array([-1 if lab is None else codes.setdefault(lab, len(codes)) for lab in labels],
                    dtype=np.int64)


def _relevant_counts(group: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item: how many OTHER items share its group, and how many share its label but not group."""
    _, g_inv, g_count = np.unique(group, return_inverse=True, return_counts=True)
    n_group = g_count[g_inv] - 1
    labelled = label >= 0
    n_label = np.zeros(len(label), dtype=np.int64)
    if labelled.any():
        _, l_inv, l_count = np.unique(label[labelled], return_inverse=True, return_counts=True)
        pairs = np.stack([group[labelled], label[labelled]], axis=1)
        _, p_inv, p_count = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
        n_label[labelled] = l_count[l_inv] - p_count[p_inv.ravel()]
    return n_group, n_label


def _ideal_dcg(n_group: np.ndarray, n_label: np.ndarray, k: int,
               group_gain: float, label_gain: float) -> np.ndarray:
    """IDCG@k when the n_group items of gain group_gain come first, then n_label of label_gain."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    cum = np.concatenate([[0.0], np.cumsum(discount)])  # cum[m] = sum of the first m discounts
    top_g = np.minimum(n_group, k)
    top_gl = np.minimum(n_group + n_label, k)
    return group_gain * cum[top_g] + label_gain * (cum[top_gl] - cum[top_g])


def graded_ndcg(emb: np.ndarray, group: np.ndarray, label: np.ndarray, k: int = 10,
                group_gain: float = 2.0, label_gain: float = 1.0,
                block_rows: int = 4096) -> dict[str, float]:
    """Leave-one-out NDCG@k within one modality, with graded relevance.

    rel(q, d) = ``group_gain`` if d is in q's group (another caption of the same image), else
    ``label_gain`` if d has q's label (label >= 0), else 0. Every item is a query against all
    other items. Returns ``ndcg@k``, ``n_queries`` (scored) and ``n_excluded`` (no relevant item).
    """
    from pipeline.topk import blocked_topk

    group = np.asarray(group, dtype=np.int64)
    label = np.asarray(label, dtype=np.int64)
    n_group, n_label = _relevant_counts(group, label)
    idcg = _ideal_dcg(n_group, n_label, k, group_gain, label_gain)
    scored = idcg > 0
    out = {f"ndcg@{k}": float("nan"), "n_queries": int(scored.sum()),
           "n_excluded": int((~scored).sum())}
    if len(emb) < 2 or not scored.any():
        return out
    emb32 = np.ascontiguousarray(emb, dtype=np.float32)
    topk_idx, _ = blocked_topk(emb32, emb32, min(k, len(emb) - 1), block_rows=block_rows,
                               exclude_self=True)
    topk_idx = topk_idx.astype(np.int64)
    found = topk_idx >= 0
    safe = np.where(found, topk_idx, 0)
    same_group = group[safe] == group[:, None]
    same_label = (label[safe] == label[:, None]) & (label[:, None] >= 0)
    rel = np.where(same_group, group_gain, np.where(same_label, label_gain, 0.0)) * found
    discount = 1.0 / np.log2(np.arange(2, topk_idx.shape[1] + 2))
    dcg = rel @ discount
    out[f"ndcg@{k}"] = float(np.mean(dcg[scored] / idcg[scored]))
    return out


def ndcg_image_to_image(image_emb: np.ndarray, image_labels: Sequence[str | None],
                        k: int = 10, block_rows: int = 4096) -> dict:
    """image->image NDCG@k: rel = 1 if the two images share a label (see ``NDCG_DEFINITION``)."""
    label = encode_labels(image_labels)
    # Each image is its own group, so the group gain never applies (the query is excluded).
    out = graded_ndcg(image_emb, np.arange(len(label)), label, k, group_gain=1.0,
                      label_gain=1.0, block_rows=block_rows)
    out["definition"] = NDCG_DEFINITION
    return out


def ndcg_text_to_text(text_emb: np.ndarray, text_to_image: np.ndarray,
                      image_labels: Sequence[str | None], k: int = 10,
                      block_rows: int = 4096) -> dict:
    """text->text NDCG@k: rel = 2 same image, 1 same label (other image), 0 otherwise."""
    t2i = _check_alignment(len(image_labels), len(text_emb), text_to_image)
    label = encode_labels(image_labels)[t2i] if len(t2i) else np.zeros(0, np.int64)
    out = graded_ndcg(text_emb, t2i, label, k, group_gain=2.0, label_gain=1.0,
                      block_rows=block_rows)
    out["definition"] = NDCG_DEFINITION
    return out
