"""Stage 1 (``teach``): run one frozen teacher over a dataset's splits into Zarr caches.

Work is cut into units of one Zarr shard of rows each (``rows_per_shard`` images, or texts); a
unit is computed by :class:`TeachWork` (read, decode, preprocess, teacher forward, finite check)
and run by the store runner (:mod:`stages.runner`): in this process or on Dask workers, resumed
from done markers after an interruption, published by a rename when every unit is done, and left
alone when the output is already complete for the same teacher, dataset and settings (and not
damaged): a teacher pass is never paid for twice. The store format is
:mod:`pipeline.stores.teacher`.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch

from pipeline import __version__
from pipeline.config import DEVICE_PATTERN, TeacherEntry, check_settings, setting
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.handlers import make_handler
from pipeline.data.shards import iter_samples
from pipeline.devices import torch_threads
from pipeline.errors import ConfigError, PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.iterate import batched, prefetch
from pipeline.paths import portable
from pipeline.stores import StoreSpec
from pipeline.stores import teacher as teacher_format
from pipeline.stores.base import ROW_INVALID, ROW_VALID, Layout
from pipeline.stores.encoding import StoreDtype
from pipeline.stores.location import location, store_root
from pipeline.stores.teacher import encoded_columns, teacher_store_attrs
from pipeline.views import VIEW_FIELDS, ViewSpec, apply_view, view_params
from stages.executors import DaskConfig, ExecutorName, check_executor, open_executor
from stages.runner import (RunResult, StoreJob, Unit, report_rows, run_store_stage, shard_units,
                           skipped_attrs, skipped_by_split)
from stages.teacher_ref import LiveTeacher, TeacherRef, describe_teacher, teacher_source

log = logging.getLogger(__name__)


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
    threads: int | None = setting(None, minimum=1)  # torch threads of the teacher forward (in-process);
                                           # null = torch's default, one per core (Dask: dask.torch_threads)
    on_bad_image: Literal["skip", "strict"] = "skip"  # skip: count, log, mark row invalid
    prefetch_batches: int = setting(4, minimum=1)    # decoded batches queued ahead of the teacher
    preprocess_workers: int | None = setting(None, minimum=0)  # threads resizing/normalising images; None = auto
                                           # (none on CPU, where the teacher needs the cores;
                                           # min(8, cores) when the teacher is on a GPU)
    decode_workers: int | None = setting(None, minimum=0)  # processes reading + decoding + preprocessing images
                                           # apart from the forward (a torch DataLoader per unit);
                                           # None = auto (0 on CPU, min(4, cores) with a GPU)
    summary_dir: str = "reports/teach"     # per-teacher run summary (forward passes, skips)
    executor: ExecutorName = "inprocess"   # inprocess | dask (units as tasks of a Dask cluster)
    dask: DaskConfig = field(default_factory=DaskConfig)  # the cluster, when executor is dask
    devices: tuple[str, ...] = ()          # Dask: worker i runs its teacher on devices[i % len]
                                           # (e.g. [cuda:0, cuda:1]); empty = `device` everywhere
    views: int = setting(1, minimum=1, maximum=256)  # teacher embeddings per image: view 0 is the
                                           # plain image, 1.. augmented (docs/training.md "Augmented views");
                                           # 1 = one embedding per image (schema v1 stores)
    view_splits: tuple[str, ...] = ("train",)  # splits whose stores get the views (others: 1)
    view_scale: tuple[float, float] = setting((0.6, 1.0), exclusive_minimum=0, maximum=1)  # crop area
                                           # share, as RandomResizedCrop (the student's own default)
    view_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), exclusive_minimum=0)  # crop aspect w/h
    view_flip: bool = True                 # flip views 1.. horizontally with probability 1/2
    store_dtype: StoreDtype = "float16"    # float16 | bfloat16 | int8 (codes + a scale per row):
                                           # bytes per value 2, 2, 1 (docs/cache-format.md "Store dtypes")

    def __post_init__(self) -> None:
        check_settings(self, "teach")
        for key in ("view_scale", "view_ratio"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"teach.{key}: expected [low, high] with low <= high, got {list(lo_hi)}")
        if self.rows_per_shard % self.rows_per_chunk:
            raise ConfigError(f"teach.rows_per_chunk: {self.rows_per_chunk} does not divide "
                              f"teach.rows_per_shard ({self.rows_per_shard}); a shard holds whole chunks")

    def view_spec(self, split: str) -> ViewSpec:
        """The views of ``split``'s stores (one view outside ``view_splits``)."""
        views = self.views if split in self.view_splits else 1
        return ViewSpec(views, tuple(self.view_scale), tuple(self.view_ratio), self.view_flip)


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


