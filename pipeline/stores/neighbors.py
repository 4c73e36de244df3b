"""Neighbour store format (schema ``neighbors.v1``): top-k neighbours of one teacher store.

For each direction (``i2t``, ``t2i``, ``i2i``, ``t2t``) the store holds ``{dir}_topk_idx [N, k]
int32`` and ``{dir}_topk_sim [N, k] float16``, sorted by descending similarity, ties to the lower
row. ``method`` says how they were found: ``exact`` (every key; a store without the attribute
was written before it existed and is exact) or ``ivf`` (an approximate index, its parameters in
``method_params``, and ``recall``: the measured recall@k against exact search per direction, on
``recall_queries`` random queries). Fill values are chosen to be caught: a lost shard reads back as NaN similarities, or index -1
beside a similarity that is not -inf (the only legitimate -1 is an empty slot, similarity -inf).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.data.manifest import Manifest
from pipeline.errors import CacheError, FingerprintMismatchError
from pipeline.fingerprint import fingerprint
from pipeline.stores import StoreFormat, structure_then_rows
from pipeline.stores.base import (Layout, base_attrs, check_fingerprint, create_array,
                                  open_group_checked, raise_faults, read_array, structure_faults,
                                  validate_attrs)
from pipeline.stores.location import location
from pipeline.stores.rows import DEFAULT_CACHE_BYTES, RowReader, paired_blocks

SCHEMA_NAME = "neighbors.v1"
SCHEMA_ID = "vlm-distill/neighbors"
SCHEMA_VERSION = 1
CURRENT_KEYS = ("schema", "schema_version", "k", "directions", "source_teacher_fingerprint",
                "dataset_fingerprint", "split", "method", "method_params")
DEFAULTS = {"method": "exact"}  # stores written before the attribute existed hold exact lists


def store_attrs(k: int, directions: list[str], source_teacher_fingerprint: str,
                dataset_fingerprint: str, split: str, where: str, method: str = "exact",
                method_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Root attributes of a new (still incomplete) neighbour store."""
    attrs = base_attrs(SCHEMA_ID) | dict(
        k=k, directions=list(directions), source_teacher_fingerprint=source_teacher_fingerprint,
        dataset_fingerprint=dataset_fingerprint, split=split, method=method)
    if method_params is not None:
        attrs["method_params"] = dict(method_params)
    validate_attrs(attrs, SCHEMA_NAME, where)
    return attrs


