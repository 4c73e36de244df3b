"""Stage ``neighbors``: exact top-k neighbours of a teacher cache, for hard negatives.

For each split and each direction the teacher supports (image→text ``i2t``, text→image ``t2i``,
image→image ``i2i``, text→text ``t2t``) it stores ``{dir}_topk_idx [N, k] int32`` and
``{dir}_topk_sim [N, k] float16``, sorted by descending similarity, ties to the lower row.
Single-modal directions leave the query itself out. Invalid rows are never returned as
neighbours; an invalid query row gets ``-1`` indices. Rows are computed in units of one Zarr
shard of queries, with memory bounded by the top-k's blocks, and resume like ``teach`` (one
writer per output, held by :func:`pipeline.lock.output_lock`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import zarr

from pipeline.cache import (Layout, TeacherCache, base_attrs, check_fingerprint, create_array,
                            open_group_checked, raise_faults, read_array, row_units,
                            structure_faults, validate_attrs, write_unit)
from pipeline.config import check_settings, setting
from pipeline.fingerprint import fingerprint
from pipeline.lock import output_lock
from pipeline.progress import progress_task
from pipeline.scratch import ScratchRun, creating, disk_full_errors, recover_replaced

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
    from pipeline.topk import blocked_topk  # torch: imported here, `cache verify` imports this module

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
    """Compute the neighbour stores of teacher ``name``'s caches; returns a summary.

    Holds the output's lock throughout; a concurrent run on the same output is refused.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out_root) / name
    with output_lock(out, f"`distill neighbors {name}`"):
        recover_replaced(out)
        caches = {s: TeacherCache.open(Path(cfg.cache_root) / name / f"{s}.zarr") for s in cfg.splits}
        plan = {s: supported_directions(cfg, c) for s, c in caches.items()}
        run_fp = fingerprint({"k": cfg.k, "plan": plan, "rows": cfg.rows_per_shard,
                              "sources": {s: [c.teacher_fingerprint, c.dataset_fingerprint]
                                          for s, c in caches.items()}})
        total = sum(len(getattr(c, f"{DIRECTIONS[d][0]}_emb")) for s, c in caches.items()
                    for d in plan[s])
        with disk_full_errors(out, out.parent / ".scratch" / out.name):
            scratch = ScratchRun(out, run_fp)
            with progress_task(f"neighbors {name}", total, progress) as advance:
                for split, cache in caches.items():
                    _build_split(cache, cfg, scratch, split, plan[split], advance)
            scratch.publish()
    return {"teacher": name, "k": cfg.k, "directions": plan,
            "seconds": round(time.perf_counter() - t0, 3)}


def open_neighbors(path: str | Path, expect_teacher: str | None = None,
                   expect_dataset: str | None = None) -> dict[str, np.ndarray]:
    """Load a verified neighbour store as ``{array name: array}`` (plus ``attrs``).

    Runs the cheap checks of ``distill cache verify``: schema, completeness, the expected source
    teacher and dataset fingerprints (when given), array layout, every shard file present, every
    chunk's checksum (all arrays are read), and no row read back as fill values.
    """
    path = Path(path)
    group = open_group_checked(path, "neighbors.v1")
    attrs = dict(group.attrs)
    hint = "rebuild it with `distill neighbors` (or `dvc repro`) from the cache you use"
    check_fingerprint("source teacher", path, expect_teacher, attrs["source_teacher_fingerprint"], hint)
    check_fingerprint("dataset", path, expect_dataset, attrs["dataset_fingerprint"], hint)
    raise_faults(path, structure_faults(path, group))
    arrays: dict[str, Any] = {name: read_array(group, name, path) for name in group.array_keys()}
    raise_faults(path, [f for d in attrs["directions"] for f in topk_row_faults(arrays, d)])
    arrays["attrs"] = attrs
    return arrays


def topk_row_faults(arrays: dict[str, np.ndarray], direction: str, offset: int = 0) -> list[str]:
    """Rows of one direction that read back as fill values: a NaN similarity (the fill value),
    or an index of -1 (its fill value) where the similarity is not -inf (the only legitimate
    -1 is an empty neighbour slot, whose similarity is -inf). ``offset``: row of ``arrays[0]``."""
    idx, sim = arrays[f"{direction}_topk_idx"], arrays[f"{direction}_topk_sim"]
    faults = []
    nan = np.flatnonzero(np.isnan(sim).any(axis=1))
    if nan.size:
        faults.append(f"{direction}_topk_sim: {nan.size} rows hold fill values (first row "
                      f"{offset + int(nan[0])}): a shard file is missing or was not written")
    lost = np.flatnonzero(((idx == -1) & ~np.isneginf(sim) & ~np.isnan(sim)).any(axis=1))
    if lost.size:
        faults.append(f"{direction}_topk_idx: {lost.size} rows hold fill values (first row "
                      f"{offset + int(lost[0])}): a shard file is missing or was not written")
    return faults
