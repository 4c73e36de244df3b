"""``distill cache info`` and ``distill cache verify``: what a store holds, and whether it is sound.

``verify`` checks, in order: the schema (name, version, attributes), completeness, fingerprints
(the recorded teacher fingerprint is the hash of the recorded teacher fields; optionally the
dataset and teacher a caller expects), the array layout the attributes imply, that every shard
file exists and is not empty, that no temporary file of an interrupted write is left, then reads
every shard (each chunk's crc32c and each shard index's are checked) and checks the rows: no row
left unwritten, known status values, finite embeddings (every view's), neighbour lists without
fill values, and for teacher caches, view boxes inside their image, unique ids with captions
pointing at their own image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from pipeline.errors import CacheError
from pipeline.stores.location import RemotePath, location
from pipeline.stores.base import (ROW_INVALID, ROW_MISSING, ROW_VALID, attribute_faults,
                                  check_schema_id, fingerprint_faults, layout_faults, read_strings,
                                  schema_name_of, shard_file_faults, store_nbytes, validate_attrs)

STATUS_VALUES = (ROW_MISSING, ROW_VALID, ROW_INVALID)


def _open(path: Path) -> zarr.Group:
    if not (path / "zarr.json").exists():
        raise CacheError(f"{path}: no Zarr store here (missing zarr.json)")
    return zarr.open_group(str(path), mode="r", zarr_format=3)


def cache_info(path: str | Path) -> dict[str, Any]:
    """Arrays (shape, dtype, chunk and shard shape), attributes, size on disk and row counts."""
    path = location(path)
    group = _open(path)
    arrays = {
        name: {"shape": list(arr.shape), "dtype": str(arr.dtype),
               "shards": list(arr.shards) if arr.shards else None, "chunks": list(arr.chunks)}
        for name, arr in sorted(group.arrays())
    }
    info: dict[str, Any] = {"path": str(path), "attrs": dict(group.attrs), "arrays": arrays,
                            "bytes_on_disk": store_nbytes(path),
                            "files": _file_count(path)}
    if "teacher_fingerprint" in info["attrs"] and "image_id" in group:
        info["views"] = int(info["attrs"].get("views", 1))  # teacher embeddings per image
    for kind in ("image", "text"):
        if f"{kind}_status" in group:
            status = group[f"{kind}_status"][:]
            info[f"{kind}_rows"] = {"valid": int((status == ROW_VALID).sum()),
                                    "invalid": int((status == ROW_INVALID).sum()),
                                    "unwritten": int((status == ROW_MISSING).sum())}
    return info


# The stage that writes each kind of store (a teacher store of the `aligned` teacher is made by align).
_MADE_BY = {"vlm-distill/teacher-cache": "teach", "vlm-distill/neighbors": "neighbors",
            "vlm-distill/itm-scores": "itm"}


def made_by(attrs: dict[str, Any]) -> str:
    """The ``distill`` command that wrote a store with these attributes, e.g. ``distill align``."""
    teacher = attrs.get("teacher")
    if isinstance(teacher, dict) and teacher.get("teacher") == "aligned":
        return "distill align"
    return f"distill {_MADE_BY.get(str(attrs.get('schema')), 'teach')}"


def store_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of a store (no checks); ``CacheError`` when no store is there."""
    return dict(_open(Path(path)).attrs)


def split_folder(dataset: str | Path, attrs: dict[str, Any]) -> Path:
    """The dataset folder a store's rows must come from: ``dataset`` itself when it holds a
    manifest (a split folder), else its sub-folder of the store's split (a dataset root, as
    ``teach.dataset`` names it). ``ShardError`` naming both places when neither holds one."""
    from pipeline.errors import ShardError

    root = Path(dataset)
    if (root / "manifest.json").is_file():
        return root
    split = attrs.get("split")
    if split and (root / str(split) / "manifest.json").is_file():
        return root / str(split)
    where = f" nor in {root / str(split)}/" if split else ""
    raise ShardError(f"{root}: no manifest.json here{where}; --dataset takes a prepared dataset's "
                     f"root or one split folder of it (e.g. {root / str(split or 'train')}), as "
                     "`distill prepare` writes them")


@dataclass
class VerifyReport:
    """Faults found by :func:`verify_cache`; empty ``faults`` means the store is sound.

    ``mismatches``: the faults that say the store belongs to another dataset, split or teacher
    than the one expected (also in ``faults``); when they are the only ones the store itself is
    sound and rebuilding it would change nothing."""

    path: Path
    faults: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    @property
    def only_mismatched(self) -> bool:
        """Sound, but made from another dataset, split or teacher than expected."""
        return bool(self.faults) and len(self.faults) == len(self.mismatches)

    def add(self, check: str, faults: list[str]) -> None:
        """Record that ``check`` ran and the faults it found."""
        self.checked.append(check)
        self.faults.extend(faults)


