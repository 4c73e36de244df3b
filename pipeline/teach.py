"""Stage 1 (``teach``): run one frozen teacher over a dataset's splits into Zarr caches.

Work is cut into units of one Zarr shard of rows each (``rows_per_shard`` images, or texts). A
unit is computed, checked (finite values), written as whole shards and then recorded as done in
the scratch directory, so a rerun after an interruption computes only the unfinished units. When
every unit of every split is done, the stores are marked complete and moved into the output by a
rename. An output that is already complete for the same teacher, dataset and settings (and not
damaged) is left alone: a teacher pass is never paid for twice. One run at a time writes an
output: the run holds :func:`pipeline.lock.output_lock` on it from start to publish.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
import zarr

from pipeline import __version__
from pipeline.cache import (ROW_INVALID, ROW_VALID, Layout, create_teacher_store, row_units,
                            structure_faults, teacher_store_attrs, unwritten_rows, validate_attrs,
                            write_unit)
from pipeline.config import DEVICE_PATTERN, check_settings, setting
from pipeline.data.shards import Manifest, iter_samples, load_manifest, make_handler
from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.lock import output_lock
from pipeline.progress import progress_task
from pipeline.scratch import (ScratchRun, creating, discard_scratch, disk_full_errors,
                              recover_replaced)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher of ``params.yaml``'s ``teachers`` mapping."""

    teacher: str                                           # registry name (`distill teachers` lists them)
    kwargs: dict[str, Any] = field(default_factory=dict)   # passed to the teacher's factory


@dataclass(frozen=True)
class TeachConfig:
    """Parameters of the ``teach`` stage (``params.yaml`` section ``teach``)."""

    dataset: str = "data/emoji"            # dataset root: one folder of shards per split
    splits: tuple[str, ...] = setting(("train", "test"), min_items=1)
    out_root: str = "caches"               # stores go to <out_root>/<teacher name>/<split>.zarr
    batch_size: int = setting(32, minimum=1)         # images per teacher forward (texts: 4x this)
    rows_per_shard: int = setting(16384, minimum=1)  # rows per Zarr shard file = one unit of work
    rows_per_chunk: int = setting(256, minimum=1)    # rows per checksummed chunk inside a shard;
                                                     # must divide rows_per_shard
    device: str = setting("auto", pattern=DEVICE_PATTERN)  # "auto" = cuda when available, else cpu
    on_bad_image: Literal["skip", "strict"] = "skip"  # skip: count, log, mark row invalid
    prefetch_batches: int = setting(4, minimum=1)    # decoded batches queued ahead of the teacher
    preprocess_workers: int | None = setting(None, minimum=0)  # threads resizing/normalising images; None = auto
                                           # (none on CPU, where the teacher needs the cores;
                                           # min(8, cores) when the teacher is on a GPU)
    summary_dir: str = "reports/teach"     # per-teacher run summary (forward passes, skips)

    def __post_init__(self) -> None:
        check_settings(self, "teach")
        if self.rows_per_shard % self.rows_per_chunk:
            raise ConfigError(f"teach.rows_per_chunk: {self.rows_per_chunk} does not divide "
                              f"teach.rows_per_shard ({self.rows_per_shard}); a shard holds whole chunks")


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead (decode overlaps compute).

    When the consumer stops early (an error, a closed generator) the thread is told to stop and
    joined, so it does not linger holding open shards.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            put(exc)
            return
        put(done)

    thread = threading.Thread(target=worker, daemon=True, name="teach-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def shards_covering(offsets: list[int], counts: list[int], names: list[str],
                    start: int, stop: int) -> list[str]:
    """Names of the tar shards whose rows intersect ``[start, stop)``."""
    return [n for n, o, c in zip(names, offsets, counts) if o < stop and o + c > start]


def check_finite(emb: np.ndarray, ids: list[str], where: str) -> None:
    """Refuse non-finite teacher outputs before anything is written, naming the samples.

    Called on the float16 values that will be stored, so an output beyond float16's range
    (which would be stored as Inf) is refused too.
    """
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        named = ", ".join(ids[i] for i in bad[:10])
        raise PipelineError(
            f"{where}: the teacher returned NaN/Inf (or values beyond float16) for {bad.size} "
            f"sample(s): {named}. Nothing of this unit was written; check the teacher (weights, "
            "dtype/autocast) and rerun."
        )


