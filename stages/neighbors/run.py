"""Stage ``neighbors``: exact top-k neighbours of a teacher cache, for hard negatives.

For each split and each direction the teacher supports (image→text ``i2t``, text→image ``t2i``,
image→image ``i2i``, text→text ``t2t``) it stores ``{dir}_topk_idx [N, k] int32`` and
``{dir}_topk_sim [N, k] float16``, sorted by descending similarity, ties to the lower row
(format: :mod:`pipeline.stores.neighbors`). Single-modal directions leave the query itself out.
Invalid rows are never returned as neighbours; an invalid query row gets ``-1`` indices. A unit
is one Zarr shard of query rows of one direction, with memory bounded by the top-k's blocks; the
store runner (:mod:`stages.runner`) runs units in-process or on Dask, resumes, keeps a current
output, and publishes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import check_settings, setting
from pipeline.fingerprint import fingerprint
from pipeline.stores import StoreSpec
from pipeline.stores import neighbors as neighbors_format
from pipeline.stores.base import Layout
from pipeline.stores.teacher import TeacherCache
from stages.executors import DaskConfig, ExecutorName, check_executor, open_executor
from stages.runner import StoreJob, Unit, run_store_stage, shard_units

DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image"),
              "i2i": ("image", "image"), "t2t": ("text", "text")}


@dataclass(frozen=True)
class NeighborsConfig:
    """Parameters of the ``neighbors`` stage (``params.yaml`` section ``neighbors``)."""

    teacher: str = "demo_clip"                             # key of `teachers` whose caches are indexed
    k: int = setting(32, minimum=1)                        # neighbours kept per row
    splits: tuple[str, ...] = setting(("train",), min_items=1)  # splits to index (hard negatives: train)
    directions: tuple[Literal["i2t", "t2i", "i2i", "t2t"], ...] = setting(
        ("i2t", "t2i", "i2i", "t2t"), min_items=1)         # those the teacher lacks are skipped
    cache_root: str = "caches"                             # teacher stores: <cache_root>/<name>/<split>.zarr
    out_root: str = "caches/neighbors"                     # output: <out_root>/<name>/<split>.zarr
    block_rows: int = setting(4096, minimum=1)             # top-k block size (bounds memory)
    rows_per_shard: int = setting(16384, minimum=1)        # query rows per Zarr shard = unit of work
    executor: ExecutorName = "inprocess"                   # inprocess | dask (units as Dask tasks)
    dask: DaskConfig = field(default_factory=DaskConfig)   # the cluster, when executor is dask

    def __post_init__(self) -> None:
        check_settings(self, "neighbors")


def supported_directions(cfg: NeighborsConfig, cache: TeacherCache) -> list[str]:
    """The configured directions whose two modalities the teacher embedded."""
    unknown = sorted(set(cfg.directions) - set(DIRECTIONS))
    if unknown:
        raise ValueError(f"unknown neighbour direction(s) {unknown}; known: {sorted(DIRECTIONS)}")
    return [d for d in cfg.directions if set(DIRECTIONS[d]) <= cache.modalities]


def topk_unit(cache: TeacherCache, direction: str, start: int, stop: int, k: int,
              block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k for query rows ``[start, stop)`` of one direction."""
    from pipeline.topk import blocked_topk

    q_kind, k_kind = DIRECTIONS[direction]
    queries = getattr(cache, f"{q_kind}_emb")[start:stop]
    keys = getattr(cache, f"{k_kind}_emb")
    key_valid = getattr(cache, f"{k_kind}_valid")
    same = q_kind == k_kind
    idx, sim = blocked_topk(queries, keys, k + int(same), block_rows=block_rows, key_valid=key_valid)
    if same:  # drop the query itself (or, when absent, the extra last neighbour)
        idx, sim = _drop_self(idx, sim, np.arange(start, stop), k)
    q_valid = getattr(cache, f"{q_kind}_valid")[start:stop]
    idx[~q_valid] = -1
    sim[~q_valid] = -np.inf
    return idx.astype(np.int32), sim