def verify_cache(path: str | Path, deep: bool = True, expect_dataset: str | None = None,
                 expect_teacher: str | None = None) -> VerifyReport:
    """Check a teacher cache or neighbour store; every fault is reported, none raised.

    ``deep`` reads every shard of every array (checksums); without it only the row status arrays
    are read. ``expect_dataset`` / ``expect_teacher``: fingerprints the store must carry.
    """
    path = location(path)
    report = VerifyReport(path)
    try:
        group = _open(path)
        attrs = report.attrs = dict(group.attrs)
        check_schema_id(attrs, schema_name_of(attrs), path)
        validate_attrs(attrs, schema_name_of(attrs), str(path))
    except Exception as exc:  # every fault is reported, not raised
        report.faults.append(f"schema: {exc}")
        return report
    report.add("schema", [] if attrs.get("complete") else ["store is marked incomplete"])
    report.mismatches = _expectation_faults(attrs, expect_dataset, expect_teacher)
    report.add("fingerprints", fingerprint_faults(attrs) + report.mismatches)
    report.add("attributes", attribute_faults(attrs, group))
    report.add("layout", layout_faults(attrs, group))
    report.add("shard files", shard_file_faults(path, group) + _temporaries(path))
    for name, arr in sorted(group.arrays()):
        if deep or name.endswith("_status"):
            report.add(f"{name} ({len(_shard_starts(arr))} shards read)",
                       _verify_array(name, arr, _decoder(group, name, attrs)))
    for direction in attrs.get("directions", []) if deep else []:
        report.add(f"{direction} neighbour rows", _topk_faults(group, direction))
    if deep and "image_view" in group and "image_status" in group:
        report.add(f"image_view rows ({attrs.get('views')} views)", _view_faults(group))
    if deep and "image_id" in group and "text_id" in group:
        report.add("row ids", _id_faults(group))
    return report


def _expectation_faults(attrs: dict[str, Any], dataset: str | None, teacher: str | None) -> list[str]:
    faults = []
    teacher_key = "teacher_fingerprint" if "teacher_fingerprint" in attrs else "source_teacher_fingerprint"
    for what, key, expected in (("dataset", "dataset_fingerprint", dataset),
                                ("teacher", teacher_key, teacher)):
        if expected is not None and attrs.get(key) != expected:
            whose = "split or dataset" if what == "dataset" else "teacher"
            faults.append(f"{what} fingerprint mismatch: expected {expected}, found {attrs.get(key)} "
                          f"(the store belongs to another {whose}: `{made_by(attrs)}` made it "
                          f"from split {attrs.get('split')!r})")
    return faults


def _file_count(path: Any) -> int:
    if isinstance(path, RemotePath):
        return len(path.files())
    return sum(1 for p in path.rglob("*") if p.is_file())


def _temporaries(path: Path) -> list[str]:
    """Files an interrupted write leaves behind; a published store never holds any."""
    left = [p for p in path.rglob("*.partial")] + [p for p in path.rglob(".*.creating")]
    return [f"temporary file {p.relative_to(path)} left by an interrupted write" for p in left]


def _shard_starts(arr: zarr.Array) -> range:
    step = arr.shards[0] if arr.shards else arr.chunks[0]
    return range(0, arr.shape[0], step)


Decoder = Callable[[int, int, np.ndarray], tuple[np.ndarray, list[str]]]


