"""Zarr v3 teacher caches: layout, writing whole shards, opening and verifying.

One store (a Zarr group) per teacher and dataset split. Rows are grouped into Zarr *shards* of
``rows_per_shard`` rows (the sharding codec keeps a million-row store to hundreds of files, which
DVC hashes quickly). A shard is also the unit of work: every writer (process, Dask worker, GPU)
writes whole shards of its own, so no two writers ever touch one file. Chunks inside a shard are
zstd-compressed and carry a crc32c checksum, and so does each shard index.

Row status arrays say what each row holds: 0 = never written, 1 = valid, 2 = invalid (the
sample's image could not be decoded; the row holds zeros and must not be used). A missing shard
file reads back as fill values without any error, so fill values are chosen to be caught: status
0 (never written) and NaN embeddings, which a valid row can never hold. Every chunk is written,
even one equal to the fill value, so every shard file must exist: opening a store checks that
none is missing or empty, and reading any chunk checks its crc32c.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline import __version__
from pipeline.errors import CacheError, FingerprintMismatchError
from pipeline.rows import DEFAULT_CACHE_BYTES, RowReader, ViewRows

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
ROW_MISSING, ROW_VALID, ROW_INVALID = 0, 1, 2
Kind = Literal["image", "text"]


@dataclass(frozen=True)
class Layout:
    """How rows are split into files; the same for every array of a store."""

    rows_per_shard: int = 16384  # rows per Zarr shard file = one unit of work for one writer
    rows_per_chunk: int = 256    # rows per compressed, checksummed chunk inside a shard
    zstd_level: int = 3


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The JSON schema ``schemas/<name>.json`` (e.g. ``teacher-cache.v1``)."""
    path = SCHEMA_DIR / f"{name}.json"
    if not path.exists():
        raise CacheError(f"schema file {path} not found: is the package installed from a checkout?")
    return json.loads(path.read_text())


def validate_attrs(attrs: dict[str, Any], schema_name: str, where: str) -> None:
    """Check a store's root attributes against its JSON schema (on write and on read)."""
    try:
        jsonschema.validate(attrs, load_schema(schema_name))
    except jsonschema.ValidationError as exc:
        loc = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise CacheError(
            f"{where}: attributes do not match schema {schema_name} at {loc}: {exc.message}. "
            "The store was written by another version or is damaged; rebuild it with `distill teach`."
        ) from None


