"""Teacher store format (schema ``teacher-cache.v1``; ``v2`` when a store holds several augmented
views per image, :mod:`pipeline.views`): one Zarr v3 group per teacher and split.

Arrays: ``image_emb [N, D]`` (``[N, V, D]`` with views) and ``text_emb [M, D]`` float16 (or
bfloat16 bits, or int8 codes with ``*_emb_scale``: ``store_dtype``, :mod:`pipeline.stores.encoding`),
``image_view [N, V, 5]`` (views only), ``image_id``/``text_id`` strings, ``text_to_image [M]``
int32 and the row status arrays ``image_status``/``text_status`` (0 never written, 1 valid,
2 invalid). Here: creating a store (:func:`create_teacher_store`, :func:`teacher_store_attrs`),
writing one from arrays (:func:`write_cache_from_arrays`), opening it with every cheap check
(:class:`TeacherCache`), the chunk checks of lazy readers, and what the store runner needs
(:data:`FORMAT`: is-current keys, damage and completeness checks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import CacheError
from pipeline.stores import StoreFormat, structure_then_rows
from pipeline.stores.base import (ROW_INVALID, ROW_MISSING, ROW_VALID, Kind, Layout, base_attrs,
                                  check_fingerprint, create_array, open_group_checked, raise_faults,
                                  read_array, read_strings, row_units, structure_faults,
                                  unwritten_rows, validate_attrs, write_unit)
from pipeline.stores.encoding import (array_dtype, decode, encode, fill_value, has_scale,
                                      scale_name, store_dtype_of)
from pipeline.stores.location import location
from pipeline.stores.rows import DEFAULT_CACHE_BYTES, RowReader, ViewRows

SCHEMA_NAME = "teacher-cache.v1"
SCHEMA_VERSION = 1
# Attributes a kept store must share with the run: what changes the stored arrays. `on_bad_image`
# too: a `skip` store may hold invalid rows that `strict` would refuse.
CURRENT_KEYS = ("schema", "schema_version", "teacher_fingerprint", "dataset_fingerprint",
                "rows_per_shard", "on_bad_image", "views", "view_params", "store_dtype")

def teacher_schema(attrs: dict[str, Any]) -> str:
    """Schema file of a teacher store: ``teacher-cache.v2`` with several views per image, else v1."""
    return "teacher-cache.v2" if attrs.get("schema_version") == 2 else "teacher-cache.v1"


def teacher_schema_at(path: Path) -> str:
    """Schema file of the teacher store at ``path`` (v1 unless its attributes say v2)."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return "teacher-cache.v1"  # open_group_checked names the fault
    return teacher_schema(attrs)


def create_teacher_store(path: Path, *, n_images: int, n_texts: int, embed_dim: int,
                         modalities: frozenset[str], attrs: dict[str, Any],
                         layout: Layout = Layout(), views: int = 1) -> zarr.Group:
    """Create an empty teacher cache at ``path`` (overwrites); ``attrs`` are the root attributes.

    ``views`` > 1 (schema v2): ``image_emb`` is ``[n_images, views, embed_dim]`` and
    ``image_view [n_images, views, 5]`` holds each view's box and flags (:mod:`pipeline.views`).
    """
    from pipeline.views import VIEW_FIELDS

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    stored = store_dtype_of(attrs)
    for kind, n in (("image", n_images), ("text", n_texts)):
        if kind in modalities:  # fill values decode to NaN: rows of a lost shard cannot pass for embeddings
            shape = (n, views, embed_dim) if kind == "image" and views > 1 else (n, embed_dim)
            create_array(group, f"{kind}_emb", shape, array_dtype(stored), layout, fill_value(stored))
            if has_scale(stored):
                create_array(group, scale_name(f"{kind}_emb"), shape[:-1], "float32", layout, np.nan)
    if views > 1 and "image" in modalities:
        create_array(group, "image_view", (n_images, views, len(VIEW_FIELDS)), "int32", layout, -1)
    create_array(group, "image_id", (n_images,), str, layout)
    create_array(group, "text_id", (n_texts,), str, layout)
    create_array(group, "text_to_image", (n_texts,), "int32", layout, -1)
    create_array(group, "image_status", (n_images,), "uint8", layout, ROW_MISSING)
    create_array(group, "text_status", (n_texts,), "uint8", layout, ROW_MISSING)
    validate_attrs(attrs, teacher_schema(attrs), str(path))
    group.attrs.update(attrs)
    return group


