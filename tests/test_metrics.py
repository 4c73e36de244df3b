"""Retrieval metrics against hand-worked examples and an independent brute force (float64, loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import metrics

# ----------------------------------------------------------------------------- brute force


def _ranked(sim_row: np.ndarray) -> list[int]:
    """Indices by descending similarity, ties broken by the lower index."""
    return sorted(range(len(sim_row)), key=lambda d: (-float(sim_row[d]), d))


def brute_ranks(sims: np.ndarray, text_to_image: list[int]) -> tuple[list[int], list[int]]:
    """Ranks from the full float64 matrix: first positive's position in each ranked list."""
    n_img, n_txt = sims.shape
    i2t = []
    for i in range(n_img):
        positives = {j for j in range(n_txt) if text_to_image[j] == i}
        order = _ranked(sims[i])
        hits = [pos for pos, j in enumerate(order) if j in positives]
        i2t.append(hits[0] if hits else -1)
    t2i = [_ranked(sims[:, j]).index(text_to_image[j]) for j in range(n_txt)]
    return i2t, t2i


def brute_recall(ranks: list[int], k: int) -> float:
    scored = [r for r in ranks if r >= 0]
    return 100.0 * sum(r < k for r in scored) / len(scored)


def brute_ndcg(emb: np.ndarray, rel, k: int) -> tuple[float, int]:
    """Mean NDCG@k with linear gain over queries with a relevant item; (mean, n_excluded)."""
    emb = emb.astype(np.float64)
    n = len(emb)
    scores, excluded = [], 0
    for q in range(n):
        others = [d for d in range(n) if d != q]
        sims = {d: float(emb[q] @ emb[d]) for d in others}
        order = sorted(others, key=lambda d: (-sims[d], d))
        gains = [rel(q, d) for d in order[:k]]
        ideal = sorted((rel(q, d) for d in others), reverse=True)[:k]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        if idcg == 0:
            excluded += 1
            continue
        scores.append(dcg / idcg)
    return float(np.mean(scores)), excluded


# ----------------------------------------------------------------------------- hand-worked


# Images I0..I2 (rows) x captions c0..c3 (columns); c0, c1 belong to I0, c2 to I1, c3 to I2.
HAND_SIMS = np.array([
    [0.9, 0.3, 0.5, 0.1],
    [0.8, 0.4, 0.6, 0.7],
    [0.1, 0.6, 0.6, 0.1],
], dtype=np.float32)
HAND_T2I = np.array([0, 0, 1, 2])


def test_recall_hand_example():
    # i2t ranked lists (ties: lower index first):
    #   I0: c0 .9, c2 .5, c1 .3, c3 .1          -> first own caption c0 at rank 0
    #   I1: c0 .8, c3 .7, c2 .6, c1 .4          -> c2 at rank 2
    #   I2: c1 .6, c2 .6, c0 .1, c3 .1          -> c3 ties c0 at .1, c0 goes first -> rank 3
    # t2i ranked lists:
    #   c0: I0 .9, I1 .8, I2 .1 -> I0 rank 0     c1: I2 .6, I1 .4, I0 .3 -> I0 rank 2
    #   c2: I1 .6, I2 .6, I0 .5 -> I1 wins the tie, rank 0
    #   c3: I1 .7, I0 .1, I2 .1 -> I0 wins the tie, I2 rank 2
    # With K = 1, 2, 3: i2t R@K = 1/3, 1/3, 2/3; t2i R@K = 2/4, 2/4, 4/4 (percent below).
    # RSUM = 33.33 + 33.33 + 66.67 + 50 + 50 + 100 = 333.33.
    i2t, t2i = metrics.retrieval_ranks_from_sims(HAND_SIMS, HAND_T2I, block_rows=2, block_cols=3)
    assert i2t.tolist() == [0, 2, 3]
    assert t2i.tolist() == [0, 2, 0, 2]
    out = metrics.summarize_ranks(i2t, t2i, ks=(1, 2, 3))
    assert out["i2t_R@1"] == pytest.approx(100 / 3)
    assert out["i2t_R@2"] == pytest.approx(100 / 3)
    assert out["i2t_R@3"] == pytest.approx(200 / 3)
    assert (out["t2i_R@1"], out["t2i_R@2"], out["t2i_R@3"]) == (50.0, 50.0, 100.0)
    assert out["rsum"] == pytest.approx(1000 / 3)
    # MedR is 1-based: i2t ranks 0, 2, 3 -> median 2 -> MedR 3; t2i 0, 0, 2, 2 -> 1 -> MedR 2.
    assert out["i2t_MedR"] == 3.0 and out["t2i_MedR"] == 2.0


