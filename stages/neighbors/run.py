"""Stage ``neighbors``: top-k neighbours of a teacher cache, for hard negatives.

For each split and each direction the teacher supports (image→text ``i2t``, text→image ``t2i``,
image→image ``i2i``, text→text ``t2t``) it stores ``{dir}_topk_idx [N, k] int32`` and
``{dir}_topk_sim [N, k] float16``, sorted by descending similarity, ties to the lower row
(format: :mod:`pipeline.stores.neighbors`). Single-modal directions leave the query itself out.
Invalid rows are never returned as neighbours; an invalid query row gets ``-1`` indices.

``method: exact`` (the default) searches every key; ``ivf`` searches a faiss IVF index built
once per run from the keys (in the run's scratch directory, shared by every unit and kept when
the run resumes) and measures its recall@k against exact search on ``recall_queries`` random
queries per direction, recorded in the store and the summary (:mod:`pipeline.knn`).

A unit is one Zarr shard of query rows of one direction. The teacher store is never loaded
whole: a unit reads its query rows, then the keys one block of ``key_block_rows`` at a time
(exact), so memory does not grow with the store. The store runner (:mod:`stages.runner`) runs
units in-process or on Dask, resumes, keeps a current output, and publishes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import DEVICE_PATTERN, check_settings, setting
from pipeline.fingerprint import fingerprint
from pipeline.stores import StoreSpec
from pipeline.stores import neighbors as neighbors_format
from pipeline.stores.base import Layout
from pipeline.stores.location import location, store_root
from pipeline.stores.teacher import TeacherCache
from stages.executors import DaskConfig, ExecutorName, check_executor, open_executor
from stages.runner import StoreJob, Unit, run_store_stage, shard_units

DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image"),
              "i2i": ("image", "image"), "t2t": ("text", "text")}


@dataclass(frozen=True)
class IvfConfig:
    """The IVF index of ``neighbors.method: ivf`` (``neighbors.ivf``)."""

    nlist: int = setting(1024, minimum=1)        # inverted lists (k-means centroids); ~sqrt(N) to 4 sqrt(N)
    nprobe: int = setting(32, minimum=1)         # lists searched per query: recall against time
    train_rows: int = setting(65536, minimum=1)  # keys sampled to train the centroids
    seed: int = 0                                # of that sample, k-means and the recall queries

    def __post_init__(self) -> None:
        check_settings(self, "neighbors.ivf")


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
    key_block_rows: int = setting(65536, minimum=1)        # keys read from the store at a time (bounds memory)
    rows_per_shard: int = setting(16384, minimum=1)        # query rows per Zarr shard = unit of work
    method: Literal["exact", "ivf"] = "exact"              # exact: every key; ivf: approximate (faiss IVF)
    ivf: IvfConfig = field(default_factory=IvfConfig)      # the index, when method is ivf
    recall_queries: int = setting(1000, minimum=1)         # ivf: random queries per direction whose
                                                           # recall@k against exact search is measured
    device: str = setting("cpu", pattern=DEVICE_PATTERN)   # exact search: cpu (faiss) or cuda[:N]
                                                           # (torch on the GPU); auto = cuda when present
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


def _rows(cache: TeacherCache, kind: str) -> Any:
    """The ``kind`` embeddings of a lazily opened cache (view 0 of a store with views)."""
    return getattr(cache, f"{kind}_emb")


def topk_unit(cache: TeacherCache, direction: str, start: int, stop: int, cfg: "NeighborsConfig",
              index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for query rows ``[start, stop)`` of one direction: exact over the keys read a block
    at a time, or from ``index`` (an :class:`~pipeline.knn.IvfIndex` of the key rows)."""
    q_kind, _ = DIRECTIONS[direction]
    queries = np.asarray(_rows(cache, q_kind)[start:stop], dtype=np.float32)
    idx, sim = _search(cache, direction, queries, np.arange(start, stop), cfg, index)
    q_valid = getattr(cache, f"{q_kind}_valid")[start:stop]
    idx[~q_valid] = -1
    sim[~q_valid] = -np.inf
    return idx.astype(np.int32), sim


def search_device(cfg: "NeighborsConfig") -> str:
    """The exact search's device (``auto``: cuda when a GPU is visible, else cpu); a CUDA device
    where none is visible is a :class:`~pipeline.errors.ConfigError`."""
    import torch

    from pipeline.devices import resolve_device
    from pipeline.errors import ConfigError

    device = resolve_device(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"neighbors.device: {cfg.device!r} but no CUDA device is visible here; "
                          "use cpu (faiss) or auto")
    if device == "mps":
        raise ConfigError("neighbors.device: mps is not supported; use cpu or cuda")
    return device


def _drop_self(idx: np.ndarray, sim: np.ndarray, self_rows: np.ndarray, k: int):
    """From top-(k+1) lists, remove each row's own index, keeping k entries in order."""
    is_self = idx == self_rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False  # self not among them: drop the (k+1)-th instead
    return idx[keep].reshape(-1, k), sim[keep].reshape(-1, k)


