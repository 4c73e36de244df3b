"""Generic Zarr v3 store code shared by every store format: layout, schemas, writing whole
shards, opening with checks, and the structure checks of ``distill cache verify``.

Rows are grouped into Zarr *shards* of ``rows_per_shard`` rows (the sharding codec keeps a
million-row store to hundreds of files, which DVC hashes quickly). A shard is also the unit of
work: every writer (process, Dask worker, GPU) writes whole shards of its own, so no two writers
ever touch one file. Chunks inside a shard are zstd-compressed and carry a crc32c checksum, and so
does each shard index.

Row status arrays say what each row holds: 0 = never written, 1 = valid, 2 = invalid (the
sample's image could not be decoded; the row holds zeros and must not be used). A missing shard
file reads back as fill values without any error, so fill values are chosen to be caught: status
0 (never written) and NaN embeddings, which a valid row can never hold. Every chunk is written,
even one equal to the fill value, so every shard file must exist: opening a store checks that
none is missing or empty, and reading any chunk checks its crc32c.

The formats: :mod:`pipeline.stores.teacher`, :mod:`pipeline.stores.neighbors`,
:mod:`pipeline.stores.itm`.
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

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
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


def unit_files(path: Path, group: zarr.Group, start: int, names: list[str]) -> list[Path]:
    """The shard files that hold rows starting at ``start`` (one whole shard, as
    :func:`write_unit` writes) of arrays ``names`` of the local store at ``path``."""
    files = []
    for name in names:
        arr = group[name]
        rows = arr.shards[0] if arr.shards else arr.chunks[0]
        coords = (start // rows,) + (0,) * (arr.ndim - 1)  # a shard spans every other dimension
        files.append(Path(path) / name / arr.metadata.encode_chunk_key(coords))
    return files


def sync_files(files: list[Path], root: Path) -> None:
    """fsync ``files`` and every directory from each one's parent up to ``root``: the files'
    data and their directory entries (zarr writes a shard by a rename, possibly into a new
    directory) are on the disk when this returns, and nothing else is flushed."""
    from pipeline.scratch import fsync_dir

    root, dirs = Path(root), set()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        parent = file.parent
        while parent not in dirs:
            dirs.add(parent)
            if parent == root or root not in parent.parents:
                break
            parent = parent.parent
    for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):  # deepest first
        fsync_dir(directory)


def check_fingerprint(what: str, path: Path, expected: str | None, found: str, hint: str) -> None:
    """Refuse a store whose ``what`` fingerprint is not ``expected`` (None: no expectation),
    printing both."""
    if expected is not None and expected != found:
        raise FingerprintMismatchError(what, str(path), expected, found, hint)


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


def open_store(path: Path | str, writable: bool = False) -> zarr.Group:
    """The Zarr group at ``path`` as it is, without checks (the store runner's staging stores,
    whose checks come when they are finalised)."""
    return zarr.open_group(str(path), mode="r+" if writable else "r", zarr_format=3)


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
    """Shard files that are missing or empty: Zarr reads both back as fill values, silently.
    (A store in object storage is listed once, not asked about each file.)"""
    from pipeline.stores.location import RemotePath

    sizes = path.files() if isinstance(path, RemotePath) else None
    faults = []
    for name, arr in sorted(group.arrays()):
        for key in shard_keys(arr):
            try:
                size = (path / name / key).stat().st_size if sizes is None else sizes[f"{name}/{key}"]
            except (FileNotFoundError, KeyError):
                faults.append(f"{name}: shard file {name}/{key} is missing")
                continue
            if size == 0:
                faults.append(f"{name}: shard file {name}/{key} is empty")
    return faults


def expected_arrays(attrs: dict[str, Any]) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Array name -> (dtype, shape; None where the attributes do not fix it), from the schema's
    ``arrays`` section and the store's attributes (modalities, row counts, width, k)."""
    from pipeline.stores.encoding import array_dtype, store_dtype_of

    out: dict[str, tuple[str, tuple[int | None, ...]]] = {}
    stored = store_dtype_of(attrs)  # embeddings: float16, or bfloat16 bits, or int8 codes + scales
    for name, spec in load_schema(schema_name_of(attrs)).get("arrays", {}).items():
        if spec.get("modality") and spec["modality"] not in attrs.get("modalities", []):
            continue
        if spec.get("store_dtype", stored) != stored:  # e.g. the scales of int8 codes
            continue
        rows = attrs.get(spec["rows"]) if "rows" in spec else None
        width = attrs.get("k", attrs.get("embed_dim"))
        if "shape" in spec:  # e.g. ["n_images", "views", "embed_dim"]: attribute names or sizes
            shape = tuple(d if isinstance(d, int) else attrs.get(d) for d in spec["shape"])
        else:
            shape = (rows, width)[:spec.get("ndim", 1)]
        names = ([name.format(direction=d) for d in attrs.get("directions", [])]
                 if "{direction}" in name else [name])
        dtype = array_dtype(stored) if spec.get("encoded") and stored in ("bfloat16", "int8") \
            else spec["dtype"]
        out.update({n: (dtype, shape) for n in names})
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
    from pipeline.stores.location import RemotePath, location

    path = location(path)
    if isinstance(path, RemotePath):
        return sum(path.files().values())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def base_attrs(schema: str, version: int = 1) -> dict[str, Any]:
    """Attributes every store carries: schema, version, package version, creation time."""
    return {"schema": schema, "schema_version": version, "package_version": __version__,
            "created": created_timestamp(), "complete": False}


