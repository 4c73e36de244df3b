"""Neighbours past memory: exact lists from keys read block by block equal the whole-array search
bit for bit; ``ivf`` lists carry their measured recall; consumers read either kind unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import ConfigError
from pipeline.stores.base import ROW_INVALID, Layout
from pipeline.stores.neighbors import load_candidates, open_neighbors
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from pipeline.topk import blocked_topk
from pipeline.training.targets import TargetSources, open_targets
from stages.neighbors.run import DIRECTIONS, IvfConfig, NeighborsConfig, run_neighbors
from tests.test_targets import split  # noqa: F401  (fixture)
from tests.test_train import write_cache

DATASET_FP = "sha256:" + "1" * 64


def store(path: Path, image: np.ndarray, text: np.ndarray, captions: int, layout: Layout,
          invalid: tuple[int, ...] = ()) -> Path:
    n = len(image)
    status = np.ones(n, np.uint8)
    status[list(invalid)] = ROW_INVALID
    image = image.copy()
    image[list(invalid)] = 0
    ids = np.array([f"s.tar/{i:05d}" for i in range(n)])
    return write_cache_from_arrays(
        path, image_ids=ids, text_ids=np.array([f"{i}#{c}" for i in ids for c in range(captions)]),
        text_to_image=np.repeat(np.arange(n), captions), teacher={"teacher": "synthetic"},
        dataset_fingerprint=DATASET_FP, split="train", logit_scale=10.0, image_emb=image,
        text_emb=text, image_status=status, layout=layout)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def whole_array_lists(cache: TeacherCache, direction: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The lists as the stage computed them with the whole store in memory (one search)."""
    q_kind, k_kind = DIRECTIONS[direction]
    q, keys = getattr(cache, f"{q_kind}_emb"), getattr(cache, f"{k_kind}_emb")
    same = q_kind == k_kind
    idx, sim = blocked_topk(q, keys, k + same, key_valid=getattr(cache, f"{k_kind}_valid"))
    if same:
        keep = idx != np.arange(len(q))[:, None]
        keep[keep.all(axis=1), -1] = False
        idx, sim = idx[keep].reshape(-1, k), sim[keep].reshape(-1, k)
    invalid = ~getattr(cache, f"{q_kind}_valid")
    idx[invalid], sim[invalid] = -1, -np.inf
    return idx, sim.astype(np.float16)


def test_keys_read_in_blocks_give_the_whole_array_lists_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    image, text = unit(rng.standard_normal((300, 24))), unit(rng.standard_normal((600, 24)))
    text[100:110] = text[5]  # exact duplicates: ties broken by the lower row
    store(tmp_path / "caches/syn/train.zarr", image, text, 2, Layout(64, 16), invalid=(3, 130))
    cfg = NeighborsConfig(teacher="syn", k=7, cache_root=str(tmp_path / "caches"), out_root=str(tmp_path / "nn"),
                          rows_per_shard=128, block_rows=32, key_block_rows=112)  # 7 chunks a block
    summary = run_neighbors(cfg, "syn", progress=False)
    assert summary["method"] == "exact" and summary["device"] == "cpu"
    nn = open_neighbors(tmp_path / "nn/syn/train.zarr")
    assert nn["attrs"]["method"] == "exact" and "recall" not in nn["attrs"]
    cache = TeacherCache.open(tmp_path / "caches/syn/train.zarr")
    for direction in DIRECTIONS:
        idx, sim = whole_array_lists(cache, direction, 7)
        np.testing.assert_array_equal(nn[f"{direction}_topk_idx"], idx)
        assert nn[f"{direction}_topk_sim"].tobytes() == sim.tobytes()
    # the torch path (what `device: cuda` runs) finds the same lists on this CPU
    torch_cfg = NeighborsConfig(**{**cfg.__dict__, "out_root": str(tmp_path / "nn_torch")})
    from stages.neighbors import run as nn_run
    original = nn_run.search_device
    try:
        nn_run.search_device = lambda c: "cpu"
        import pipeline.knn as knn
        real = knn.StreamingTopK
        knn.StreamingTopK = lambda *a, **kw: real(*a, **{**kw, "backend": "torch"})
        run_neighbors(torch_cfg, "syn", progress=False)
    finally:
        nn_run.search_device, knn.StreamingTopK = original, real
    by_torch = open_neighbors(tmp_path / "nn_torch/syn/train.zarr")
    for direction in DIRECTIONS:
        np.testing.assert_array_equal(by_torch[f"{direction}_topk_idx"], nn[f"{direction}_topk_idx"])