def _image_rows(manifest: Manifest, start: int, stop: int, decode: bool,
                handler: Callable) -> Iterator[tuple[int, Any]]:
    """(image row, sample) for rows ``[start, stop)``, in row order; other images are not read."""
    samples = iter_samples(manifest, decode_images=decode, handler=handler, start=start, stop=stop)
    for row, sample in enumerate(samples, start):
        yield row, sample


def _pixel_batches(teacher: Any, manifest: Manifest, start: int, stop: int, cfg: TeachConfig,
                   skipped: list[dict[str, str]], pool: ThreadPoolExecutor | None
                   ) -> Iterator[list[tuple[int, str, torch.Tensor | None]]]:
    """Batches of (unit-relative row, sample id, preprocessed pixels or None if undecodable).

    Preprocessing (resize, crop, normalise) runs on ``pool`` when given: PIL and torch release
    the GIL, so threads keep a GPU teacher fed where one thread could not.
    """
    handler = make_handler(cfg.on_bad_image)
    has_image = "image" in teacher.modalities

    def prep(image: Any) -> torch.Tensor | None:
        return teacher.preprocess(image) if image is not None else None

    for batch in batched(_image_rows(manifest, start, stop, has_image, handler), cfg.batch_size):
        skipped.extend({"id": s.sample_id, "reason": s.error} for _, s in batch if s.error is not None)
        images = [s.image for _, s in batch]
        pixels = list(pool.map(prep, images)) if pool else [prep(im) for im in images]
        yield [(row - start, s.sample_id, px) for (row, s), px in zip(batch, pixels)]


def compute_image_unit(teacher: Any, manifest: Manifest, start: int, stop: int, cfg: TeachConfig,
                       advance: Callable, pool: ThreadPoolExecutor | None = None
                       ) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """Embed images ``[start, stop)``; undecodable ones are listed, marked invalid, left zero."""
    skipped: list[dict[str, str]] = []
    has_image = "image" in teacher.modalities
    n = stop - start
    ids = np.empty(n, dtype=object)
    status = np.full(n, ROW_VALID, dtype=np.uint8)
    emb = np.zeros((n, teacher.embed_dim), dtype=np.float32) if has_image else None
    batches = _pixel_batches(teacher, manifest, start, stop, cfg, skipped, pool)
    for batch in prefetch(batches, cfg.prefetch_batches):
        for i, sid, px in batch:
            ids[i] = sid
            if has_image and px is None:
                status[i] = ROW_INVALID
        good = [(i, px) for i, _, px in batch if px is not None]
        if has_image and good:
            out = teacher.encode_images(torch.stack([px for _, px in good]))
            emb[[i for i, _ in good]] = out.float().cpu().numpy()
        advance(len(batch))
    arrays: dict[str, np.ndarray] = {"image_id": ids.astype(str), "image_status": status}
    if emb is not None:
        arrays["image_emb"] = emb.astype(np.float16)
        check_finite(arrays["image_emb"], list(ids), f"images [{start}, {stop}) of {manifest.root}")
    return arrays, skipped


def _text_rows(manifest: Manifest, start: int, stop: int) -> Iterator[tuple[int, int, str, str]]:
    """(text row, image row, text id, caption) for text rows ``[start, stop)``."""
    names = [s.name for s in manifest.shards]
    t_off, i_off = manifest.text_offsets(), manifest.image_offsets()
    counts = [s.n_texts for s in manifest.shards]
    for name in shards_covering(t_off, counts, names, start, stop):
        k = names.index(name)
        text_row, image_row = t_off[k], i_off[k]
        for sample in iter_samples(manifest, shards=[name], decode_images=False):
            for c, caption in enumerate(sample.captions):
                if start <= text_row < stop:
                    yield text_row, image_row, f"{sample.sample_id}#{c}", caption
                text_row += 1
            image_row += 1