def _unit(deg: list[float]) -> np.ndarray:
    rad = np.deg2rad(np.array(deg, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_ndcg_text_to_text_hand_example():
    # Captions on the unit circle at 0, 10, 30, 65, 110 degrees (similarity falls with the angle).
    # Caption -> image: t0 A, t1 B, t2 A, t3 C, t4 C; labels A cat, B cat, C dog.
    # q=t0: order t1(10) t2(30) t3(65) t4(110), rel 1 2 0 0; DCG = 1 + 2/log2 3 = 2.26186,
    #       ideal 2 1 0 0 -> IDCG = 2 + 1/log2 3 = 2.63093; NDCG = 0.859719
    # q=t1: order t0 t2 t3 t4, rel 1 1 0 0 = ideal -> 1
    # q=t2: order t1(20) t0(30) t3(35) t4(80), rel 1 2 0 0 -> 0.859719
    # q=t3: order t2(35) t4(45) t1(55) t0(65), rel 0 2 0 0; DCG = 2/log2 3 = 1.26186, IDCG = 2
    #       -> 0.630930
    # q=t4: order t3(45) ..., rel 2 0 0 0 -> 1
    # mean = (0.859719 * 2 + 1 + 1 + 0.630930) / 5 = 0.870073
    # With k = 1: 1/2, 1/1, 1/2, 0/2, 2/2 -> mean 0.6.
    emb = _unit([0, 10, 30, 65, 110])
    t2i = np.array([0, 1, 0, 2, 2])
    labels = ["cat", "cat", "dog"]
    out = metrics.ndcg_text_to_text(emb, t2i, labels, k=10)
    assert out["ndcg@10"] == pytest.approx(0.8700734, abs=1e-6)
    assert (out["n_queries"], out["n_excluded"]) == (5, 0)
    assert "rel = 2" in out["definition"]
    assert metrics.ndcg_text_to_text(emb, t2i, labels, k=1)["ndcg@1"] == pytest.approx(0.6)


def test_ndcg_image_to_image_hand_example():
    # Images at 0, 20, 50, 105, 130 degrees; labels cat, dog, cat, None, dog.
    # q=i0 cat: order i1 i2 i3 i4, rel 0 1 0 0 -> DCG = 1/log2 3 = 0.630930, IDCG = 1
    # q=i1 dog: order i0(20) i2(30) i3(85) i4(110), rel 0 0 0 1 -> 1/log2 5 = 0.430677
    # q=i2 cat: order i1(30) i0(50) i3(55) i4(80), rel 0 1 0 0 -> 0.630930
    # q=i3 (no label): no relevant item -> excluded and counted
    # q=i4 dog: order i3(25) i2(80) i1(110) i0(130), rel 0 0 1 0 -> 1/log2 4 = 0.5
    # mean over 4 queries = (0.630930 * 2 + 0.430677 + 0.5) / 4 = 0.548134
    emb = _unit([0, 20, 50, 105, 130])
    out = metrics.ndcg_image_to_image(emb, ["cat", "dog", "cat", None, "dog"])
    assert out["ndcg@10"] == pytest.approx(0.5481340, abs=1e-6)
    assert (out["n_queries"], out["n_excluded"]) == (4, 1)


# ----------------------------------------------------------------------------- brute force


def _tied_problem(seed: int, n_img: int = 23, n_txt: int = 57, dim: int = 3):
    """Small-integer embeddings: dot products are exact in float32 and ties are frequent."""
    rng = np.random.default_rng(seed)
    image_emb = rng.integers(-2, 3, size=(n_img, dim)).astype(np.float32)
    text_emb = rng.integers(-2, 3, size=(n_txt, dim)).astype(np.float32)
    # The last image gets no caption: it must be left out of i2t and counted.
    text_to_image = rng.integers(0, n_img - 1, size=n_txt)
    return image_emb, text_emb, text_to_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_brute_force_with_ties(seed):
    image_emb, text_emb, t2i = _tied_problem(seed)
    sims = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    want_i2t, want_t2i = brute_ranks(sims, t2i.tolist())
    # Odd tile sizes so that tiles straddle positives and ties.
    i2t, t2i_ranks = metrics.retrieval_ranks(image_emb, text_emb, t2i, block_rows=5, block_cols=7)
    assert i2t.tolist() == want_i2t
    assert t2i_ranks.tolist() == want_t2i
    from_sims = metrics.retrieval_ranks_from_sims(sims, t2i, block_rows=4, block_cols=9)
    assert [r.tolist() for r in from_sims] == [want_i2t, want_t2i]

    out = metrics.retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 5, 10), block_rows=6)
    for k in (1, 5, 10):
        assert out[f"i2t_R@{k}"] == pytest.approx(brute_recall(want_i2t, k))
        assert out[f"t2i_R@{k}"] == pytest.approx(brute_recall(want_t2i, k))
    assert out["n_images_without_caption"] == want_i2t.count(-1) >= 1


def test_recall_curve_matches_recall_at_k():
    image_emb, text_emb, t2i = _tied_problem(3)
    i2t, _ = metrics.retrieval_ranks(image_emb, text_emb, t2i)
    curve = metrics.recall_curve(i2t, k_max=30)
    assert curve.shape == (30,)
    for k in range(1, 31):
        assert curve[k - 1] == pytest.approx(brute_recall(i2t.tolist(), k))
    assert np.all(np.diff(curve) >= 0)