def _decoder(group: zarr.Group, name: str, attrs: dict[str, Any]) -> Decoder | None:
    """For the embeddings of a bfloat16 or int8 teacher store: rows decoded as readers get them
    (so fill values and damaged scales read as non-finite), and for int8 the faults of the
    codes and scales themselves (:func:`pipeline.stores.encoding.int8_row_faults`)."""
    from pipeline.stores.encoding import decode, has_scale, int8_row_faults, scale_name, store_dtype_of

    stored = store_dtype_of(attrs)
    if not name.endswith("_emb") or stored == "float16":
        return None
    status = group[name.replace("_emb", "_status")] if name.replace("_emb", "_status") in group else None

    def decoded(start: int, stop: int, codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
        if not has_scale(stored):
            return decode(codes, stored), []
        scale = np.asarray(group[scale_name(name)][start:stop])  # unreadable: its own pass names it
        valid = np.ones(stop - start, bool) if status is None else status[start:stop] == ROW_VALID
        return decode(codes, stored, scale), int8_row_faults(codes, scale, valid, name, start)
    return decoded


def _verify_array(name: str, arr: zarr.Array, decoder: Decoder | None = None) -> list[str]:
    """Read ``arr`` shard by shard (so a damaged shard is named) and check its values
    (``decoder``: encoded embeddings, checked as decoded rows and as codes)."""
    faults = []
    starts = _shard_starts(arr)
    for start in starts:
        stop = min(start + starts.step, arr.shape[0])
        try:
            values = np.asarray(arr[start:stop])
            if decoder is not None:
                values, code_faults = decoder(start, stop, values)
                faults += code_faults
        except Exception as exc:  # checksum mismatch, truncated shard, undecodable chunk
            faults.append(f"{name} rows [{start}, {stop}): unreadable ({type(exc).__name__}: {exc}); "
                          "the shard file is damaged")
            continue
        faults += _value_faults(name, start, stop, values)
    return faults


def _value_faults(name: str, start: int, stop: int, values: np.ndarray) -> list[str]:
    where = f"{name} rows [{start}, {stop})"
    if name.endswith("_status"):
        faults = []
        missing = np.flatnonzero(values == ROW_MISSING)
        if missing.size:
            faults.append(f"{where}: {missing.size} rows never written (first row "
                          f"{start + int(missing[0])}; a shard file is missing or the run did not finish)")
        unknown = np.flatnonzero(~np.isin(values, STATUS_VALUES))
        if unknown.size:
            faults.append(f"{where}: {unknown.size} rows hold unknown status values "
                          f"{sorted(set(values[unknown].tolist()))[:5]}")
        return faults
    if name.endswith("_emb"):  # NaN is the fill value: rows of a lost shard read back as NaN
        rows = np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(axis=1))
        if rows.size:
            return [f"{where}: {rows.size} rows hold fill values or non-finite numbers (first "
                    f"row {start + int(rows[0])}; a shard file is missing or damaged)"]
    return []


def _topk_faults(group: zarr.Group, direction: str) -> list[str]:
    """Neighbour rows read back as fill values (checked together: idx -1 needs sim -inf)."""
    from pipeline.stores.neighbors import topk_row_faults

    idx_arr, sim_arr = group[f"{direction}_topk_idx"], group[f"{direction}_topk_sim"]
    if idx_arr.shape != sim_arr.shape:
        return [f"{direction}: idx {idx_arr.shape} and sim {sim_arr.shape} differ in shape"]
    faults = []
    starts = _shard_starts(idx_arr)
    for start in starts:
        stop = min(start + starts.step, idx_arr.shape[0])
        try:
            rows = {f"{direction}_topk_idx": idx_arr[start:stop], f"{direction}_topk_sim": sim_arr[start:stop]}
        except Exception:
            continue  # reported by the per-array read
        faults += topk_row_faults(rows, direction, offset=start)
    return faults


def _view_faults(group: zarr.Group) -> list[str]:
    """Every valid image's view boxes lie inside its view 0 (the whole image), flags known."""
    from pipeline.views import view_row_faults

    view_arr, faults = group["image_view"], []
    starts = _shard_starts(view_arr)
    for start in starts:
        stop = min(start + starts.step, view_arr.shape[0])
        try:
            views, status = np.asarray(view_arr[start:stop]), np.asarray(group["image_status"][start:stop])
        except Exception:
            continue  # reported by the per-array read
        faults += view_row_faults(views, status == ROW_VALID, start)
    return faults


def _id_faults(group: zarr.Group) -> list[str]:
    """Ids present and unique; each caption's id names the image row it points to."""
    try:
        image_ids = read_strings(group["image_id"])
        text_ids = read_strings(group["text_id"])
        to_image = np.asarray(group["text_to_image"][:])
    except Exception:
        return []  # unreadable: reported by the per-array read
    faults = []
    for kind, ids in (("image_id", image_ids), ("text_id", text_ids)):
        empty = np.flatnonzero(ids == "")
        if empty.size:
            faults.append(f"{kind}: {empty.size} empty ids (first row {int(empty[0])})")
        if len(set(ids.tolist())) != len(ids):
            faults.append(f"{kind}: ids are not unique")
    out_of_range = np.flatnonzero((to_image < 0) | (to_image >= len(image_ids)))
    if out_of_range.size:
        faults.append(f"text_to_image: {out_of_range.size} rows point outside the image rows "
                      f"(first text row {int(out_of_range[0])})")
    elif len(text_ids):
        owner = np.char.partition(text_ids, "#")[:, 0]
        wrong = np.flatnonzero(owner != image_ids[to_image])
        if wrong.size:
            faults.append(f"text_to_image: {wrong.size} captions point at another sample's image "
                          f"(first text row {int(wrong[0])}: {text_ids[wrong[0]]})")
    return faults
