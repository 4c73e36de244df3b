"""blocked_topk against a brute-force float64 full-matrix sort."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.topk import blocked_topk

BACKENDS = ["torch", "faiss"]


def brute_topk(queries, keys, k, key_valid=None, exclude_self=False):
    """Full float64 similarity matrix, per-row sort by (-sim, index), excluded pairs dropped."""
    sims = queries.astype(np.float64) @ keys.astype(np.float64).T
    allowed = np.ones(sims.shape, dtype=bool)
    if key_valid is not None:
        allowed[:, ~key_valid] = False
    if exclude_self:
        np.fill_diagonal(allowed, False)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    sim = np.full((len(queries), k), -np.inf)
    for i in range(len(queries)):
        order = [j for j in np.lexsort((np.arange(len(keys)), -sims[i])) if allowed[i, j]][:k]
        idx[i, :len(order)] = order
        sim[i, :len(order)] = sims[i, order]
    return idx, sim


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    return rng.standard_normal((203, 24)).astype(np.float32), rng.standard_normal((157, 24)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_rows,block_keys", [(4096, 4096), (7, 3), (50, 64), (1, 157), (203, 1)])
def test_matches_brute_force(gaussian, block_rows, block_keys, backend):
    queries, keys = gaussian
    idx, sim = blocked_topk(queries, keys, 10, block_rows=block_rows, block_keys=block_keys, backend=backend)
    ref_idx, ref_sim = brute_topk(queries, keys, 10)
    assert idx.dtype == np.int32 and sim.dtype == np.float32 and idx.shape == (203, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sim, ref_sim, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_rows,block_keys", [(4096, 4096), (13, 17), (5, 2)])
def test_ties_broken_by_lower_index(block_rows, block_keys, backend):
    # small integers: float32 dot products are exact and ties are everywhere
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, size=(120, 4)).astype(np.float32)
    x[60:70] = x[0]  # exact duplicates
    idx, sim = blocked_topk(x, x, 15, block_rows=block_rows, block_keys=block_keys, backend=backend)
    ref_idx, ref_sim = brute_topk(x, x, 15)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sim, ref_sim.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_ties_with_positive_zero(backend):
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    keys = np.array([[0.0, 1.0], [-0.0, 1.0], [0.0, -1.0]], dtype=np.float32)  # all sims are 0
    idx, _ = blocked_topk(queries, keys, 3, block_keys=1, backend=backend)
    np.testing.assert_array_equal(idx, [[0, 1, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_keys", [4096, 9])
def test_invalid_keys_and_exclude_self(block_keys, backend):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((90, 8)).astype(np.float32)
    valid = rng.random(90) > 0.4
    idx, sim = blocked_topk(x, x, 12, block_rows=11, block_keys=block_keys,
                            key_valid=valid, exclude_self=True, backend=backend)
    ref_idx, ref_sim = brute_topk(x, x, 12, key_valid=valid, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    assert not np.any(idx == np.arange(90)[:, None])
    assert valid[idx[idx >= 0]].all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_keys", [4096, 2])
def test_padding_when_fewer_candidates_than_k(block_keys, backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    valid = np.array([True, False, True, True, False, True])
    idx, sim = blocked_topk(x, x, 8, key_valid=valid, exclude_self=True, block_keys=block_keys,
                            backend=backend)
    ref_idx, ref_sim = brute_topk(x, x, 8, key_valid=valid, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_idx)
    assert (idx[:, 4:] == -1).all() and np.isneginf(sim[:, 4:]).all()  # at most 4 valid keys
    assert (idx[valid, 3:] == -1).all()  # valid rows lose themselves too
    np.testing.assert_allclose(sim[idx >= 0], ref_sim[idx >= 0], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_all_padding(backend):
    idx, sim = blocked_topk(np.ones((3, 4), np.float32), np.zeros((0, 4), np.float32), 2, backend=backend)
    assert (idx == -1).all() and np.isneginf(sim).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_input_and_bad_arguments(backend):
    x = np.random.default_rng(4).standard_normal((10, 3)).astype(np.float16)
    idx, _ = blocked_topk(x, x, 3, backend=backend)
    np.testing.assert_array_equal(idx, brute_topk(x.astype(np.float32), x.astype(np.float32), 3)[0])
    with pytest.raises(ValueError, match="k must be"):
        blocked_topk(x, x, 0)
    with pytest.raises(ValueError, match="exclude_self"):
        blocked_topk(x[:5], x, 2, exclude_self=True)
    with pytest.raises(ValueError, match="NaN"):
        blocked_topk(np.full((2, 3), np.nan, np.float32), x, 2)
    with pytest.raises(ValueError, match="key_valid"):
        blocked_topk(x, x, 2, key_valid=np.ones(3, bool))
    with pytest.raises(ValueError, match="unknown top-k backend 'numpy'; known"):
        blocked_topk(x, x, 2, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_rows", [4096, 64, 7])
def test_long_runs_of_ties_across_the_boundary(block_rows, backend):
    # 150 exact duplicates of the queries' best key, more than k + faiss's extra candidates,
    # among integer vectors (exact dot products); invalid keys and self exclusion on top
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 2, size=(400, 16)).astype(np.float32)
    x[100:250] = x[7]
    x[300:] = x[7] * -1  # the opposite direction: the worst similarities tie too
    valid = rng.random(400) > 0.1
    for k in (5, 40):
        idx, sim = blocked_topk(x, x, k, block_rows=block_rows, key_valid=valid, exclude_self=True,
                                backend=backend)
        ref_idx, ref_sim = brute_topk(x, x, k, key_valid=valid, exclude_self=True)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(sim, ref_sim.astype(np.float32))
    far_idx, _ = blocked_topk(-x[:3], x, 10, backend=backend)  # ties at the top for the opposite query
    np.testing.assert_array_equal(far_idx, brute_topk(-x[:3], x, 10)[0])


def test_backends_agree_on_embeddings(gaussian):
    queries, keys = gaussian
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    by = {b: blocked_topk(queries, queries, 16, exclude_self=True, backend=b) for b in BACKENDS}
    np.testing.assert_array_equal(by["torch"][0], by["faiss"][0])
    np.testing.assert_allclose(by["torch"][1], by["faiss"][1], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- keys in blocks

from pipeline.topk import StreamingTopK  # noqa: E402


def streamed(queries, keys, k, cuts, backend, key_valid=None, order=None, **kw):
    """StreamingTopK fed the key blocks between ``cuts``, in ``order``."""
    bounds = list(zip([0, *cuts], [*cuts, len(keys)]))
    search = StreamingTopK(queries, k, backend=backend, **kw)
    for lo, hi in (bounds if order is None else [bounds[i] for i in order]):
        search.add(keys[lo:hi], lo, None if key_valid is None else key_valid[lo:hi])
    return search.result()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cuts,order", [([], None), ([64, 128], None), ([1, 50, 51, 100], [4, 0, 2, 1, 3])])
def test_streamed_keys_equal_the_whole_array_bit_for_bit(gaussian, backend, cuts, order):
    queries, keys = gaussian
    valid = np.random.default_rng(3).random(len(keys)) > 0.2
    whole = blocked_topk(queries, keys, 12, block_rows=64, block_keys=32, key_valid=valid, backend=backend)
    got = streamed(queries, keys, 12, cuts, backend, valid, order, block_rows=64, block_keys=32)
    np.testing.assert_array_equal(got[0], whole[0])
    if backend == "faiss" or all(c % 32 == 0 for c in cuts):  # torch: the same matmul blocks
        assert got[1].tobytes() == whole[1].tobytes()
    else:  # a matmul of another shape may round the last bit otherwise
        np.testing.assert_allclose(got[1], whole[1], rtol=0, atol=1e-5)
    ref_idx, _ = brute_topk(queries, keys, 12, key_valid=valid)
    np.testing.assert_array_equal(got[0], ref_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_ties_and_too_few_keys(backend):
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, size=(90, 4)).astype(np.float32)  # exact float32 products: ties everywhere
    x[40:50] = x[0]
    valid = np.ones(90, bool)
    valid[::3] = False
    got = streamed(x, x, 15, [7, 30, 31, 64], backend, valid, [3, 1, 4, 0, 2])
    ref_idx, ref_sim = brute_topk(x, x, 15, key_valid=valid)
    np.testing.assert_array_equal(got[0], ref_idx)
    np.testing.assert_array_equal(got[1], ref_sim.astype(np.float32))
    idx, sim = streamed(x[:5], x[:10], 12, [4], backend, valid[:10])  # 6 allowed keys, k = 12
    assert (idx[:, 6:] == -1).all() and np.isneginf(sim[:, 6:]).all() and (idx[:, :6] >= 0).all()


def test_torch_path_agrees_with_faiss_on_the_same_keys(gaussian):
    # the `neighbors.device: cuda` path is the torch backend; on CPU it must give faiss's lists
    queries, keys = gaussian
    by_torch = streamed(queries, keys, 10, [100], "torch", device="cpu")
    by_faiss = streamed(queries, keys, 10, [100], "faiss")
    np.testing.assert_array_equal(by_torch[0], by_faiss[0])
    np.testing.assert_allclose(by_torch[1], by_faiss[1], rtol=0, atol=1e-5)