def _drop_self(idx: np.ndarray, sim: np.ndarray, self_rows: np.ndarray, k: int):
    """From top-(k+1) lists, remove each row's own index, keeping k entries in order."""
    is_self = idx == self_rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False  # self not among them: drop the (k+1)-th instead
    return idx[keep].reshape(-1, k), sim[keep].reshape(-1, k)


_OPEN: dict[tuple[str, str, str], TeacherCache] = {}  # teacher caches read in this process


def open_cache_once(path: Path, teacher_fp: str, dataset_fp: str) -> TeacherCache:
    """The teacher cache at ``path``, read once per process (a Dask worker serves many units)."""
    key = (str(path), teacher_fp, dataset_fp)
    if key not in _OPEN:
        _OPEN.clear()  # one source store at a time: bounded memory
        _OPEN[key] = TeacherCache.open(path, expect_dataset=dataset_fp, expect_teacher=teacher_fp)
    return _OPEN[key]


@dataclass(frozen=True)
class NeighborsWork:
    """The computation of one neighbours unit (one shard of query rows of one direction)."""

    cfg: NeighborsConfig
    sources: dict[str, tuple[str, str, str]]  # split -> (cache path, teacher fp, dataset fp)

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path, teacher_fp, dataset_fp = self.sources[unit.split]
        cache = open_cache_once(Path(path), teacher_fp, dataset_fp)
        idx, sim = topk_unit(cache, unit.part, unit.start, unit.stop, self.cfg.k, self.cfg.block_rows)
        return {f"{unit.part}_topk_idx": idx, f"{unit.part}_topk_sim": sim.astype(np.float16)}, {}


def plan_neighbors(cfg: NeighborsConfig, name: str) -> StoreJob:
    """The neighbours job: one store per split, units per direction and shard of query rows."""
    root = Path(cfg.cache_root).resolve() / name
    caches = {s: TeacherCache.open(root / f"{s}.zarr") for s in cfg.splits}
    plan = {s: supported_directions(cfg, c) for s, c in caches.items()}
    layout = Layout(cfg.rows_per_shard, min(256, cfg.rows_per_shard))
    stores, units, sources = {}, [], {}
    for split, cache in caches.items():
        _OPEN[(str(cache.path), cache.teacher_fingerprint, cache.dataset_fingerprint)] = cache
        sources[split] = (str(cache.path), cache.teacher_fingerprint, cache.dataset_fingerprint)
        rows = {d: len(getattr(cache, f"{DIRECTIONS[d][0]}_emb")) for d in plan[split]}
        attrs = neighbors_format.store_attrs(cfg.k, plan[split], cache.teacher_fingerprint,
                                             cache.dataset_fingerprint, split,
                                             f"neighbours of {cache.path}")
        stores[f"{split}.zarr"] = StoreSpec(neighbors_format.FORMAT, attrs,
                                            dict(rows=rows, layout=layout))
        for d in plan[split]:
            units += shard_units(split, d, rows[d], cfg.rows_per_shard)
    run_fp = fingerprint({"k": cfg.k, "plan": plan, "rows": cfg.rows_per_shard,
                          "sources": {s: [c.teacher_fingerprint, c.dataset_fingerprint]
                                      for s, c in caches.items()}})
    return StoreJob(f"neighbors {name}", Path(cfg.out_root).resolve() / name, run_fp, stores, units,
                    NeighborsWork(cfg, sources), meta={"directions": plan})


def run_neighbors(cfg: NeighborsConfig, name: str, progress: bool | None = None) -> dict[str, Any]:
    """Compute (or resume, or keep) the neighbour stores of teacher ``name``'s caches; returns a
    summary. Holds the output's lock throughout; a concurrent run on the same output is refused.
    """
    t0 = time.perf_counter()
    check_executor(cfg.executor, cfg.dask, "neighbors")
    with open_executor(cfg.executor, cfg.dask, "neighbors") as executor:
        job, result = run_store_stage(Path(cfg.out_root) / name, f"`distill neighbors {name}`",
                                      lambda: plan_neighbors(cfg, name), executor, progress)
    return {"teacher": name, "k": cfg.k, "directions": job.meta["directions"], "up_to_date": result.up_to_date,
            "executor": cfg.executor, **result.counters(),
            "seconds": round(time.perf_counter() - t0, 3)}