def compute_text_unit(teacher: Any, manifest: Manifest, start: int, stop: int,
                      cfg: TeachConfig, advance: Callable) -> dict[str, np.ndarray]:
    """Embed captions ``[start, stop)`` and record each caption's image row."""
    has_text = "text" in teacher.modalities
    n = stop - start
    ids = np.empty(n, dtype=object)
    to_image = np.full(n, -1, dtype=np.int32)
    emb = np.zeros((n, teacher.embed_dim), dtype=np.float32) if has_text else None
    for batch in batched(_text_rows(manifest, start, stop), cfg.batch_size * 4):
        rows = [t - start for t, _, _, _ in batch]
        ids[rows] = [tid for _, _, tid, _ in batch]
        to_image[rows] = [i for _, i, _, _ in batch]
        if has_text:
            emb[rows] = teacher.encode_texts([cap for *_, cap in batch]).float().cpu().numpy()
        advance(len(batch))
    arrays = {"text_id": ids.astype(str), "text_to_image": to_image,
              "text_status": np.full(n, ROW_VALID, dtype=np.uint8)}
    if emb is not None:
        arrays["text_emb"] = emb.astype(np.float16)
        check_finite(arrays["text_emb"], list(ids), f"texts [{start}, {stop}) of {manifest.root}")
    return arrays


@dataclass
class TeachRun:
    """State of one ``teach`` run over one teacher (what the summary reports)."""

    name: str
    teacher: Any
    cfg: TeachConfig
    manifests: dict[str, Manifest]
    teacher_fp: dict[str, Any]
    pool: ThreadPoolExecutor | None = None  # image preprocessing threads, if any
    units_computed: int = 0
    units_resumed: int = 0
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_root) / self.name

    def store_attrs(self, split: str) -> dict[str, Any]:
        manifest, teacher = self.manifests[split], self.teacher
        return teacher_store_attrs(
            self.teacher_fp, manifest.fingerprint, split, teacher.modalities, teacher.embed_dim,
            teacher.logit_scale, manifest.n_images, manifest.n_texts, self.layout,
            compute=teacher.compute_info(),  # device/autocast: informational only
            on_bad_image=self.cfg.on_bad_image,  # a `skip` store may hold invalid rows
        )

    @property
    def layout(self) -> Layout:
        return Layout(self.cfg.rows_per_shard, self.cfg.rows_per_chunk)


# Attributes a kept store must share with the run: what changes the stored arrays.
CURRENT_KEYS = ("schema", "schema_version", "teacher_fingerprint", "dataset_fingerprint",
                "rows_per_shard", "on_bad_image")


