"""Teacher store format (schema ``teacher-cache.v1``; ``v2`` when a store holds several augmented
views per image, :mod:`pipeline.views`): one Zarr v3 group per teacher and split.

The arrays, layout and reader live in :mod:`pipeline.cache` (:class:`~pipeline.cache.TeacherCache`
opens a store with every cheap check); this module adds what the store runner needs: creation
from attributes and dimensions, the is-current keys, and the damage and completeness checks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from pipeline.cache import Layout, TeacherCache, create_teacher_store, unwritten_rows
from pipeline.formats import StoreFormat, structure_then_rows

SCHEMA_NAME = "teacher-cache.v1"
SCHEMA_VERSION = 1
# Attributes a kept store must share with the run: what changes the stored arrays. `on_bad_image`
# too: a `skip` store may hold invalid rows that `strict` would refuse.
CURRENT_KEYS = ("schema", "schema_version", "teacher_fingerprint", "dataset_fingerprint",
                "rows_per_shard", "on_bad_image", "views", "view_params")

__all__ = ["FORMAT", "SCHEMA_NAME", "TeacherCache", "create", "published_faults", "unwritten_faults"]


def create(path: Path, attrs: dict[str, Any], *, n_images: int, n_texts: int, embed_dim: int,
           modalities: frozenset[str], layout: Layout) -> zarr.Group:
    """An empty teacher store at ``path`` with root attributes ``attrs``."""
    return create_teacher_store(path, n_images=n_images, n_texts=n_texts, embed_dim=embed_dim,
                                modalities=modalities, attrs=attrs, layout=layout,
                                views=int(attrs.get("views", 1)))


def unwritten_faults(group: zarr.Group) -> list[str]:
    """Image or text rows whose status still says never written."""
    faults = []
    for kind in ("image", "text"):
        missing = unwritten_rows(group[f"{kind}_status"][:])
        if missing.size:
            faults.append(f"{missing.size} {kind} rows unwritten (first row {int(missing[0])})")
    return faults


# a kept store: structure, then no row left unwritten
published_faults = structure_then_rows(unwritten_faults)
FORMAT = StoreFormat(SCHEMA_NAME, CURRENT_KEYS, create, published_faults, unwritten_faults)