class TeacherCache:
    """A verified, read-only view of one teacher cache.

    Eager (the default): ids and embeddings are loaded into memory, embeddings as float32, as
    stage-1 code (neighbours, align) needs them whole. Lazy (``lazy=True``, what training and
    evaluation use): ids and embeddings are :class:`~pipeline.stores.rows.RowReader` views that read
    rows on demand (float16, as stored), so memory does not grow with the store; only the row
    status and ``text_to_image`` (1 and 4 bytes per row) are loaded.

    Opening runs the cheap checks: schema, completeness, fingerprints, and that no row was left
    unwritten (a deleted shard reads back as fill values; the status arrays catch it).
    """

    def __init__(self, path: Path, group: zarr.Group, lazy: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path, self.lazy, self._cache_bytes = path, lazy, cache_bytes
        self._arrays = frozenset(group.array_keys())
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.logit_scale = float(self.attrs["logit_scale"])
        self.embed_dim = int(self.attrs["embed_dim"])
        self.modalities = frozenset(self.attrs["modalities"])
        self.dataset_fingerprint: str = self.attrs["dataset_fingerprint"]
        self.teacher_fingerprint: str = self.attrs["teacher_fingerprint"]
        self.store_dtype = store_dtype_of(self.attrs)
        self.text_to_image = read_array(group, "text_to_image", path).astype(np.int32)
        self.image_status = read_array(group, "image_status", path)
        self.text_status = read_array(group, "text_status", path)
        self.image_valid = self.image_status == ROW_VALID
        self.text_valid = self.text_status == ROW_VALID
        if lazy:
            self.image_ids = RowReader(path, "image_id", convert=strings_as_objects)
            self.text_ids = RowReader(path, "text_id", convert=strings_as_objects)
        else:
            self.image_ids = read_strings(read_array(group, "image_id", path))
            self.text_ids = read_strings(read_array(group, "text_id", path))
        # Views (schema v2): image_views [N, V, D] and image_view [N, V, 5] (box, flags);
        # image_emb is view 0, the plain image, for every reader that wants one row per image.
        from pipeline.views import ViewSpec

        self.view_spec = ViewSpec.from_attrs(self.attrs)
        self.views = self.view_spec.views
        emb = self._load_emb(group, "image", cache_bytes)
        self.image_views = emb if self.views > 1 else None
        self.image_emb = emb if self.views == 1 or emb is None else (
            ViewRows(emb, 0) if lazy else emb[:, 0])
        self.image_view = None
        if self.views > 1 and "image_view" in group:
            self.image_view = (RowReader(path, "image_view", cache_bytes=cache_bytes,
                                         check=ViewRowsValid(self.image_valid, str(path)))
                               if lazy else read_array(group, "image_view", path))
        self.text_emb = self._load_emb(group, "text", cache_bytes)

    def _load_emb(self, group: zarr.Group, kind: Kind, cache_bytes: int) -> Any:
        if kind not in self.modalities:
            return None
        if self.lazy:  # finiteness of valid rows is checked chunk by chunk as rows are read
            status = getattr(self, f"{kind}_status")
            return RowReader(self.path, f"{kind}_emb", cache_bytes=cache_bytes, stored=self.store_dtype,
                             check=FiniteWhereValid(status, f"{self.path}: {kind}_emb"))
        return read_embeddings(group, f"{kind}_emb", self.path, self.store_dtype).astype(np.float32)

    @classmethod
    def open(cls, path: str | Path, expect_dataset: str | None = None,
             expect_teacher: str | None = None, *, lazy: bool = False, verify: bool = True,
             cache_bytes: int = DEFAULT_CACHE_BYTES) -> "TeacherCache":
        """Open and check a cache; refuse one built from another dataset or teacher.

        The cheap checks of ``distill cache verify`` run here: schema, completeness, fingerprints,
        array layout, every shard file present, no unwritten row. Eager: the arrays are read in
        full, so every chunk's checksum and the finiteness of every valid row are checked too.
        Lazy: with ``verify`` (the default) every chunk is still read once here, a block at a
        time (bounded memory), for those two checks; without it they run on each chunk when it is
        first read (a damaged chunk is then a :class:`CacheError` naming the store, array and
        rows, possibly mid-run: for stores whose copy DVC has just checked).
        """
        path = location(path)
        group = open_group_checked(path, teacher_schema_at(path))
        attrs = dict(group.attrs)
        hint = "rebuild it with `distill teach` (or `dvc repro`), or point to the right cache"
        check_fingerprint("dataset", path, expect_dataset, attrs["dataset_fingerprint"], hint)
        check_fingerprint("teacher", path, expect_teacher, attrs["teacher_fingerprint"], hint)
        raise_faults(path, structure_faults(path, group))
        cache = cls(path, group, lazy=lazy, cache_bytes=cache_bytes)
        cache._check_rows()
        if lazy and verify:
            cache.verify_chunks()
        return cache

    def _check_rows(self) -> None:
        for kind, status in (("image", self.image_status), ("text", self.text_status)):
            emb = None if self.lazy else getattr(self, f"{kind}_views" if kind == "image" and
                                                 self.views > 1 else f"{kind}_emb")
            missing = unwritten_rows(status, emb)
            if missing.size:
                raise CacheError(
                    f"{self.path}: {missing.size} {kind} rows were never written or read back as "
                    f"fill values (first rows {missing[:5].tolist()}): a shard file is missing or the "
                    "run did not finish. Run `distill cache verify` for details; restore the store "
                    "with `dvc checkout`/`dvc pull` or rebuild it with `distill teach`."
                )
            unknown = np.flatnonzero(~np.isin(status, (ROW_MISSING, ROW_VALID, ROW_INVALID)))
            if unknown.size:
                raise CacheError(f"{self.path}: {kind}_status holds unknown values at rows "
                                 f"{unknown[:5].tolist()}; the store is damaged: rebuild it")
        if not self.lazy and self.image_view is not None:
            ViewRowsValid(self.image_valid, str(self.path))(0, self.image_view)

    def verify_chunks(self) -> None:
        """Read every chunk of a lazily opened cache once, a Zarr shard at a time: checksums,
        and finite valid embedding rows (a :class:`CacheError` names the first fault)."""
        for reader in (self.image_views if self.views > 1 else self.image_emb, self.image_view,
                       self.text_emb, self.image_ids, self.text_ids):
            if isinstance(reader, RowReader):
                for _ in reader.blocks():
                    pass

    def row_array(self, name: str) -> Any:
        """Per-row array ``name`` as this cache reads its embeddings (``image_emb``: view 0 of
        each image; lazily or in memory, as opened), or None when the store holds none."""
        if name in ("image_emb", "text_emb"):
            return getattr(self, name)
        if name not in self._arrays:
            return None
        if self.lazy:
            return RowReader(self.path, name, cache_bytes=self._cache_bytes)
        return read_array(zarr.open_group(str(self.path), mode="r", zarr_format=3), name, self.path)

    def image_row(self) -> dict[str, int]:
        """Stable sample id → image row (all rows: for evaluation splits, not training sets)."""
        return {sid: i for i, sid in enumerate(np.asarray(self.image_ids).tolist())}

    def text_row(self) -> dict[str, int]:
        """Stable caption id (``shard/key#c``) → text row (all rows, as :meth:`image_row`)."""
        return {tid: j for j, tid in enumerate(np.asarray(self.text_ids).tolist())}


def unit_rows(path: str | Path, kind: Kind, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of every ``kind`` array of a published store (ids as ``str``,
    embeddings as stored): what a stage deriving a store row by row from this one reads per unit.
    The store was checked when the run was planned (:func:`published_attrs`)."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    names = [f"{kind}_id", f"{kind}_status", f"{kind}_emb"]
    names += ["text_to_image"] if kind == "text" else [n for n in ("image_view",) if n in group]
    rows = {name: group[name][start:stop] for name in names if name in group}
    rows[f"{kind}_id"] = read_strings(rows[f"{kind}_id"])
    stored = store_dtype_of(dict(group.attrs))
    if f"{kind}_emb" in rows and has_scale(stored):
        scale = group[scale_name(f"{kind}_emb")][start:stop]
        rows[f"{kind}_emb"] = decode(rows[f"{kind}_emb"], stored, scale)
    elif f"{kind}_emb" in rows:
        rows[f"{kind}_emb"] = decode(rows[f"{kind}_emb"], stored)
    return rows


def read_embeddings(group: zarr.Group, name: str, path: Path | str, stored: str) -> np.ndarray:
    """All rows of embedding array ``name`` decoded as readers get them (float16 as stored,
    bfloat16 and int8 as float32), checked as :func:`read_array` checks."""
    codes = read_array(group, name, path)
    scale = read_array(group, scale_name(name), path) if has_scale(stored) else None
    return decode(codes, stored, scale)


def encoded_columns(name: str, values: np.ndarray, stored: str) -> dict[str, np.ndarray]:
    """The arrays a unit writes for embedding rows ``values`` (float32 or float16) of array
    ``name`` in a ``stored`` store: the codes, and the scales for int8."""
    codes, scale = encode(values, stored)
    return {name: codes} | ({} if scale is None else {scale_name(name): scale})


def published_attrs(path: Path, need: Kind | None = None, role: str = "teacher") -> dict[str, Any]:
    """The attributes of the complete teacher store at ``path`` after its cheap structure checks
    (schema, fingerprints, layout, shard files); ``need``: a modality it must hold."""
    if not (path / "zarr.json").exists():
        raise CacheError(f"{role} cache {path} not found: run `distill teach` for that teacher "
                         "first (or `dvc repro`)")
    group = open_group_checked(path, teacher_schema_at(path))
    raise_faults(path, structure_faults(path, group))
    attrs = dict(group.attrs)
    if need is not None and need not in attrs["modalities"]:
        raise CacheError(f"{role} cache {path} has no {need} embeddings "
                         f"(modalities {attrs['modalities']}); name a teacher with a {need} tower")
    return attrs


def strings_as_objects(values: np.ndarray) -> np.ndarray:
    """Decoded string rows as a numpy object array of ``str`` (no fixed width to truncate)."""
    return np.asarray(values.tolist(), dtype=object)


class ViewRowsValid:
    """Chunk check of ``image_view``: every valid image's views are boxes inside view 0."""

    def __init__(self, valid: np.ndarray, where: str) -> None:
        self.valid, self.where = valid, where

    def __call__(self, start: int, values: np.ndarray) -> None:
        from pipeline.views import view_row_faults

        faults = view_row_faults(values, self.valid[start:start + len(values)], start)
        if faults:
            raise CacheError(f"{self.where}: {faults[0]}: the store is damaged. Run `distill cache "
                             "verify` for details; restore it with `dvc checkout`/`dvc pull` or "
                             "rebuild it with `distill teach`.")


class FiniteWhereValid:
    """Chunk check of a lazily read embedding array: every valid row must be finite (a lost or
    unwritten shard reads back as the NaN fill value)."""

    def __init__(self, status: np.ndarray, where: str) -> None:
        self.status, self.where = status, where

    def __call__(self, start: int, values: np.ndarray) -> None:
        valid = self.status[start:start + len(values)] == ROW_VALID
        bad = np.flatnonzero(valid & ~np.isfinite(values).reshape(len(values), -1).all(axis=1))
        if bad.size:
            raise CacheError(
                f"{self.where}: {bad.size} valid rows read back as fill values (first rows "
                f"{(start + bad[:5]).tolist()}): a shard file is damaged or was not written. Run "
                "`distill cache verify` for details; restore the store with `dvc checkout`/`dvc "
                "pull` or rebuild it with `distill teach`.")


def teacher_store_attrs(teacher: dict[str, Any], dataset_fingerprint: str, split: str,
                        modalities: frozenset[str], embed_dim: int, logit_scale: float,
                        n_images: int, n_texts: int, layout: Layout, views: Any = None,
                        store_dtype: str = "float16", **extra: Any) -> dict[str, Any]:
    """Root attributes of a new (still incomplete) teacher store; ``teacher`` is its fingerprint dict.

    ``views``: a :class:`~pipeline.views.ViewSpec` of more than one view makes a schema v2 store
    (``views``, ``view_params``); otherwise the store is v1, as without views. ``store_dtype``
    other than float16 is recorded (``store_dtype``) and joins the teacher's fingerprint fields:
    the stored embeddings differ, so do the stores derived from them. A float16 store's
    attributes and fingerprint are those of every store written before the setting existed.
    """
    from pipeline.fingerprint import fingerprint

    if store_dtype != "float16":
        array_dtype(store_dtype)  # a known one
        teacher = teacher | {"store_dtype": store_dtype}
        extra = extra | {"store_dtype": store_dtype}

    if views is not None and views.views > 1 and "image" in modalities:
        extra = extra | {"views": views.views, "view_params": views.attrs()}
        version = 2
    else:
        version = 1
    return base_attrs("vlm-distill/teacher-cache", version) | dict(
        teacher=teacher, teacher_fingerprint=fingerprint(teacher), dataset_fingerprint=dataset_fingerprint,
        split=split, modalities=sorted(modalities), embed_dim=int(embed_dim),
        logit_scale=float(logit_scale), n_images=n_images, n_texts=n_texts,
        rows_per_shard=layout.rows_per_shard, skipped=[], **extra)


def write_cache_from_arrays(
    path: str | Path, *, image_ids: np.ndarray, text_ids: np.ndarray, text_to_image: np.ndarray,
    teacher: dict[str, Any], dataset_fingerprint: str, split: str, logit_scale: float,
    image_emb: np.ndarray | None = None, text_emb: np.ndarray | None = None,
    image_status: np.ndarray | None = None, text_status: np.ndarray | None = None,
    layout: Layout = Layout(), image_view: np.ndarray | None = None, views: Any = None,
    store_dtype: str = "float16",
) -> Path:
    """Write a complete cache from in-memory arrays (embeddings computed elsewhere, tests).

    ``teacher`` is the teacher's fingerprint dict; statuses default to all valid. With views
    (schema v2): ``image_emb`` is ``[N, V, D]``, ``image_view`` ``[N, V, 5]`` and ``views`` the
    :class:`~pipeline.views.ViewSpec` that drew them.
    """
    path = location(path)
    modalities = frozenset(k for k, e in (("image", image_emb), ("text", text_emb)) if e is not None)
    embed_dim = next(e.shape[-1] for e in (image_emb, text_emb) if e is not None)
    n_img, n_txt = len(image_ids), len(text_ids)
    attrs = teacher_store_attrs(teacher, dataset_fingerprint, split, modalities, embed_dim, logit_scale,
                                n_img, n_txt, layout, views=views, store_dtype=store_dtype)
    group = create_teacher_store(path, n_images=n_img, n_texts=n_txt, embed_dim=int(embed_dim),
                                 modalities=modalities, attrs=attrs, layout=layout,
                                 views=attrs.get("views", 1))
    columns = {
        "image": {"image_id": np.asarray(image_ids, dtype=str), "image_emb": image_emb,
                  "image_view": image_view if attrs.get("views", 1) > 1 else None,
                  "image_status": np.full(n_img, ROW_VALID, np.uint8) if image_status is None else image_status},
        "text": {"text_id": np.asarray(text_ids, dtype=str), "text_emb": text_emb,
                 "text_to_image": np.asarray(text_to_image, dtype=np.int32),
                 "text_status": np.full(n_txt, ROW_VALID, np.uint8) if text_status is None else text_status},
    }
    for kind, n in (("image", n_img), ("text", n_txt)):
        arrays: dict[str, np.ndarray] = {}
        for k, v in columns[kind].items():
            if v is not None:
                arrays.update(encoded_columns(k, v, store_dtype) if k.endswith("_emb") else {k: v})
        for start, stop in row_units(n, layout.rows_per_shard):
            write_unit(group, start, stop, {k: v[start:stop] for k, v in arrays.items()})
    group.attrs.update({"complete": True})
    return path


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