def cache_is_current(out: Path, run: TeachRun) -> bool:
    """Whether ``out`` already holds complete, undamaged stores for this teacher, dataset and
    settings (including ``on_bad_image``: a `skip` store may hold rows `strict` would refuse)."""
    for split in run.manifests:
        store = out / f"{split}.zarr"
        if not (store / "zarr.json").exists():
            return False
        group = zarr.open_group(str(store), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        run.skipped[split] = list(attrs.get("skipped", []))
        expected = run.store_attrs(split)
        if not attrs.get("complete") or any(attrs.get(k) != expected[k] for k in CURRENT_KEYS):
            return False
        faults = _published_faults(store, group)
        if faults:
            log.warning("%s is damaged (%s); rebuilding it", store, "; ".join(faults[:3]))
            return False
    return True


def _published_faults(store: Path, group: zarr.Group) -> list[str]:
    """Cheap checks of a published store (shard files, layout, row status)."""
    faults = structure_faults(store, group)
    if not faults:
        for kind in ("image", "text"):
            try:
                missing = unwritten_rows(group[f"{kind}_status"][:])
            except ValueError as exc:  # checksum mismatch
                faults.append(f"{kind}_status unreadable: {exc}")
                continue
            if missing.size:
                faults.append(f"{missing.size} {kind} rows unwritten")
    return faults


def _run_split(run: TeachRun, scratch: ScratchRun, split: str, advance: Callable) -> None:
    """Compute every unfinished unit of one split into its staging store."""
    manifest = run.manifests[split]
    path = scratch.staging / f"{split}.zarr"
    if not path.exists():
        with creating(path) as tmp:
            create_teacher_store(tmp, n_images=manifest.n_images, n_texts=manifest.n_texts,
                                 embed_dim=int(run.teacher.embed_dim), modalities=run.teacher.modalities,
                                 attrs=run.store_attrs(split), layout=run.layout)
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for kind, n_rows in (("image", manifest.n_images), ("text", manifest.n_texts)):
        for start, stop in row_units(n_rows, run.cfg.rows_per_shard):
            unit = f"{split}-{kind}-{start:012d}"
            if scratch.is_done(unit):
                run.units_resumed += 1
                run.skipped.setdefault(split, []).extend(scratch.done_info(unit).get("skipped", []))
                advance(stop - start)
                continue
            skipped: list[dict[str, str]] = []
            if kind == "image":
                arrays, skipped = compute_image_unit(run.teacher, manifest, start, stop, run.cfg,
                                                     advance, run.pool)
            else:
                arrays = compute_text_unit(run.teacher, manifest, start, stop, run.cfg, advance)
            write_unit(group, start, stop, arrays)
            os.sync()  # the unit's shard files reach the disk before its done marker does
            scratch.mark_done(unit, {"skipped": skipped})
            run.skipped.setdefault(split, []).extend(skipped)
            run.units_computed += 1
    _finalise_store(group, run, split)


def _finalise_store(group: zarr.Group, run: TeachRun, split: str) -> None:
    """Check every row was written, then record skips and mark the store complete."""
    for kind in ("image", "text"):
        missing = unwritten_rows(group[f"{kind}_status"][:])
        if missing.size:
            raise CacheError(f"{group.store}: {missing.size} {kind} rows unwritten "
                             "after all units finished; the scratch directory is damaged: delete it and rerun")
    attrs = dict(group.attrs)
    attrs.update(skipped=sorted(run.skipped.get(split, []), key=lambda s: s["id"]), complete=True)
    validate_attrs(attrs, "teacher-cache.v1", str(group.store))
    group.attrs.update(attrs)


def run_teach(cfg: TeachConfig, name: str, teacher: Any, progress: bool | None = None) -> dict[str, Any]:
    """Build (or resume, or keep) the caches of teacher ``name``; returns the run summary.

    Holds the output's lock throughout (a concurrent run on the same output is refused), first
    repairs a publish that an earlier run left half-done, and keeps a current output as it is.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out_root) / name
    with output_lock(out, f"`distill teach {name}`"):
        recover_replaced(out)
        root = Path(cfg.dataset)
        manifests = {split: load_manifest(root / split, verify=True) for split in cfg.splits}
        run = TeachRun(name, teacher, cfg, manifests, teacher.fingerprint())
        calls_before = teacher.forward_calls
        up_to_date = cache_is_current(run.out, run)
        if up_to_date:
            discard_scratch(run.out)  # left by a run killed right after it published
        else:
            _compute_and_publish(run, progress)
        return _summary(run, up_to_date, teacher.forward_calls - calls_before,
                        time.perf_counter() - t0)


def _compute_and_publish(run: TeachRun, progress: bool | None) -> None:
    """Compute every unfinished unit in the scratch directory, then publish the stores."""
    cfg, manifests = run.cfg, run.manifests
    run.skipped.clear()
    run_fp = fingerprint({
        "teacher": run.teacher_fp, "layout": [cfg.rows_per_shard, cfg.rows_per_chunk],
        "on_bad_image": cfg.on_bad_image,
        "datasets": {s: m.fingerprint for s, m in manifests.items()},
        "package": __version__,
    })
    with disk_full_errors(run.out, run.out.parent / ".scratch" / run.out.name):
        scratch = ScratchRun(run.out, run_fp)
        total = sum(m.n_images + m.n_texts for m in manifests.values())
        workers = preprocess_workers(cfg, run.teacher)
        with ThreadPoolExecutor(workers) if workers else _no_pool() as run.pool, \
                progress_task(f"teach {run.name}", total, progress) as advance:
            for split in cfg.splits:
                _run_split(run, scratch, split, advance)
        scratch.publish()


def preprocess_workers(cfg: TeachConfig, teacher: Any) -> int:
    """Threads for image preprocessing: the configured number, else 0 on CPU, some on a GPU."""
    if cfg.preprocess_workers is not None:
        return cfg.preprocess_workers
    on_gpu = "image" in teacher.modalities and getattr(teacher, "device", torch.device("cpu")).type != "cpu"
    return min(8, os.cpu_count() or 1) if on_gpu else 0


@contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def _summary(run: TeachRun, up_to_date: bool, forward_calls: int, seconds: float) -> dict[str, Any]:
    summary = {
        "teacher": run.name, "teacher_fingerprint": fingerprint(run.teacher_fp),
        "up_to_date": up_to_date, "forward_calls": forward_calls,
        "units_computed": run.units_computed, "units_resumed": run.units_resumed,
        "images": {s: m.n_images for s, m in run.manifests.items()},
        "texts": {s: m.n_texts for s, m in run.manifests.items()},
        "skipped_count": sum(len(v) for v in run.skipped.values()),
        "skipped": run.skipped, "seconds": round(seconds, 3),
    }
    summary_dir = Path(run.cfg.summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / f"{run.name}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