_OPEN: dict[tuple[str, str, str], TeacherCache] = {}  # teacher caches read in this process
_INDEX: dict[str, Any] = {}  # IVF indexes loaded in this process, by file


def open_cache_once(path: Path, teacher_fp: str, dataset_fp: str) -> TeacherCache:
    """The teacher cache at ``path``, opened lazily once per process (a Dask worker serves many
    units): ids, statuses and rows are read on demand, every chunk checked as it is read."""
    key = (str(path), teacher_fp, dataset_fp)
    if key not in _OPEN:
        _OPEN.clear()  # one source store at a time
        _OPEN[key] = TeacherCache.open(path, expect_dataset=dataset_fp, expect_teacher=teacher_fp,
                                       lazy=True, verify=False)
    return _OPEN[key]


def index_once(path: Path, params: Any) -> Any:
    """The IVF index saved at ``path`` by the run's setup, loaded once per process."""
    from pipeline.knn import IvfIndex

    if str(path) not in _INDEX:
        _INDEX.clear()
        _INDEX[str(path)] = IvfIndex.from_bytes(path.read_bytes(), params)
    return _INDEX[str(path)]


def ivf_params(cfg: "NeighborsConfig") -> Any:
    """The index parameters of ``cfg`` (what the store records)."""
    from pipeline.knn import IvfParams

    return IvfParams(cfg.ivf.nlist, cfg.ivf.nprobe, cfg.ivf.train_rows, cfg.ivf.seed)


@dataclass(frozen=True)
class NeighborsWork:
    """The computation of one neighbours unit (one shard of query rows of one direction)."""

    cfg: NeighborsConfig
    sources: dict[str, tuple[str, str, str]]  # split -> (cache path, teacher fp, dataset fp)
    index_dir: str = ""                       # ivf: <scratch>/index/<split>-<key kind>.faiss

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path, teacher_fp, dataset_fp = self.sources[unit.split]
        cache = open_cache_once(location(path), teacher_fp, dataset_fp)
        index = None
        if self.cfg.method == "ivf":
            key_kind = DIRECTIONS[unit.part][1]
            index = index_once(Path(self.index_dir) / f"{unit.split}-{key_kind}.faiss", ivf_params(self.cfg))
        idx, sim = topk_unit(cache, unit.part, unit.start, unit.stop, self.cfg, index)
        return {f"{unit.part}_topk_idx": idx, f"{unit.part}_topk_sim": sim.astype(np.float16)}, {}