@dataclass(frozen=True)
class ViewMaker:
    """Preprocessed pixels of every view of one image, and the views' parameters (picklable:
    DataLoader workers get a copy). One view: ``teacher.preprocess(image)`` as without views."""

    spec: ViewSpec = ViewSpec()
    dataset_fingerprint: str = ""

    def __call__(self, teacher: Any, image: Any, sample_id: str) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.spec.views == 1:
            return teacher.preprocess(image), None
        params = view_params(self.spec, self.dataset_fingerprint, sample_id, image.width, image.height)
        return torch.stack([teacher.preprocess(apply_view(image, p)) for p in params]), params


Pixels = tuple[torch.Tensor, np.ndarray | None]  # (pixels [C,H,W] or [V,C,H,W], view params [V,5])


def _pixel_batches(teacher: Any, manifest: Manifest, start: int, stop: int, cfg: TeachConfig,
                   skipped: list[dict[str, str]], pool: ThreadPoolExecutor | None,
                   views: ViewMaker = ViewMaker()) -> Iterator[list[tuple[int, str, Pixels | None]]]:
    """Batches of (unit-relative row, sample id, preprocessed pixels or None if undecodable).

    Preprocessing (resize, crop, normalise) runs on ``pool`` when given: PIL and torch release
    the GIL, so threads keep a GPU teacher fed where one thread could not.
    """
    handler = make_handler(cfg.on_bad_image)
    has_image = "image" in teacher.modalities

    def prep(item: tuple[Any, str]) -> Pixels | None:
        image, sid = item
        return views(teacher, image, sid) if image is not None else None

    for batch in batched(_image_rows(manifest, start, stop, has_image, handler), cfg.batch_size):
        skipped.extend({"id": s.sample_id, "reason": s.error} for _, s in batch if s.error is not None)
        images = [(s.image, s.sample_id) for _, s in batch]
        pixels = list(pool.map(prep, images)) if pool else [prep(im) for im in images]
        yield [(row - start, s.sample_id, px) for (row, s), px in zip(batch, pixels)]


