"""ITM score store format (schema ``itm-scores.v1``): single-stream teacher scores of each
image's top-k caption candidates, one Zarr v3 group per split.

* ``i2t_cand_idx [N_images, k] int32``: the candidate text rows, in neighbour order (-1: none);
* ``i2t_cand_itm [N_images, k] float32``: the ITM log-odds of "match" of each (image, candidate),
  NaN where the index is -1;
* ``image_status [N_images] uint8``: 1 valid, 2 invalid (an image the dual teacher marked invalid
  or that cannot be decoded: its row is all -1/NaN), 0 never written (caught on open).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.data.manifest import Manifest
from pipeline.errors import CacheError, FingerprintMismatchError
from pipeline.fingerprint import fingerprint
from pipeline.stores import StoreFormat, structure_then_rows
from pipeline.stores.base import (ROW_VALID, Layout, base_attrs, create_array, open_group_checked,
                                  raise_faults, read_array, structure_faults, unwritten_rows,
                                  validate_attrs)
from pipeline.stores.neighbors import Candidates
from pipeline.stores.rows import DEFAULT_CACHE_BYTES, RowReader, paired_blocks

SCHEMA_NAME = "itm-scores.v1"
SCHEMA_ID = "vlm-distill/itm-scores"
SCHEMA_VERSION = 1
CURRENT_KEYS = ("schema", "schema_version", "single_teacher_fingerprint", "neighbors_fingerprint",
                "dataset_fingerprint", "k", "rows_per_shard")


@dataclass(frozen=True)
class ItmScores:
    """A verified ITM score store of one split, loaded into memory (or read on demand: lazy)."""

    path: Path
    cand_idx: Any                 # [N_images, k] int32 text rows; -1 = no candidate
    cand_itm: Any                 # [N_images, k] float32 ITM log-odds; NaN where cand_idx is -1
    image_valid: np.ndarray       # [N_images] bool
    k: int
    dataset_fingerprint: str
    neighbors_fingerprint: str
    single_teacher_fingerprint: str
    source_teacher_fingerprint: str  # the dual-stream teacher the candidates came from
    attrs: dict[str, Any] = field(repr=False)


def create(path: Path, attrs: dict[str, Any], *, n_images: int, layout: Layout) -> zarr.Group:
    """An empty ITM score store of ``n_images`` rows and ``attrs["k"]`` candidates each."""
    k = attrs["k"]
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    create_array(group, "i2t_cand_idx", (n_images, k), "int32", layout, -1)
    create_array(group, "i2t_cand_itm", (n_images, k), "float32", layout, np.nan)
    create_array(group, "image_status", (n_images,), "uint8", layout, 0)
    group.attrs.update(attrs)
    return group


def row_faults(idx: np.ndarray, itm: np.ndarray, status: np.ndarray, offset: int = 0) -> list[str]:
    """Rows never written or read back as fill values (status 0, index -1, score NaN);
    ``offset``: the row number of ``idx[0]``."""
    has = idx >= 0
    bad = (status == 0) | ((status == ROW_VALID) & ((has != np.isfinite(itm)).any(axis=1) | ~has.any(axis=1)))
    rows = np.flatnonzero(bad)
    if not rows.size:
        return []
    return [f"{rows.size} image rows were never written or read back as fill values (first rows "
            f"{(offset + rows[:5]).tolist()})"]


def unwritten_faults(group: zarr.Group) -> list[str]:
    """Image rows whose status still says never written."""
    missing = unwritten_rows(group["image_status"][:])
    return [f"{missing.size} image rows unwritten (first row {int(missing[0])})"] if missing.size else []


def _stored_row_faults(group: zarr.Group) -> list[str]:
    return row_faults(np.asarray(group["i2t_cand_idx"][:]), np.asarray(group["i2t_cand_itm"][:]),
                      np.asarray(group["image_status"][:]))


def open_itm_scores(path: str | Path, expect_dataset: str | None = None, *, lazy: bool = False,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> ItmScores:
    """Open and check one split's ITM score store: schema, completeness, the dataset fingerprint
    (when ``expect_dataset`` is given) and that no row reads back as fill values. ``lazy``: the
    score arrays are :class:`~pipeline.stores.rows.RowReader` views, checked block by block."""
    path = Path(path)
    group = open_group_checked(path, SCHEMA_NAME)
    attrs = dict(group.attrs)
    if expect_dataset is not None and expect_dataset != attrs["dataset_fingerprint"]:
        raise FingerprintMismatchError("dataset", str(path), expect_dataset, attrs["dataset_fingerprint"],
                                       "rerun `distill itm` (or `dvc repro`), or point to the right store")
    raise_faults(path, structure_faults(path, group))  # edited attributes; a lost shard reads as fill
    status = read_array(group, "image_status", path)
    if lazy:
        idx = RowReader(path, "i2t_cand_idx", cache_bytes=cache_bytes)
        itm = RowReader(path, "i2t_cand_itm", cache_bytes=cache_bytes)
        faults = next((f for start, blocks in paired_blocks(idx, itm, status)
                       if (f := row_faults(*blocks, start))), [])
    else:
        idx = read_array(group, "i2t_cand_idx", path).astype(np.int32)
        itm = read_array(group, "i2t_cand_itm", path).astype(np.float32)
        faults = row_faults(idx, itm, status)
    if faults:
        raise CacheError(
            f"{path}: {faults[0]}: a shard file is missing or the run did not finish; restore "
            "the store with `dvc checkout`/`dvc pull` or rebuild it with `distill itm`")
    return ItmScores(path, idx, itm, status == ROW_VALID, int(attrs["k"]),
                     attrs["dataset_fingerprint"], attrs["neighbors_fingerprint"],
                     attrs["single_teacher_fingerprint"], attrs["source_teacher_fingerprint"], attrs)


published_faults = structure_then_rows(_stored_row_faults)  # a kept store
FORMAT = StoreFormat(SCHEMA_NAME, CURRENT_KEYS, create, published_faults, unwritten_faults)


def store_attrs(k: int, rows_per_shard: int, dual: str, split: str, manifest: Manifest,
                cand: Candidates, teacher: dict[str, Any]) -> dict[str, Any]:
    """Root attributes of a split's new (still incomplete) store of ``k`` scores per image;
    ``teacher``: the single-stream teacher's description (fingerprint fields, compute)."""
    attrs = base_attrs(SCHEMA_ID) | dict(
        k=k, split=split, dual=dual, n_images=manifest.n_images,
        n_texts=manifest.n_texts, dataset_fingerprint=manifest.fingerprint,
        neighbors_fingerprint=cand.fingerprint,
        source_teacher_fingerprint=cand.source_teacher_fingerprint,
        single_teacher=teacher["fingerprint"],
        single_teacher_fingerprint=fingerprint(teacher["fingerprint"]),
        rows_per_shard=rows_per_shard, skipped=[],
        compute=teacher["compute"])  # device/autocast: informational only
    validate_attrs(attrs, SCHEMA_NAME, f"ITM scores of {cand.path}")
    return attrs