def test_a_cuda_device_without_a_gpu_is_refused_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rng = np.random.default_rng(0)
    store(tmp_path / "caches/syn/train.zarr", unit(rng.standard_normal((20, 8))),
          unit(rng.standard_normal((20, 8))), 1, Layout(8, 4))
    cfg = NeighborsConfig(teacher="syn", k=3, cache_root=str(tmp_path / "caches"), out_root=str(tmp_path / "nn"),
                          device="cuda")
    with pytest.raises(ConfigError, match="neighbors.device: 'cuda' but no CUDA device"):
        run_neighbors(cfg, "syn", progress=False)
    assert not (tmp_path / "nn").exists()


def clustered(n: int, clusters: int, dim: int, seed: int, spread: float = 0.15) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)))


def brute_force(q: np.ndarray, keys: np.ndarray, k: int, same: bool) -> np.ndarray:
    sims = q.astype(np.float64) @ keys.astype(np.float64).T
    if same:
        np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_ivf_recall_is_measured_recorded_and_within_its_bound(tmp_path):
    image = clustered(1500, 30, 16, 1)
    text = unit(image + 0.05 * np.random.default_rng(2).standard_normal(image.shape))  # one caption each
    store(tmp_path / "caches/syn/train.zarr", image, text, 1, Layout(512, 128))
    cfg = NeighborsConfig(teacher="syn", k=10, cache_root=str(tmp_path / "caches"), out_root=str(tmp_path / "nn"),
                          rows_per_shard=512, method="ivf", ivf=IvfConfig(nlist=30, nprobe=6, train_rows=1000),
                          recall_queries=300)
    summary = run_neighbors(cfg, "syn", progress=False)
    nn = open_neighbors(tmp_path / "nn/syn/train.zarr")
    attrs = nn["attrs"]
    assert attrs["method"] == "ivf" and attrs["method_params"] == {"nlist": 30, "nprobe": 6,
                                                                    "train_rows": 1000, "seed": 0}
    assert attrs["recall_queries"] == 300 and summary["recall"]["train"] == attrs["recall"]
    cache = TeacherCache.open(tmp_path / "caches/syn/train.zarr")
    for direction, (qk, kk) in DIRECTIONS.items():
        q, keys = getattr(cache, f"{qk}_emb"), getattr(cache, f"{kk}_emb")
        exact = brute_force(q, keys, 10, qk == kk)
        got = nn[f"{direction}_topk_idx"]
        full = np.mean([np.isin(e, g).mean() for e, g in zip(exact, got)])  # every query, independently
        assert attrs["recall"][direction] >= 0.95 and full >= 0.95, (direction, attrs["recall"], full)
        assert abs(attrs["recall"][direction] - full) < 0.03  # the sample estimates the whole
        sims = nn[f"{direction}_topk_sim"].astype(np.float32)
        assert (np.diff(sims, axis=1) <= 1e-3).all()  # best first
    # too few lists visited: recall drops, and is measured as such (the bound is not assumed)
    low = NeighborsConfig(**{**cfg.__dict__, "ivf": IvfConfig(nlist=30, nprobe=1, train_rows=1000),
                             "out_root": str(tmp_path / "nn_low")})
    low_recall = run_neighbors(low, "syn", progress=False)["recall"]["train"]
    assert min(low_recall.values()) < min(attrs["recall"].values())
    # another method or parameters is not "current": the exact run rebuilds the ivf store
    exact_cfg = NeighborsConfig(**{**cfg.__dict__, "method": "exact"})
    assert run_neighbors(exact_cfg, "syn", progress=False)["units_computed"] > 0
    assert open_neighbors(tmp_path / "nn/syn/train.zarr")["attrs"]["method"] == "exact"


def test_consumers_read_ivf_lists_unchanged(tmp_path, split):  # noqa: F811
    cross = write_cache(tmp_path / "cross" / "train.zarr", split)
    cfg = NeighborsConfig(teacher="cross", k=4, cache_root=str(tmp_path), out_root=str(tmp_path / "nn"),
                          method="ivf", ivf=IvfConfig(nlist=2, nprobe=2, train_rows=64), recall_queries=20)
    summary = run_neighbors(cfg, "cross", progress=False)
    assert set(summary["recall"]["train"]) == {"i2t", "t2i", "i2i", "t2t"}
    store_path = str(tmp_path / "nn" / "cross" / "train.zarr")
    targets = open_targets([str(cross)], split, TargetSources((str(cross),), neighbors=store_path))
    assert targets.topk["i2t_topk_idx"].shape == (split.n_images, 4)  # training: hard negatives
    candidates = load_candidates(store_path, 3, split)  # ITM: its candidates
    assert candidates.idx.shape == (split.n_images, 3)
    # every list holds all the keys here (nprobe = nlist): the exact lists
    exact = NeighborsConfig(**{**cfg.__dict__, "method": "exact", "out_root": str(tmp_path / "exact")})
    run_neighbors(exact, "cross", progress=False)
    group = zarr.open_group(str(tmp_path / "exact/cross/train.zarr"), mode="r")
    np.testing.assert_array_equal(open_neighbors(store_path)["i2t_topk_idx"], group["i2t_topk_idx"][:])