class _DecodedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of a unit's images, read, decoded and preprocessed in a DataLoader worker
    process: a list of (unit-relative row, sample id, pixels or None, decode error or None).
    A shard error is returned, not raised, and raised again in the unit's process (the
    DataLoader would re-raise it as a bare RuntimeError)."""

    def __init__(self, teacher: Any, manifest: Manifest, start: int, bounds: list[tuple[int, int]],
                 on_bad_image: str, views: ViewMaker = ViewMaker()) -> None:
        self.teacher, self.manifest, self.start = teacher, manifest, start
        self.bounds, self.on_bad_image, self.views = bounds, on_bad_image, views

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> Any:
        lo, hi = self.bounds[i]
        has_image = "image" in self.teacher.modalities
        try:
            samples = iter_samples(self.manifest, decode_images=has_image, start=lo, stop=hi,
                                   handler=make_handler(self.on_bad_image))
            return [(row - self.start, s.sample_id,
                     None if s.image is None else self.views(self.teacher, s.image, s.sample_id), s.error)
                    for row, s in enumerate(samples, lo)]
        except PipelineError as exc:
            return exc


def _unbatched(item: Any) -> Any:
    return item


def _loader_batches(teacher: Any, manifest: Manifest, start: int, stop: int, cfg: TeachConfig,
                    skipped: list[dict[str, str]], workers: int, views: ViewMaker = ViewMaker()
                    ) -> Iterator[list[tuple[int, str, Pixels | None]]]:
    """Like :func:`_pixel_batches`, with reading, decoding and preprocessing in ``workers``
    processes (a torch DataLoader), so they never take turns with the teacher forward."""
    bounds = [(lo, min(lo + cfg.batch_size, stop)) for lo in range(start, stop, cfg.batch_size)]
    loader = torch.utils.data.DataLoader(
        _DecodedBatches(teacher, manifest, start, bounds, cfg.on_bad_image, views), batch_size=None,
        num_workers=workers, collate_fn=_unbatched, prefetch_factor=max(1, cfg.prefetch_batches))
    for batch in loader:
        if isinstance(batch, BaseException):
            raise batch
        skipped.extend({"id": sid, "reason": err} for _, sid, _, err in batch if err is not None)
        yield [(i, sid, px) for i, sid, px, _ in batch]


def compute_image_unit(teacher: Any, manifest: Manifest, start: int, stop: int, cfg: TeachConfig,
                       pool: ThreadPoolExecutor | None = None, decode_workers: int = 0,
                       views: ViewSpec = ViewSpec()) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """Embed images ``[start, stop)``; undecodable ones are listed, marked invalid, left zero.

    With ``views.views`` V > 1, every view of an image is embedded (``image_emb [n, V, D]``, the
    V views of ``batch_size`` images in V forwards of ``batch_size`` crops) and the views' boxes
    and flags are returned
    as ``image_view [n, V, 5]``. Images are read and preprocessed in ``decode_workers``
    processes when > 0, else in a prefetch thread (preprocessing on ``pool``'s threads when given)."""
    skipped: list[dict[str, str]] = []
    has_image = "image" in teacher.modalities
    n, v = stop - start, views.views
    ids = np.empty(n, dtype=object)
    status = np.full(n, ROW_VALID, dtype=np.uint8)
    emb = np.zeros((n, v, teacher.embed_dim), dtype=np.float32) if has_image else None
    view = np.zeros((n, v, len(VIEW_FIELDS)), dtype=np.int32) if has_image and v > 1 else None
    maker = ViewMaker(views, manifest.fingerprint)
    if decode_workers > 0:
        batches = _loader_batches(teacher, manifest, start, stop, cfg, skipped, decode_workers, maker)
    else:
        batches = prefetch(_pixel_batches(teacher, manifest, start, stop, cfg, skipped, pool, maker),
                           cfg.prefetch_batches)
    for batch in batches:
        report_rows(len(batch))  # progress within the unit (in-process runs)
        for i, sid, px in batch:
            ids[i] = sid
            if has_image and px is None:
                status[i] = ROW_INVALID
        good = [(i, px) for i, _, px in batch if px is not None]
        if has_image and good:
            pixels = torch.stack([px for _, (px, _) in good]).reshape(-1, *good[0][1][0].shape[-3:])
            # forwards of at most batch_size crops: V views of a batch are V forwards, not one
            # V times as large (a CPU forward slows down per image beyond its cache-sized batch)
            out = torch.cat([teacher.encode_images(pixels[s:s + cfg.batch_size]).float().cpu()
                             for s in range(0, len(pixels), cfg.batch_size)]).numpy()
            rows = [i for i, _ in good]
            emb[rows] = out.reshape(len(good), v, -1)
            if view is not None:
                view[rows] = np.stack([params for _, (_, params) in good])
    arrays: dict[str, np.ndarray] = {"image_id": ids.astype(str), "image_status": status}
    if emb is not None:
        out = stored_values(emb[:, 0] if v == 1 else emb, cfg.store_dtype)
        check_finite(out.reshape(n, -1), list(ids), f"images [{start}, {stop}) of {manifest.root}")
        arrays.update(encoded_columns("image_emb", out, cfg.store_dtype))
    if view is not None:
        arrays["image_view"] = view
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
                      cfg: TeachConfig) -> dict[str, np.ndarray]:
    """Embed captions ``[start, stop)`` and record each caption's image row."""
    has_text = "text" in teacher.modalities
    n = stop - start
    ids = np.empty(n, dtype=object)
    to_image = np.full(n, -1, dtype=np.int32)
    emb = np.zeros((n, teacher.embed_dim), dtype=np.float32) if has_text else None
    for batch in batched(_text_rows(manifest, start, stop), cfg.batch_size * 4):
        report_rows(len(batch))
        rows = [t - start for t, _, _, _ in batch]
        ids[rows] = [tid for _, _, tid, _ in batch]
        to_image[rows] = [i for _, i, _, _ in batch]
        if has_text:
            emb[rows] = teacher.encode_texts([cap for *_, cap in batch]).float().cpu().numpy()
    arrays = {"text_id": ids.astype(str), "text_to_image": to_image,
              "text_status": np.full(n, ROW_VALID, dtype=np.uint8)}
    if emb is not None:
        out = stored_values(emb, cfg.store_dtype)
        check_finite(out, list(ids), f"texts [{start}, {stop}) of {manifest.root}")
        arrays.update(encoded_columns("text_emb", out, cfg.store_dtype))
    return arrays