def create(path: Path, attrs: dict[str, Any], *, rows: dict[str, int], layout: Layout) -> zarr.Group:
    """An empty neighbour store; ``rows``: query rows per direction."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for d in attrs["directions"]:
        create_array(group, f"{d}_topk_idx", (rows[d], attrs["k"]), "int32", layout, -1)
        create_array(group, f"{d}_topk_sim", (rows[d], attrs["k"]), "float16", layout, np.nan)
    group.attrs.update(attrs)
    return group


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


def unwritten_faults(group: zarr.Group) -> list[str]:
    """Rows of any direction that still hold fill values (read a shard at a time: bounded memory)."""
    faults = []
    for d in group.attrs["directions"]:
        idx, sim = group[f"{d}_topk_idx"], group[f"{d}_topk_sim"]
        step = idx.shards[0] if idx.shards else idx.chunks[0]
        for start in range(0, idx.shape[0], max(1, step)):
            rows = {f"{d}_topk_idx": np.asarray(idx[start:start + step]),
                    f"{d}_topk_sim": np.asarray(sim[start:start + step])}
            found = topk_row_faults(rows, d, start)
            if found:
                faults += found
                break
    return faults


def open_neighbors(path: str | Path, expect_teacher: str | None = None,
                   expect_dataset: str | None = None, *, lazy: bool = False,
                   cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, Any]:
    """Load a verified neighbour store as ``{array name: array}`` (plus ``attrs``).

    Runs the cheap checks of ``distill cache verify``: schema, completeness, the expected source
    teacher and dataset fingerprints (when given), array layout, every shard file present, every
    chunk's checksum (all arrays are read), and no row read back as fill values. ``lazy``: the
    arrays are :class:`~pipeline.stores.rows.RowReader` views (rows read on demand); the same checks
    run over the store block by block, so memory stays bounded.
    """
    path = location(path)
    group = open_group_checked(path, SCHEMA_NAME)
    attrs = dict(group.attrs)
    hint = "rebuild it with `distill neighbors` (or `dvc repro`) from the cache you use"
    check_fingerprint("source teacher", path, expect_teacher, attrs["source_teacher_fingerprint"], hint)
    check_fingerprint("dataset", path, expect_dataset, attrs["dataset_fingerprint"], hint)
    raise_faults(path, structure_faults(path, group))
    if lazy:
        arrays: dict[str, Any] = {name: RowReader(path, name, cache_bytes=cache_bytes)
                                  for name in group.array_keys()}
        raise_faults(path, [f for d in attrs["directions"] for f in _block_faults(arrays, d)])
        arrays["attrs"] = attrs
        return arrays
    arrays = {name: read_array(group, name, path) for name in group.array_keys()}
    raise_faults(path, [f for d in attrs["directions"] for f in topk_row_faults(arrays, d)])
    arrays["attrs"] = attrs
    return arrays


def _block_faults(arrays: dict[str, RowReader], direction: str) -> list[str]:
    """:func:`topk_row_faults` of one direction, read block by block (the first faulty block's)."""
    idx, sim = arrays[f"{direction}_topk_idx"], arrays[f"{direction}_topk_sim"]
    for start, (idx_block, sim_block) in paired_blocks(idx, sim):
        faults = topk_row_faults({idx.name: idx_block, sim.name: sim_block}, direction, start)
        if faults:
            return faults
    return []


published_faults = structure_then_rows(unwritten_faults)  # a kept store
FORMAT = StoreFormat(SCHEMA_NAME, CURRENT_KEYS, create, published_faults, unwritten_faults, DEFAULTS)


@dataclass(frozen=True)
class Candidates:
    """The first k image→text neighbours of one split, with the fingerprint of what they are."""

    path: Path
    idx: np.ndarray               # [N_images, k] int32
    fingerprint: str
    source_teacher_fingerprint: str


def _open_i2t(path: Path, k: int, dual: str) -> tuple[zarr.Group, zarr.Array]:
    """The neighbour store's ``i2t_topk_idx``, refusing a store without it or with < k columns."""
    group = open_group_checked(path, "neighbors.v1")
    if "i2t_topk_idx" not in group:
        raise CacheError(f"{path}: no i2t_topk_idx array: the neighbours of {dual!r} were built "
                         "without the i2t direction; add i2t to neighbors.directions and rerun "
                         "`distill neighbors`")
    arr = group["i2t_topk_idx"]
    if arr.shape[1] < k:
        raise CacheError(f"{path}: i2t_topk_idx holds {arr.shape[1]} neighbours per image but "
                         f"itm.k is {k}; lower itm.k to at most {arr.shape[1]} or set neighbors.k "
                         f">= {k} and rerun `distill neighbors`")
    return group, arr


def candidate_rows(path: str | Path, start: int, stop: int, k: int) -> np.ndarray:
    """``i2t_topk_idx[start:stop, :k]`` of a store :func:`load_candidates` checked (a unit's
    candidates, read where the unit runs)."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return np.asarray(group["i2t_topk_idx"][start:stop, :k], dtype=np.int32)


def load_candidates(path: str | Path, k: int, manifest: Manifest, dual: str = "") -> Candidates:
    """Read and check the first ``k`` image→text neighbours of ``manifest``'s split."""
    path = Path(path)
    group, arr = _open_i2t(path, k, dual)
    attrs = dict(group.attrs)
    if attrs["dataset_fingerprint"] != manifest.fingerprint:
        raise FingerprintMismatchError("dataset", str(path), manifest.fingerprint,
                                       attrs["dataset_fingerprint"],
                                       "rerun `distill teach` and `distill neighbors` on this dataset")
    idx = np.asarray(arr[:, :k], dtype=np.int32)
    sim = np.asarray(group["i2t_topk_sim"][:, :k])
    if idx.shape[0] != manifest.n_images:
        raise CacheError(f"{path}: {idx.shape[0]} image rows but the dataset has {manifest.n_images}")
    lost = np.flatnonzero(np.isnan(sim).any(axis=1))
    if lost.size:  # NaN is the similarity fill value: a shard file of the store is missing
        raise CacheError(f"{path}: i2t rows {lost[:5].tolist()} read back as fill values: a shard "
                         "file is missing; rerun `distill neighbors` or `dvc checkout`")
    if idx.size and (idx.max() >= manifest.n_texts or idx.min() < -1):
        raise CacheError(f"{path}: i2t_topk_idx holds text rows outside [0, {manifest.n_texts}): "
                         "the store does not belong to this dataset; rerun `distill neighbors`")
    digest = hashlib.sha256(idx.astype("<i4").tobytes()).hexdigest()
    source = attrs["source_teacher_fingerprint"]
    fp = fingerprint({"dataset_fingerprint": manifest.fingerprint, "k": k,
                      "source_teacher_fingerprint": source, "i2t_cand_idx_sha256": digest})
    return Candidates(path, idx, fp, source)
