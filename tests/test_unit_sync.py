"""Durability of a unit without a global sync: the runner fsyncs the unit's own shard files and
their directories, before its done marker, and flushes nothing else (no ``os.sync``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.synthetic import write_synthetic_store
from pipeline.stores.base import Layout
from stages.neighbors.run import NeighborsConfig, run_neighbors


def test_units_fsync_their_own_files_before_their_done_markers(tmp_path, monkeypatch):
    layout = Layout(rows_per_shard=64, rows_per_chunk=32)
    write_synthetic_store(tmp_path / "caches" / "syn" / "train.zarr", 150, dim=8, layout=layout)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def no_global_sync() -> None:
        raise AssertionError("os.sync() flushes every other job's dirty pages too")

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setattr(os, "sync", no_global_sync)
    cfg = NeighborsConfig(teacher="syn", k=4, directions=("i2t", "t2t"), cache_root=str(tmp_path / "caches"),
                          out_root=str(tmp_path / "nn"), rows_per_shard=64)
    summary = run_neighbors(cfg, "syn", progress=False)
    assert summary["units_computed"] == 6  # 3 shards of 64 query rows x 2 directions
    staging = tmp_path / "nn" / ".scratch" / "syn" / "staging" / "train.zarr"
    for direction in ("i2t", "t2t"):
        for shard in range(3):
            marker = f"train-{direction}-{shard * 64:012d}.json"
            done_at = next(i for i, p in enumerate(synced) if marker in p)  # its temporary file
            for array in (f"{direction}_topk_idx", f"{direction}_topk_sim"):
                shard_file = str(staging / array / "c" / str(shard) / "0")
                assert shard_file in synced[:done_at], (shard_file, marker)
                assert str(staging / array / "c" / str(shard)) in synced[:done_at]  # its directory
    # nothing outside the run's scratch directory and output was flushed
    assert all(str(tmp_path / "nn") in p for p in synced), [p for p in synced if str(tmp_path / "nn") not in p]
