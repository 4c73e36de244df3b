"""Stage ``neighbors``: exact top-k neighbours of a teacher cache, for hard negatives.

For each split and each direction the teacher supports (image→text ``i2t``, text→image ``t2i``,
image→image ``i2i``, text→text ``t2t``) it stores ``{dir}_topk_idx [N, k] int32`` and
``{dir}_topk_sim [N, k] float16``, sorted by descending similarity, ties to the lower row.
Single-modal directions leave the query itself out. Invalid rows are never returned as
neighbours; an invalid query row gets ``-1`` indices. Rows are computed in units of one Zarr
shard of queries, with memory bounded by the top-k's blocks, and resume like ``teach``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from pipeline.cache import (Layout, TeacherCache, base_attrs, create_array, open_group_checked,
                            row_units, validate_attrs, write_unit)
from pipeline.errors import CacheError
from pipeline.fingerprint import fingerprint
from pipeline.progress import progress_task
from pipeline.scratch import ScratchRun, creating
from pipeline.topk import blocked_topk

DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image"),
              "i2i": ("image", "image"), "t2t": ("text", "text")}


@dataclass(frozen=True)
class NeighborsConfig:
    """Parameters of the ``neighbors`` stage (``params.yaml`` section ``neighbors``)."""

    teacher: str = "demo_clip"                             # key of `teachers` whose caches are indexed
    k: int = 32                                            # neighbours kept per row
    splits: tuple[str, ...] = ("train",)                   # splits to index (hard negatives: train)
    directions: tuple[str, ...] = ("i2t", "t2i", "i2i", "t2t")  # those the teacher lacks are skipped
    cache_root: str = "caches"                             # teacher stores: <cache_root>/<name>/<split>.zarr
    out_root: str = "caches/neighbors"                     # output: <out_root>/<name>/<split>.zarr
    block_rows: int = 4096                                 # top-k block size (bounds memory)
    rows_per_shard: int = 16384                            # query rows per Zarr shard = unit of work


def supported_directions(cfg: NeighborsConfig, cache: TeacherCache) -> list[str]:
    """The configured directions whose two modalities the teacher embedded."""
    unknown = sorted(set(cfg.directions) - set(DIRECTIONS))
    if unknown:
        raise ValueError(f"unknown neighbour direction(s) {unknown}; known: {sorted(DIRECTIONS)}")
    return [d for d in cfg.directions if set(DIRECTIONS[d]) <= cache.modalities]


def topk_unit(cache: TeacherCache, direction: str, start: int, stop: int, k: int,
              block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k for query rows ``[start, stop)`` of one direction."""
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


def _build_split(cache: TeacherCache, cfg: NeighborsConfig, scratch: ScratchRun, split: str,
                 directions: list[str], advance: Callable) -> None:
    path = scratch.staging / f"{split}.zarr"
    layout = Layout(cfg.rows_per_shard, min(256, cfg.rows_per_shard))
    if not path.exists():
        with creating(path) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for d in directions:
                n = len(getattr(cache, f"{DIRECTIONS[d][0]}_emb"))
                create_array(group, f"{d}_topk_idx", (n, cfg.k), "int32", layout, -1)
                create_array(group, f"{d}_topk_sim", (n, cfg.k), "float16", layout, np.nan)
            group.attrs.update(_attrs(cache, cfg, split, directions))
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for d in directions:
        n = group[f"{d}_topk_idx"].shape[0]
        for start, stop in row_units(n, cfg.rows_per_shard):
            unit = f"{split}-{d}-{start:012d}"
            if not scratch.is_done(unit):
                idx, sim = topk_unit(cache, d, start, stop, cfg.k, cfg.block_rows)
                write_unit(group, start, stop, {f"{d}_topk_idx": idx,
                                                f"{d}_topk_sim": sim.astype(np.float16)})
                os.sync()  # data on disk before the done marker
                scratch.mark_done(unit)
            advance(stop - start)
    attrs = dict(group.attrs) | {"complete": True}
    validate_attrs(attrs, "neighbors.v1", str(path))
    group.attrs.update(attrs)


def _attrs(cache: TeacherCache, cfg: NeighborsConfig, split: str, directions: list[str]) -> dict[str, Any]:
    attrs = base_attrs("vlm-distill/neighbors")
    attrs.update(k=cfg.k, directions=directions, source_teacher_fingerprint=cache.teacher_fingerprint,
                 dataset_fingerprint=cache.dataset_fingerprint, split=split)
    validate_attrs(attrs, "neighbors.v1", f"neighbours of {cache.path}")
    return attrs


def run_neighbors(cfg: NeighborsConfig, name: str, progress: bool | None = None) -> dict[str, Any]:
    """Compute the neighbour stores of teacher ``name``'s caches; returns a summary."""
    t0 = time.perf_counter()
    caches = {s: TeacherCache.open(Path(cfg.cache_root) / name / f"{s}.zarr") for s in cfg.splits}
    plan = {s: supported_directions(cfg, c) for s, c in caches.items()}
    out = Path(cfg.out_root) / name
    run_fp = fingerprint({"k": cfg.k, "plan": plan, "rows": cfg.rows_per_shard,
                          "sources": {s: [c.teacher_fingerprint, c.dataset_fingerprint]
                                      for s, c in caches.items()}})
    scratch = ScratchRun(out, run_fp)
    total = sum(len(getattr(c, f"{DIRECTIONS[d][0]}_emb")) for s, c in caches.items() for d in plan[s])
    with progress_task(f"neighbors {name}", total, progress) as advance:
        for split, cache in caches.items():
            _build_split(cache, cfg, scratch, split, plan[split], advance)
    scratch.publish()
    return {"teacher": name, "k": cfg.k, "directions": plan,
            "seconds": round(time.perf_counter() - t0, 3)}


def open_neighbors(path: str | Path) -> dict[str, np.ndarray]:
    """Load a verified neighbour store as ``{array name: array}`` (plus ``attrs``)."""
    path = Path(path)
    group = open_group_checked(path, "neighbors.v1")
    arrays: dict[str, Any] = {name: np.asarray(group[name][:]) for name in group.array_keys()}
    for name, values in arrays.items():
        lost = np.flatnonzero(np.isnan(values).any(axis=1)) if name.endswith("_topk_sim") else []
        if len(lost):  # NaN is the fill value: a shard file of this array is missing
            raise CacheError(f"{path}: {name} rows {lost[:5].tolist()}... read back as fill values: "
                             "a shard file is missing; rerun `distill neighbors` or `dvc checkout`")
    arrays["attrs"] = dict(group.attrs)
    return arrays