@dataclass
class IvfSetup:
    """The driver's work before the units of an ``ivf`` run: build each split's index of each
    key modality once (kept in the scratch directory, so a resumed run reuses it), and measure
    recall@k against exact search on random queries of every direction."""

    cfg: NeighborsConfig
    work: NeighborsWork
    plan: dict[str, list[str]]
    recall: dict[str, dict[str, float]] = field(default_factory=dict)
    recall_queries: dict[str, int] = field(default_factory=dict)

    def __call__(self, scratch_dir: Path) -> None:
        from pipeline.knn import IvfIndex
        from pipeline.scratch import write_durable

        index_dir = Path(self.work.index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        for split, directions in self.plan.items():
            cache = open_cache_once(location(self.work.sources[split][0]), *self.work.sources[split][1:])
            for kind in sorted({DIRECTIONS[d][1] for d in directions}):
                path = index_dir / f"{split}-{kind}.faiss"
                if not path.exists():
                    index = IvfIndex.build(_rows(cache, kind), getattr(cache, f"{kind}_valid"),
                                           ivf_params(self.cfg), self.cfg.key_block_rows)
                    write_durable(path, index.to_bytes())
                    _INDEX.clear()
                    _INDEX[str(path)] = index
            self.recall[split] = {d: self._recall(cache, split, d) for d in directions}

    def _recall(self, cache: TeacherCache, split: str, direction: str) -> float:
        """recall@k of the index against exact search, on random valid query rows."""
        from pipeline.knn import recall_at_k

        q_kind, k_kind = DIRECTIONS[direction]
        valid = np.flatnonzero(getattr(cache, f"{q_kind}_valid"))
        rng = np.random.default_rng([self.cfg.ivf.seed, list(DIRECTIONS).index(direction)])
        rows = np.sort(rng.choice(valid, size=min(self.cfg.recall_queries, valid.size), replace=False))
        self.recall_queries[split] = len(rows)
        index = index_once(Path(self.work.index_dir) / f"{split}-{k_kind}.faiss", ivf_params(self.cfg))
        approx, exact = (_topk_rows(cache, direction, rows, self.cfg, i) for i in (index, None))
        return round(recall_at_k(approx, exact), 6)

    def final_attrs(self, store: str, infos: list[dict[str, Any]]) -> dict[str, Any]:
        """The measured recall, into the store's attributes."""
        split = store.removesuffix(".zarr")
        return {"recall": self.recall.get(split, {}), "recall_queries": self.recall_queries.get(split, 0)}


def _topk_rows(cache: TeacherCache, direction: str, rows: np.ndarray, cfg: NeighborsConfig,
               index: Any) -> np.ndarray:
    """The top-k lists of arbitrary query ``rows`` (the recall sample), as the units find them."""
    queries = np.asarray(_rows(cache, DIRECTIONS[direction][0])[rows], dtype=np.float32)
    return _search(cache, direction, queries, rows, cfg, index)[0]


def _search(cache: TeacherCache, direction: str, queries: np.ndarray, rows: np.ndarray,
            cfg: "NeighborsConfig", index: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` (the cache's query ``rows``): exact, or from ``index``; a
    single-modal direction drops the query itself (or, when absent, the extra last neighbour)."""
    from pipeline.knn import exact_topk

    q_kind, k_kind = DIRECTIONS[direction]
    k = cfg.k + int(q_kind == k_kind)
    if index is not None:
        idx, sim = index.search(queries, k)
    else:
        idx, sim = exact_topk(queries, _rows(cache, k_kind), getattr(cache, f"{k_kind}_valid"), k,
                              block_rows=cfg.block_rows, key_block_rows=cfg.key_block_rows,
                              device=search_device(cfg))
    if q_kind == k_kind:
        idx, sim = _drop_self(idx, sim, rows, cfg.k)
    return idx, sim


def plan_neighbors(cfg: NeighborsConfig, name: str) -> StoreJob:
    """The neighbours job: one store per split, units per direction and shard of query rows."""
    from pipeline.scratch import scratch_dir

    root = store_root(cfg.cache_root) / name
    out = store_root(cfg.out_root) / name
    caches = {s: TeacherCache.open(root / f"{s}.zarr", lazy=True, verify=False) for s in cfg.splits}
    plan = {s: supported_directions(cfg, c) for s, c in caches.items()}
    layout = Layout(cfg.rows_per_shard, min(256, cfg.rows_per_shard))
    method_params = ivf_params(cfg).attrs() if cfg.method == "ivf" else None
    stores, units, sources = {}, [], {}
    for split, cache in caches.items():
        _OPEN[(str(cache.path), cache.teacher_fingerprint, cache.dataset_fingerprint)] = cache
        sources[split] = (str(cache.path), cache.teacher_fingerprint, cache.dataset_fingerprint)
        rows = {d: len(_rows(cache, DIRECTIONS[d][0])) for d in plan[split]}
        attrs = neighbors_format.store_attrs(cfg.k, plan[split], cache.teacher_fingerprint,
                                             cache.dataset_fingerprint, split,
                                             f"neighbours of {cache.path}", cfg.method, method_params)
        stores[f"{split}.zarr"] = StoreSpec(neighbors_format.FORMAT, attrs,
                                            dict(rows=rows, layout=layout))
        for d in plan[split]:
            units += shard_units(split, d, rows[d], cfg.rows_per_shard)
    run_fp = fingerprint({"k": cfg.k, "plan": plan, "rows": cfg.rows_per_shard, "method": cfg.method,
                          "method_params": method_params,
                          "sources": {s: [c.teacher_fingerprint, c.dataset_fingerprint]
                                      for s, c in caches.items()}})
    work = NeighborsWork(cfg, sources, str(scratch_dir(out) / "index"))
    job = StoreJob(f"neighbors {name}", out, run_fp, stores, units, work, meta={"directions": plan})
    if cfg.method == "ivf":
        setup = IvfSetup(cfg, work, plan)
        job.setup, job.final_attrs, job.meta["ivf"] = setup, setup.final_attrs, setup
    return job


def run_neighbors(cfg: NeighborsConfig, name: str, progress: bool | None = None) -> dict[str, Any]:
    """Compute (or resume, or keep) the neighbour stores of teacher ``name``'s caches; returns a
    summary. Holds the output's lock throughout; a concurrent run on the same output is refused.
    """
    t0 = time.perf_counter()
    check_executor(cfg.executor, cfg.dask, "neighbors")
    device = search_device(cfg)  # refused before any work when absent
    with open_executor(cfg.executor, cfg.dask, "neighbors") as executor:
        job, result = run_store_stage(location(cfg.out_root) / name, f"`distill neighbors {name}`",
                                      lambda: plan_neighbors(cfg, name), executor, progress)
    summary = {"teacher": name, "k": cfg.k, "method": cfg.method, "device": device,
               "directions": job.meta["directions"], "up_to_date": result.up_to_date,
               "executor": cfg.executor, **result.counters(),
               "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.method == "ivf":
        summary["ivf"] = ivf_params(cfg).attrs()
        summary["recall"] = ({s.removesuffix(".zarr"): a.get("recall", {}) for s, a in result.kept_attrs.items()}
                             if result.up_to_date else job.meta["ivf"].recall)
    return summary