def stored_values(emb: np.ndarray, store_dtype: str) -> np.ndarray:
    """The teacher's float32 outputs as they are checked and then encoded: float16 for a float16
    store (so a value beyond float16's range is refused), float32 otherwise."""
    return emb.astype(np.float16) if store_dtype == "float16" else emb



def preprocess_workers(cfg: TeachConfig, teacher: Any) -> int:
    """Threads for image preprocessing: the configured number, else 0 on CPU, some on a GPU."""
    if cfg.preprocess_workers is not None:
        return cfg.preprocess_workers
    return min(8, os.cpu_count() or 1) if _images_on_gpu(teacher) else 0


def decode_workers(cfg: TeachConfig, teacher: Any) -> int:
    """Processes reading and preprocessing images: the configured number, else 0 on CPU (the
    teacher needs the cores) and min(4, cores) with a GPU. A daemonic process (a Dask worker
    started without ``distributed.worker.daemon: false``) cannot start them: it decodes itself."""
    workers = cfg.decode_workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if _images_on_gpu(teacher) else 0
    if workers and multiprocessing.current_process().daemon:
        log.warning("teach.decode_workers=%d ignored: this process is daemonic (start Dask workers "
                    "with DASK_DISTRIBUTED__WORKER__DAEMON=False)", workers)
        return 0
    return workers


def _images_on_gpu(teacher: Any) -> bool:
    return "image" in teacher.modalities and getattr(teacher, "device", torch.device("cpu")).type != "cpu"


@contextmanager
def _no_pool() -> Iterator[None]:
    yield None


@dataclass(frozen=True)
class TeachWork:
    """The computation of one teach unit: a pure function of the settings and the unit."""

    cfg: TeachConfig
    manifests: dict[str, Manifest]
    teacher: TeacherRef | LiveTeacher

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The unit's arrays, and its info: skipped samples and teacher forward passes."""
        teacher = self.teacher.get()
        calls = teacher.forward_calls
        manifest = self.manifests[unit.split]
        skipped: list[dict[str, str]] = []
        if unit.part == "image":
            processes = decode_workers(self.cfg, teacher)
            threads = 0 if processes else preprocess_workers(self.cfg, teacher)
            with ThreadPoolExecutor(threads) if threads else _no_pool() as pool:
                arrays, skipped = compute_image_unit(teacher, manifest, unit.start, unit.stop,
                                                     self.cfg, pool, processes,
                                                     self.cfg.view_spec(unit.split))
        else:
            arrays = compute_text_unit(teacher, manifest, unit.start, unit.stop, self.cfg)
        return arrays, {"skipped": skipped, "forward_calls": teacher.forward_calls - calls}


