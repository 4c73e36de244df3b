"""Stores: one module per kind of Zarr store the pipeline writes, and what they share.

Each format module holds everything about its store that does not depend on how the store is
computed: the schema (name and version), how an empty store is created, how a published store is
opened with its checks, which rows count as never written, and which root attributes a kept store
must share with a new run to be reused (its *is-current keys*). Readers (training, evaluation,
``distill cache``) and writers go through them; the stages' store runner drives any format
through :class:`StoreFormat`. Modules: :mod:`~pipeline.stores.base` (generic Zarr layout, schemas
and structure checks), :mod:`~pipeline.stores.rows` (rows read on demand), the formats
:mod:`~pipeline.stores.teacher`, :mod:`~pipeline.stores.neighbors` and :mod:`~pipeline.stores.itm`,
and :mod:`~pipeline.stores.inspect` (``distill cache info|verify``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zarr

from pipeline.stores.base import structure_faults


@dataclass(frozen=True)
class StoreFormat:
    """What the store runner needs to know about one format."""

    schema_name: str                    # file under schemas/, e.g. "teacher-cache.v1"
    current_keys: tuple[str, ...]       # root attributes a kept store must share with the run
    create: Callable[..., zarr.Group]   # create(path, attrs, **dims): an empty store
    published_faults: Callable[[Path, zarr.Group], list[str]]  # cheap damage checks of a kept store
    unwritten_faults: Callable[[zarr.Group], list[str]]        # rows no unit wrote (finalise check)
    # is-current keys a store written before they existed lacks, and the value that absence means
    defaults: dict[str, Any] = field(default_factory=dict)

    def current_value(self, attrs: dict[str, Any], key: str) -> Any:
        """Is-current key ``key`` of a store's attributes (its default where absent)."""
        return attrs.get(key, self.defaults.get(key))


@dataclass(frozen=True)
class StoreSpec:
    """One store a run writes: its format, root attributes and dimensions (``create``'s keywords)."""

    format: StoreFormat
    attrs: dict[str, Any]
    dims: dict[str, Any]

    def create(self, path: Path) -> zarr.Group:
        """Create the empty store at ``path``."""
        return self.format.create(path, self.attrs, **self.dims)


def structure_then_rows(rows: Callable[[zarr.Group], list[str]]) -> Callable[[Path, zarr.Group], list[str]]:
    """A format's ``published_faults``: the cheap structure checks (fingerprints, layout, shard
    files), then, when they pass, ``rows(group)`` (rows left at their fill values)."""
    def faults(store: Path, group: zarr.Group) -> list[str]:
        found = structure_faults(store, group)
        if found:
            return found
        try:
            return rows(group)
        except ValueError as exc:  # a chunk fails its checksum
            return [f"unreadable: {exc}"]
    return faults
