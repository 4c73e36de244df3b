"""``distill cache info`` and ``distill cache verify``: what a store holds, and whether it is sound."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache import ROW_INVALID, ROW_MISSING, ROW_VALID, store_nbytes, validate_attrs
from pipeline.errors import CacheError

SCHEMAS = {"vlm-distill/teacher-cache": "teacher-cache.v1", "vlm-distill/neighbors": "neighbors.v1"}


def _open(path: Path) -> zarr.Group:
    if not (path / "zarr.json").exists():
        raise CacheError(f"{path}: no Zarr store here (missing zarr.json)")
    return zarr.open_group(str(path), mode="r", zarr_format=3)


def cache_info(path: str | Path) -> dict[str, Any]:
    """Arrays (shape, dtype, chunk and shard shape), attributes, size on disk and row counts."""
    path = Path(path)
    group = _open(path)
    arrays = {
        name: {"shape": list(arr.shape), "dtype": str(arr.dtype),
               "shards": list(arr.shards) if arr.shards else None, "chunks": list(arr.chunks)}
        for name, arr in sorted(group.arrays())
    }
    info: dict[str, Any] = {"path": str(path), "attrs": dict(group.attrs), "arrays": arrays,
                            "bytes_on_disk": store_nbytes(path),
                            "files": sum(1 for p in path.rglob("*") if p.is_file())}
    for kind in ("image", "text"):
        if f"{kind}_status" in group:
            status = group[f"{kind}_status"][:]
            info[f"{kind}_rows"] = {"valid": int((status == ROW_VALID).sum()),
                                    "invalid": int((status == ROW_INVALID).sum()),
                                    "unwritten": int((status == ROW_MISSING).sum())}
    return info


@dataclass
class VerifyReport:
    """Faults found by :func:`verify_cache`; empty ``faults`` means the store is sound."""

    path: Path
    faults: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def verify_cache(path: str | Path, deep: bool = True) -> VerifyReport:
    """Check schema, completeness and every row; ``deep`` also reads every chunk.

    Reading a chunk checks its crc32c (and each shard index's); a missing shard file reads back as
    fill values and shows up as unwritten rows in the status arrays.
    """
    path = Path(path)
    report = VerifyReport(path)
    try:
        group = _open(path)
        attrs = dict(group.attrs)
        validate_attrs(attrs, SCHEMAS.get(attrs.get("schema", ""), "teacher-cache.v1"), str(path))
    except Exception as exc:  # every fault is reported, not raised
        report.faults.append(f"schema: {exc}")
        return report
    report.checked.append("schema")
    if not attrs.get("complete"):
        report.faults.append("store is marked incomplete")
    for name, arr in sorted(group.arrays()):
        _verify_array(report, name, arr, deep)
    return report


def _verify_array(report: VerifyReport, name: str, arr: zarr.Array, deep: bool) -> None:
    if not deep and not name.endswith("_status"):
        return
    step = arr.shards[0] if arr.shards else arr.chunks[0]
    for start in range(0, arr.shape[0], step):
        stop = min(start + step, arr.shape[0])
        try:
            values = arr[start:stop]
        except Exception as exc:  # checksum mismatch, truncated shard, undecodable chunk
            report.faults.append(f"{name} rows [{start}, {stop}): unreadable ({type(exc).__name__}: {exc})")
            continue
        _check_values(report, name, start, stop, values)
    report.checked.append(name)


def _check_values(report: VerifyReport, name: str, start: int, stop: int, values: np.ndarray) -> None:
    if name.endswith("_status"):
        missing = np.flatnonzero(values == ROW_MISSING)
        if missing.size:
            report.faults.append(
                f"{name} rows [{start}, {stop}): {missing.size} rows never written (first row "
                f"{start + int(missing[0])}; a shard file is missing or the run did not finish)")
    elif name.endswith("_emb") or name.endswith("_topk_sim"):
        # NaN is the fill value of these arrays: rows of a lost shard read back as NaN
        bad = ~np.isfinite(values) if name.endswith("_emb") else np.isnan(values)
        rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
        if rows.size:
            report.faults.append(
                f"{name} rows [{start}, {stop}): {rows.size} rows hold fill values or non-finite "
                f"numbers (first row {start + int(rows[0])}; a shard file is missing or damaged)")