def plan_teach(cfg: TeachConfig, name: str, source: TeacherRef | LiveTeacher, executor: Any) -> StoreJob:
    """The teach job: one teacher store per split, image units then text units of each split."""
    manifests = {split: load_manifest(Path(cfg.dataset).resolve() / split, verify=True)
                 for split in cfg.splits}
    info = executor.call(describe_teacher, source)  # on a worker under Dask: no model here
    layout = Layout(cfg.rows_per_shard, cfg.rows_per_chunk)
    modalities = frozenset(info["modalities"])
    stores, units = {}, []
    for split, m in manifests.items():
        views = cfg.view_spec(split) if "image" in modalities else ViewSpec()
        teacher_fp = info["fingerprint"]
        if views.views > 1:  # the views are part of what the teacher computed
            teacher_fp = teacher_fp | {"views": views.attrs()}
        attrs = teacher_store_attrs(
            teacher_fp, m.fingerprint, split, modalities, info["embed_dim"],
            info["logit_scale"], m.n_images, m.n_texts, layout, views=views,
            store_dtype=cfg.store_dtype,         # other than float16: part of the fingerprint
            compute=info["compute"],             # device/autocast: informational only
            on_bad_image=cfg.on_bad_image)       # a `skip` store may hold invalid rows
        stores[f"{split}.zarr"] = StoreSpec(teacher_format.FORMAT, attrs, dict(
            n_images=m.n_images, n_texts=m.n_texts, embed_dim=info["embed_dim"],
            modalities=modalities, layout=layout))
        units += shard_units(split, "image", m.n_images, cfg.rows_per_shard)
        units += shard_units(split, "text", m.n_texts, cfg.rows_per_shard)
    run_fp = fingerprint({
        "teacher": info["fingerprint"], "layout": [cfg.rows_per_shard, cfg.rows_per_chunk],
        "on_bad_image": cfg.on_bad_image, "datasets": {s: m.fingerprint for s, m in manifests.items()},
        "package": __version__,
        **({"views": {s: cfg.view_spec(s).attrs() for s in manifests}} if cfg.views > 1 else {}),
        **({"store_dtype": cfg.store_dtype} if cfg.store_dtype != "float16" else {}),
    })

    job = StoreJob(f"teach {name}", store_root(cfg.out_root) / name, run_fp, stores, units,
                   TeachWork(cfg, manifests, source), skipped_attrs)
    job.meta.update(teacher=info, manifests=manifests)  # for the summary
    return job


def run_teach(cfg: TeachConfig, name: str, teacher: Any = None, progress: bool | None = None, *,
              entry: TeacherEntry | None = None) -> dict[str, Any]:
    """Build (or resume, or keep) the caches of teacher ``name``; returns the run summary.

    ``teacher``: a built teacher (in-process runs); ``entry``: its params entry, from which every
    worker builds its own (required when ``cfg.executor`` is ``dask``). Holds the output's lock
    throughout (a concurrent run on the same output is refused), first repairs a publish that an
    earlier run left half-done, and keeps a current, undamaged output as it is.
    """
    t0 = time.perf_counter()
    check_executor(cfg.executor, cfg.dask, "teach")
    source = teacher_source(cfg, teacher, entry)
    out = location(cfg.out_root) / name
    with open_executor(cfg.executor, cfg.dask, "teach") as executor, torch_threads(cfg.threads):
        job, result = run_store_stage(out, f"`distill teach {name}`",
                                      lambda: plan_teach(cfg, name, source, executor), executor, progress)
    return _summary(cfg, name, job, result, time.perf_counter() - t0)


def _summary(cfg: TeachConfig, name: str, job: StoreJob, result: RunResult,
             seconds: float) -> dict[str, Any]:
    skipped = skipped_by_split(job, result)
    summary = {
        "teacher": name, "teacher_fingerprint": fingerprint(job.meta["teacher"]["fingerprint"]),
        "up_to_date": result.up_to_date, "executor": cfg.executor, "store_dtype": cfg.store_dtype,
        # threads of the teacher forward: in this process, or each Dask worker's (None: torch's default)
        "torch_threads": cfg.dask.torch_threads if cfg.executor == "dask" else cfg.threads or torch.get_num_threads(),
        "forward_calls": sum(result.infos[k].get("forward_calls", 0) for k in result.computed),
        **result.counters(),
        "images": {s: m.n_images for s, m in job.meta["manifests"].items()},
        "texts": {s: m.n_texts for s, m in job.meta["manifests"].items()},
        "skipped_count": sum(len(v) for v in skipped.values()),
        "skipped": skipped, "seconds": round(seconds, 3),
    }
    summary_dir = Path(cfg.summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / f"{name}.json").write_text(json.dumps(portable(summary), indent=2, sort_keys=True) + "\n")
    return summary