def test_ranks_random_unit_embeddings():
    rng = np.random.default_rng(7)
    image_emb = rng.normal(size=(40, 8))
    text_emb = rng.normal(size=(90, 8))
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    t2i = rng.integers(0, 40, size=90)
    want = brute_ranks(image_emb @ text_emb.T, t2i.tolist())
    got = metrics.retrieval_ranks(image_emb, text_emb, t2i, block_rows=16, block_cols=32)
    assert [r.tolist() for r in got] == list(want)


@pytest.mark.parametrize("seed", [0, 1])
def test_ndcg_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_img, n_txt = 15, 40
    labels = [rng.choice(["a", "b", "c", None]) for _ in range(n_img)]
    labels = [None if lab is None else str(lab) for lab in labels]
    t2i = rng.integers(0, n_img, size=n_txt)
    text_emb = rng.integers(-2, 3, size=(n_txt, 3)).astype(np.float32)
    image_emb = rng.integers(-2, 3, size=(n_img, 3)).astype(np.float32)

    def rel_t2t(q: int, d: int) -> int:
        if t2i[q] == t2i[d]:
            return 2
        lq, ld = labels[t2i[q]], labels[t2i[d]]
        return int(lq is not None and lq == ld)

    def rel_i2i(q: int, d: int) -> int:
        return int(labels[q] is not None and labels[q] == labels[d])

    for k in (1, 4, 10):
        want, excluded = brute_ndcg(text_emb, rel_t2t, k)
        got = metrics.ndcg_text_to_text(text_emb, t2i, labels, k=k, block_rows=7)
        assert got[f"ndcg@{k}"] == pytest.approx(want, abs=1e-9)
        assert got["n_excluded"] == excluded
        want, excluded = brute_ndcg(image_emb, rel_i2i, k)
        got = metrics.ndcg_image_to_image(image_emb, labels, k=k, block_rows=4)
        assert got[f"ndcg@{k}"] == pytest.approx(want, abs=1e-9)
        assert got["n_excluded"] == excluded


def test_misaligned_text_to_image_raises():
    with pytest.raises(ValueError, match="text_to_image"):
        metrics.retrieval_ranks(np.zeros((2, 3)), np.zeros((3, 3)), np.array([0, 1, 2]))


# ----------------------------------------------------------------------------- exact duplicates


def _exact_sims(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 dot products of float32 rows (math.fsum of exact products), so
    identical rows get identical similarities whatever the order of summation."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.array([[math.fsum(x * y) for y in b64] for x in a64])


def _duplicated_problem(seed: int):
    """Unit embeddings in 256-d with exact duplicate captions (of other images, above and below
    the positive's row) and exact duplicate images, as identical COCO captions produce."""
    rng = np.random.default_rng(seed)
    n_img, dim = 24, 256
    image_emb = rng.normal(size=(n_img, dim)).astype(np.float32)
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    t2i = np.repeat(np.arange(n_img), 2)
    # Captions are noisy copies of their image; then every 3rd caption is copied onto a caption
    # of another image, before and after it in row order.
    text_emb = image_emb[t2i] + 0.6 / np.sqrt(dim) * rng.normal(size=(len(t2i), dim)).astype(np.float32)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    for j in range(0, len(t2i), 3):
        text_emb[(j + 7) % len(t2i)] = text_emb[j]
        text_emb[(j + 29) % len(t2i)] = text_emb[j]
    image_emb[5] = image_emb[17]   # two identical images: captions of 17 tie on image 5
    image_emb[20] = image_emb[2]
    return image_emb.astype(np.float32), text_emb.astype(np.float32), t2i


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_exact_duplicates_follow_tie_rule_for_any_block_size(seed):
    image_emb, text_emb, t2i = _duplicated_problem(seed)
    sims = _exact_sims(image_emb, text_emb)
    want_i2t, want_t2i = brute_ranks(sims, t2i.tolist())
    # The problem has positives tied exactly with a negative of lower row (which must rank first)
    # and of higher row (which must not), in both directions.
    tied_lower = tied_higher = 0
    for j, i in enumerate(t2i):
        ties = np.flatnonzero((sims[:, j] == sims[i, j]) & (np.arange(len(image_emb)) != i))
        tied_lower += int((ties < i).any())
        tied_higher += int((ties > i).any())
    assert tied_lower and tied_higher
    assert any((sims[i] == sims[i, j]).sum() > 1 for j, i in enumerate(t2i))
    for block_rows, block_cols in [(1, 1), (3, 5), (7, 16), (1024, 16384)]:
        got = metrics.retrieval_ranks(image_emb, text_emb, t2i, block_rows, block_cols)
        assert got[0].tolist() == want_i2t, (block_rows, block_cols)
        assert got[1].tolist() == want_t2i, (block_rows, block_cols)