def created_timestamp() -> str:
    """Creation time, UTC. Honours SOURCE_DATE_EPOCH so rebuilt stores are byte-identical."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def _codecs(layout: Layout) -> list:
    return [ZstdCodec(level=layout.zstd_level), Crc32cCodec()]


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
                 layout: Layout, fill_value: Any = None) -> zarr.Array:
    """Create a row-sharded, checksummed array: shards of ``rows_per_shard`` rows."""
    rows = max(1, min(layout.rows_per_shard, shape[0]))
    chunk_rows = max(1, min(layout.rows_per_chunk, rows))
    if rows % chunk_rows:
        chunk_rows = rows  # a shard must hold a whole number of chunks
    tail = tuple(shape[1:])
    return group.create_array(
        name, shape=shape, dtype=dtype, shards=(rows, *tail), chunks=(chunk_rows, *tail),
        compressors=_codecs(layout), fill_value=fill_value, config=_WRITE_ALL,
    )


# Write chunks equal to the fill value too: then a missing shard file is always a fault.
_WRITE_ALL = {"write_empty_chunks": True}


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
    for kind, n in (("image", n_images), ("text", n_texts)):
        if kind in modalities:  # NaN fill: rows of a lost shard cannot pass for embeddings
            shape = (n, views, embed_dim) if kind == "image" and views > 1 else (n, embed_dim)
            create_array(group, f"{kind}_emb", shape, "float16", layout, np.nan)
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


def row_units(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """The row ranges ``[start, stop)`` of each Zarr shard: one unit of work each."""
    return [(s, min(s + rows_per_shard, n_rows)) for s in range(0, n_rows, rows_per_shard)]


def write_unit(group: zarr.Group, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    """Write rows ``[start, stop)`` of several arrays; the range must be one whole shard."""
    for name, values in arrays.items():
        arr = group[name].with_config(_WRITE_ALL)  # the setting is not stored with the array
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        if start % rows or (stop != arr.shape[0] and stop - start != rows):
            raise ValueError(f"{name}: rows [{start}, {stop}) are not one whole shard of {rows} rows")
        if len(values) != stop - start:
            raise ValueError(f"{name}: got {len(values)} rows for range [{start}, {stop})")
        arr[start:stop] = values


def check_fingerprint(what: str, path: Path, expected: str | None, found: str, hint: str) -> None:
    """Refuse a store whose ``what`` fingerprint is not ``expected`` (None: no expectation),
    printing both."""
    if expected is not None and expected != found:
        raise FingerprintMismatchError(what, str(path), expected, found, hint)


class TeacherCache:
    """A verified, read-only view of one teacher cache.

    Eager (the default): ids and embeddings are loaded into memory, embeddings as float32, as
    stage-1 code (neighbours, align) needs them whole. Lazy (``lazy=True``, what training and
    evaluation use): ids and embeddings are :class:`~pipeline.rows.RowReader` views that read
    rows on demand (float16, as stored), so memory does not grow with the store; only the row
    status and ``text_to_image`` (1 and 4 bytes per row) are loaded.

    Opening runs the cheap checks: schema, completeness, fingerprints, and that no row was left
    unwritten (a deleted shard reads back as fill values; the status arrays catch it).
    """

    def __init__(self, path: Path, group: zarr.Group, lazy: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path, self.lazy = path, lazy
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.logit_scale = float(self.attrs["logit_scale"])
        self.embed_dim = int(self.attrs["embed_dim"])
        self.modalities = frozenset(self.attrs["modalities"])
        self.dataset_fingerprint: str = self.attrs["dataset_fingerprint"]
        self.teacher_fingerprint: str = self.attrs["teacher_fingerprint"]
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
            return RowReader(self.path, f"{kind}_emb", cache_bytes=cache_bytes,
                             check=FiniteWhereValid(status, f"{self.path}: {kind}_emb"))
        return read_array(group, f"{kind}_emb", self.path).astype(np.float32)

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
        path = Path(path)
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

    def image_row(self) -> dict[str, int]:
        """Stable sample id → image row (all rows: for evaluation splits, not training sets)."""
        return {sid: i for i, sid in enumerate(np.asarray(self.image_ids).tolist())}

    def text_row(self) -> dict[str, int]:
        """Stable caption id (``shard/key#c``) → text row (all rows, as :meth:`image_row`)."""
        return {tid: j for j, tid in enumerate(np.asarray(self.text_ids).tolist())}


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


def unwritten_rows(status: np.ndarray, emb: np.ndarray | None = None) -> np.ndarray:
    """Rows never written: status 0, or a valid row whose embedding is not finite (fill NaN)."""
    bad = status == ROW_MISSING
    if emb is not None:
        bad |= (status == ROW_VALID) & ~np.isfinite(emb).reshape(len(emb), -1).all(axis=1)
    return np.flatnonzero(bad)


def read_strings(arr: zarr.Array | np.ndarray) -> np.ndarray:
    """A string array as a fixed-width numpy ``str`` array (zarr returns numpy's StringDType)."""
    values = arr[:] if isinstance(arr, zarr.Array) else arr
    return np.array(values.tolist(), dtype=str)


def read_array(group: zarr.Group, name: str, path: Path | str) -> np.ndarray:
    """All of array ``name``; a chunk that fails its checksum or cannot be decoded is a
    :class:`CacheError` naming the array (zarr raises a bare ``ValueError``)."""
    try:
        return np.asarray(group[name][:])
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise CacheError(
            f"{path}: array {name} cannot be read ({type(exc).__name__}: {exc}): a shard file is "
            "damaged. Run `distill cache verify` for details; restore the store with `dvc "
            "checkout`/`dvc pull` or rebuild it with the stage that made it."
        ) from None


def schema_name_of(attrs: dict[str, Any]) -> str:
    """Schema file name of a store's attributes: ``vlm-distill/neighbors`` v1 -> ``neighbors.v1``."""
    return f"{str(attrs.get('schema', '?')).rsplit('/', 1)[-1]}.v{attrs.get('schema_version', '?')}"


def check_schema_id(attrs: dict[str, Any], schema_name: str, path: Path | str) -> None:
    """Refuse a store of another schema or schema version, printing both."""
    props = load_schema(schema_name)["properties"]
    expected = f"{props['schema']['const']} v{props['schema_version']['const']}"
    found = f"{attrs.get('schema')} v{attrs.get('schema_version')}"
    if expected != found:
        raise FingerprintMismatchError(
            "schema", str(path), expected, found,
            f"the store was written by vlm-distill {attrs.get('package_version', '?')} with "
            "another layout; rebuild it with this version (`dvc repro`), or read it with that one")


def open_group_checked(path: Path, schema_name: str) -> zarr.Group:
    """Open a store read-only and validate its attributes; refuse incomplete stores."""
    if not (path / "zarr.json").exists():
        raise CacheError(f"{path}: no Zarr store here (missing zarr.json); run the stage that makes it")
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    attrs = dict(group.attrs)
    check_schema_id(attrs, schema_name, path)
    validate_attrs(attrs, schema_name, str(path))
    if not attrs.get("complete"):
        raise CacheError(f"{path}: the store is marked incomplete; rerun the stage to finish it")
    return group


def shard_keys(arr: zarr.Array) -> list[str]:
    """Store keys of every shard file of ``arr`` (``c/0/0``...)."""
    grid = arr.metadata.chunk_grid.chunk_shape
    counts = [-(-n // g) for n, g in zip(arr.shape, grid)]
    return [arr.metadata.encode_chunk_key(c) for c in itertools.product(*map(range, counts))]


def shard_file_faults(path: Path, group: zarr.Group) -> list[str]:
    """Shard files that are missing or empty: Zarr reads both back as fill values, silently."""
    faults = []
    for name, arr in sorted(group.arrays()):
        for key in shard_keys(arr):
            try:
                empty = (path / name / key).stat().st_size == 0
            except FileNotFoundError:
                faults.append(f"{name}: shard file {name}/{key} is missing")
                continue
            if empty:
                faults.append(f"{name}: shard file {name}/{key} is empty")
    return faults


def expected_arrays(attrs: dict[str, Any]) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Array name -> (dtype, shape; None where the attributes do not fix it), from the schema's
    ``arrays`` section and the store's attributes (modalities, row counts, width, k)."""
    out: dict[str, tuple[str, tuple[int | None, ...]]] = {}
    for name, spec in load_schema(schema_name_of(attrs)).get("arrays", {}).items():
        if spec.get("modality") and spec["modality"] not in attrs.get("modalities", []):
            continue
        rows = attrs.get(spec["rows"]) if "rows" in spec else None
        width = attrs.get("k", attrs.get("embed_dim"))
        if "shape" in spec:  # e.g. ["n_images", "views", "embed_dim"]: attribute names or sizes
            shape = tuple(d if isinstance(d, int) else attrs.get(d) for d in spec["shape"])
        else:
            shape = (rows, width)[:spec.get("ndim", 1)]
        names = ([name.format(direction=d) for d in attrs.get("directions", [])]
                 if "{direction}" in name else [name])
        out.update({n: (spec["dtype"], shape) for n in names})
    return out


def layout_faults(attrs: dict[str, Any], group: zarr.Group) -> list[str]:
    """Arrays the schema requires that are missing, or whose dtype or shape is wrong."""
    faults = []
    for name, (dtype, shape) in expected_arrays(attrs).items():
        if name not in group:
            faults.append(f"{name}: array missing")
            continue
        arr = group[name]
        kind_ok = arr.dtype.kind in "TUO" if dtype == "str" else arr.dtype == np.dtype(dtype)
        shape_ok = len(arr.shape) == len(shape) and all(
            e is None or e == f for e, f in zip(shape, arr.shape))
        if not (kind_ok and shape_ok):
            want = tuple("*" if e is None else e for e in shape)
            faults.append(f"{name}: {arr.dtype} {tuple(arr.shape)}, expected {dtype} {want}")
    return faults


def fingerprint_faults(attrs: dict[str, Any]) -> list[str]:
    """A recorded teacher fingerprint must be the hash of the recorded teacher fields (of the
    teacher of a teacher cache, of the single-stream teacher of an ITM store)."""
    from pipeline.fingerprint import fingerprint

    faults = []
    for fields_key, fp_key in (("teacher", "teacher_fingerprint"),
                               ("single_teacher", "single_teacher_fingerprint")):
        if fields_key not in attrs or fp_key not in attrs:
            continue
        actual = fingerprint(attrs[fields_key])
        if actual != attrs[fp_key]:
            faults.append(f"{fp_key} {attrs[fp_key]} is not the hash of the recorded {fields_key} "
                          f"fields ({actual}): the attributes were edited")
    return faults


# Root attributes a teacher cache repeats from its teacher's recorded fields (the fingerprinted
# ones): training reads the root copy (logit_scale is the teacher's temperature), so both must agree.
TEACHER_FIELD_ATTRS = ("embed_dim", "logit_scale", "modalities")


def attribute_faults(attrs: dict[str, Any], group: zarr.Group) -> list[str]:
    """Root attributes that disagree with the recorded teacher fields or with the arrays: the
    teacher's ``embed_dim``/``logit_scale``/``modalities``, embeddings of an unlisted modality,
    and the shard size ``rows_per_shard`` records."""
    faults = []
    teacher = attrs.get("teacher") if isinstance(attrs.get("teacher"), dict) else {}
    for key in TEACHER_FIELD_ATTRS:
        if key in attrs and key in teacher and _normal(attrs[key]) != _normal(teacher[key]):
            faults.append(f"{key} {attrs[key]!r} disagrees with the recorded teacher's {key} "
                          f"{teacher[key]!r}: the attributes were edited")
    if "modalities" in attrs:
        for kind in ("image", "text"):
            if f"{kind}_emb" in group and kind not in attrs["modalities"]:
                faults.append(f"{kind}_emb is stored but modalities {attrs['modalities']} does not "
                              "list it: the attributes were edited")
    rows_per_shard = attrs.get("rows_per_shard")
    if isinstance(rows_per_shard, int):
        for name, arr in sorted(group.arrays()):
            shard_rows = arr.shards[0] if arr.shards else arr.chunks[0]
            if arr.shape[0] and shard_rows != max(1, min(rows_per_shard, arr.shape[0])):
                faults.append(f"{name}: shards of {shard_rows} rows, but rows_per_shard is "
                              f"{rows_per_shard}: the attributes were edited")
    return faults


def _normal(value: Any) -> Any:
    """Comparable form of an attribute: numbers as float, lists sorted."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return sorted(value) if isinstance(value, list) else value


def structure_faults(path: Path, group: zarr.Group) -> list[str]:
    """The cheap checks of a store's structure: fingerprints, attributes, array layout, shard files."""
    attrs = dict(group.attrs)
    return (fingerprint_faults(attrs) + attribute_faults(attrs, group) + layout_faults(attrs, group)
            + shard_file_faults(path, group))


def raise_faults(path: Path, faults: list[str]) -> None:
    """Refuse a store with faults, listing the first ones and what to do."""
    if faults:
        shown = "; ".join(faults[:5]) + (f"; and {len(faults) - 5} more" if len(faults) > 5 else "")
        raise CacheError(
            f"{path}: {len(faults)} fault(s): {shown}. Reading it would give fill values instead "
            "of data, so it is refused. Run `distill cache verify` for the full report; restore "
            "the store with `dvc checkout`/`dvc pull` or rebuild it with the stage that made it.")


def store_nbytes(path: Path) -> int:
    """Bytes on disk under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def base_attrs(schema: str, version: int = 1) -> dict[str, Any]:
    """Attributes every store carries: schema, version, package version, creation time."""
    return {"schema": schema, "schema_version": version, "package_version": __version__,
            "created": created_timestamp(), "complete": False}


def teacher_store_attrs(teacher: dict[str, Any], dataset_fingerprint: str, split: str,
                        modalities: frozenset[str], embed_dim: int, logit_scale: float,
                        n_images: int, n_texts: int, layout: Layout, views: Any = None,
                        **extra: Any) -> dict[str, Any]:
    """Root attributes of a new (still incomplete) teacher store; ``teacher`` is its fingerprint dict.

    ``views``: a :class:`~pipeline.views.ViewSpec` of more than one view makes a schema v2 store
    (``views``, ``view_params``); otherwise the store is v1, as without views.
    """
    from pipeline.fingerprint import fingerprint

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
) -> Path:
    """Write a complete cache from in-memory arrays (embeddings computed elsewhere, tests).

    ``teacher`` is the teacher's fingerprint dict; statuses default to all valid. With views
    (schema v2): ``image_emb`` is ``[N, V, D]``, ``image_view`` ``[N, V, 5]`` and ``views`` the
    :class:`~pipeline.views.ViewSpec` that drew them.
    """
    path = Path(path)
    modalities = frozenset(k for k, e in (("image", image_emb), ("text", text_emb)) if e is not None)
    embed_dim = next(e.shape[-1] for e in (image_emb, text_emb) if e is not None)
    n_img, n_txt = len(image_ids), len(text_ids)
    attrs = teacher_store_attrs(teacher, dataset_fingerprint, split, modalities, embed_dim, logit_scale,
                                n_img, n_txt, layout, views=views)
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
        arrays = {k: (v.astype(np.float16) if k.endswith("_emb") else v)
                  for k, v in columns[kind].items() if v is not None}
        for start, stop in row_units(n, layout.rows_per_shard):
            write_unit(group, start, stop, {k: v[start:stop] for k, v in arrays.items()})
    group.attrs.update({"complete": True})
    return path
