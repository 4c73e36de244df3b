"""Stage ``itm``: single-stream (image-text matching) teacher scores of each image's top-k captions.

A single-stream teacher (BLIP's ITM head) reads an image and a caption together, so scoring all
N×N pairs is out of reach. MCAD (arXiv 2310.19654) distils from it on a short list instead: for
every image, its top-k captions by the dual-stream teacher, read from the neighbour store that
``distill neighbors`` built (``i2t_topk_idx``, first k columns; k = 11 as in the paper).

Output: one Zarr v3 group per split at ``<out_root>/<dual>/<split>.zarr``, in the format of
:mod:`pipeline.stores.itm` (schema ``schemas/itm-scores.v1.json``).

A unit is one Zarr shard of image rows (:class:`ItmWork`); the store runner
(:mod:`stages.runner`) runs units in-process or on Dask, resumes from done markers, publishes
by a rename once complete, and leaves alone an output already complete (and undamaged) for the
same teacher, neighbours and dataset.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline import __version__
from pipeline.config import DEVICE_PATTERN, TeacherEntry, check_settings, setting
from pipeline.data.captions import load_captions
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.handlers import make_handler
from pipeline.data.shards import iter_samples
from pipeline.errors import PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.iterate import batched, prefetch
from pipeline.paths import portable
from pipeline.stores import StoreSpec
from pipeline.stores import itm as itm_format
from pipeline.stores.base import ROW_INVALID, ROW_VALID, Layout
from pipeline.stores.neighbors import candidate_rows, load_candidates
from stages.executors import DaskConfig, ExecutorName, open_executor
from stages.runner import (RunResult, StoreJob, Unit, run_store_stage, shard_units, skipped_attrs,
                           skipped_by_split)
from stages.teacher_ref import LiveTeacher, TeacherRef, describe_teacher, teacher_source

_PREFETCH_BATCHES = 4


@dataclass(frozen=True)
class ItmConfig:
    """Parameters of the ``itm`` stage (``params.yaml`` section ``itm``)."""

    dual: str = "demo_clip"                 # key of `teachers` whose neighbours give the candidates
    single: str = "blip"                    # key of `teachers`: the single-stream (ITM) teacher
    k: int = setting(11, minimum=1)         # candidates scored per image (MCAD uses 11)
    splits: tuple[str, ...] = setting(("train",), min_items=1)
    dataset: str = "data/emoji"             # dataset root: one folder of shards per split
    neighbors_root: str = "caches/neighbors"  # reads <neighbors_root>/<dual>/<split>.zarr
    out_root: str = "caches/itm"            # writes <out_root>/<dual>/<split>.zarr
    batch_size: int = setting(64, minimum=1)  # (image, caption) pairs per teacher forward; whole
                                            # images: max(1, batch_size // k) images per forward
    device: str = setting("auto", pattern=DEVICE_PATTERN)  # "auto" = cuda when available, else cpu
    rows_per_shard: int = setting(16384, minimum=1)  # image rows per Zarr shard = one unit of work
    summary_dir: str = "reports/itm"        # run summary: <summary_dir>/<dual>.json
    executor: ExecutorName = "inprocess"    # inprocess | dask (units as tasks of a Dask cluster)
    dask: DaskConfig = field(default_factory=DaskConfig)  # the cluster, when executor is dask
    devices: tuple[str, ...] = ()           # Dask: worker i runs its teacher on devices[i % len]

    def __post_init__(self) -> None:
        check_settings(self, "itm")


# ----------------------------------------------------------------------------- scoring
Scorer = Callable[[torch.Tensor, Sequence[Sequence[str]]], torch.Tensor]


def pair_scorer(teacher: Any) -> Scorer:
    """``(pixels [B,...], captions per image) -> flat scores``: the teacher's
    ``score_candidates`` (vision tower once per image), else ``score_pairs`` on repeated pixels."""
    if callable(getattr(teacher, "score_candidates", None)):
        return teacher.score_candidates
    if not callable(getattr(teacher, "score_pairs", None)):
        raise PipelineError(
            f"teacher {getattr(teacher, 'name', teacher)!r} has no image-text matching head "
            "(score_pairs): itm.single must name a single-stream teacher such as blip_itm")

    def score(pixels: torch.Tensor, texts: Sequence[Sequence[str]]) -> torch.Tensor:
        owner = torch.tensor([b for b, group in enumerate(texts) for _ in group], dtype=torch.long)
        return teacher.score_pairs(pixels.index_select(0, owner), [t for g in texts for t in g])

    return score


def _decoded_batches(teacher: Any, manifest: Manifest, start: int, stop: int, per_batch: int,
                     skipped: list[dict[str, str]]) -> Iterator[list[tuple[int, str, Any]]]:
    """Batches of (unit-relative row, sample id, preprocessed pixels or None if undecodable)."""
    samples = iter_samples(manifest, handler=make_handler("skip"), start=start, stop=stop)
    for batch in batched(enumerate(samples), per_batch):
        skipped.extend({"id": s.sample_id, "reason": s.error} for _, s in batch if s.error)
        yield [(i, s.sample_id, None if s.image is None else teacher.preprocess(s.image))
               for i, s in batch]


def _score_batch(score: Scorer, captions: list[str], idx: np.ndarray, itm: np.ndarray,
                 batch: list[tuple[int, str, Any]]) -> int:
    """Score every valid candidate of the batch's images into ``itm``; returns pairs scored."""
    rows = [(i, px) for i, _, px in batch if px is not None and (idx[i] >= 0).any()]
    if not rows:
        return 0
    texts = [[captions[j] for j in idx[i] if j >= 0] for i, _ in rows]
    flat = score(torch.stack([px for _, px in rows]), texts).float().cpu().numpy()
    offset = 0
    for (i, _), group in zip(rows, texts):
        itm[i, idx[i] >= 0] = flat[offset:offset + len(group)]
        offset += len(group)
    return offset


def score_unit(teacher: Any, manifest: Manifest, captions: list[str], cand: np.ndarray,
               start: int, stop: int, batch_size: int
               ) -> tuple[dict[str, np.ndarray], list[dict[str, str]], int]:
    """ITM scores of the candidates ``cand`` (``[stop - start, k]`` text rows) of image rows
    ``[start, stop)``: (arrays, skipped, pairs)."""
    idx = np.array(cand, dtype=np.int32)
    itm = np.full(idx.shape, np.nan, dtype=np.float32)
    ids = np.empty(len(idx), dtype=object)
    undecodable = np.zeros(len(idx), dtype=bool)
    skipped: list[dict[str, str]] = []
    per_batch = max(1, batch_size // max(1, idx.shape[1]))
    score, pairs = pair_scorer(teacher), 0
    batches = _decoded_batches(teacher, manifest, start, stop, per_batch, skipped)
    for batch in prefetch(batches, _PREFETCH_BATCHES):
        for i, sid, px in batch:
            ids[i], undecodable[i] = sid, px is None
        pairs += _score_batch(score, captions, idx, itm, batch)
    invalid = undecodable | (idx < 0).all(axis=1)
    idx[invalid], itm[invalid] = -1, np.nan
    check_scores(itm, idx, list(ids), f"images [{start}, {stop}) of {manifest.root}")
    status = np.where(invalid, ROW_INVALID, ROW_VALID).astype(np.uint8)
    return {"i2t_cand_idx": idx, "i2t_cand_itm": itm, "image_status": status}, skipped, pairs


def check_scores(itm: np.ndarray, idx: np.ndarray, ids: list[str], where: str) -> None:
    """Refuse NaN/Inf scores of real candidates before anything is written, naming the images."""
    bad = np.flatnonzero(((idx >= 0) & ~np.isfinite(itm)).any(axis=1))
    if bad.size:
        named = ", ".join(ids[i] for i in bad[:10])
        raise PipelineError(
            f"{where}: the single-stream teacher returned NaN/Inf for {bad.size} image(s): {named}. "
            "Nothing of this unit was written; check the teacher (weights, dtype/autocast) and rerun.")


# ------------------------------------------------------------------------------- the run
_CAPTIONS: dict[str, list[str]] = {}  # captions of a split, read once per process


def captions_once(manifest: Manifest) -> list[str]:
    """Every caption of ``manifest``'s split by text row, read once per process."""
    if manifest.fingerprint not in _CAPTIONS:
        _CAPTIONS.clear()
        _CAPTIONS[manifest.fingerprint] = load_captions(manifest)
    return _CAPTIONS[manifest.fingerprint]


@dataclass(frozen=True)
class ItmWork:
    """The computation of one itm unit (one shard of image rows): reads the unit's candidates
    from the neighbour store, the images from the shards, and scores them."""

    cfg: ItmConfig
    manifests: dict[str, Manifest]
    neighbors: dict[str, str]  # split -> neighbour store (checked by load_candidates)
    teacher: TeacherRef | LiveTeacher

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        teacher = self.teacher.get()
        calls = teacher.forward_calls
        manifest = self.manifests[unit.split]
        cand = candidate_rows(self.neighbors[unit.split], unit.start, unit.stop, self.cfg.k)
        arrays, skipped, pairs = score_unit(teacher, manifest, captions_once(manifest), cand,
                                            unit.start, unit.stop, self.cfg.batch_size)
        return arrays, {"skipped": skipped, "pairs": pairs,
                        "forward_calls": teacher.forward_calls - calls}


def plan_itm(cfg: ItmConfig, dual: str, source: TeacherRef | LiveTeacher, executor: Any) -> StoreJob:
    """The itm job: one score store per split, one unit per shard of image rows."""
    info = executor.call(describe_teacher, source)
    if not info["has_itm"]:
        raise PipelineError(
            f"teacher {info['name']!r} has no image-text matching head "
            "(score_pairs): itm.single must name a single-stream teacher such as blip_itm")
    manifests = {s: load_manifest(Path(cfg.dataset).resolve() / s, verify=True) for s in cfg.splits}
    nn_root = Path(cfg.neighbors_root).resolve() / dual
    candidates = {s: load_candidates(nn_root / f"{s}.zarr", cfg.k, m, dual) for s, m in manifests.items()}
    layout = Layout(cfg.rows_per_shard, min(256, cfg.rows_per_shard))
    stores, units = {}, []
    for split, m in manifests.items():
        attrs = itm_format.store_attrs(cfg.k, cfg.rows_per_shard, dual, split, m, candidates[split], info)
        stores[f"{split}.zarr"] = StoreSpec(itm_format.FORMAT, attrs, dict(n_images=m.n_images, layout=layout))
        units += shard_units(split, "itm", m.n_images, cfg.rows_per_shard)
    run_fp = fingerprint({"teacher": info["fingerprint"], "k": cfg.k, "rows": cfg.rows_per_shard,
                          "candidates": {s: c.fingerprint for s, c in candidates.items()},
                          "package": __version__})

    work = ItmWork(cfg, manifests, {s: str(c.path) for s, c in candidates.items()}, source)
    return StoreJob(f"itm {dual}", Path(cfg.out_root).resolve() / dual, run_fp, stores, units, work,
                    skipped_attrs, meta={"teacher": info, "manifests": manifests})


def run_itm(cfg: ItmConfig, teacher: Any = None, dual: str | None = None,
            progress: bool | None = None, *, entry: TeacherEntry | None = None) -> dict[str, Any]:
    """Score (or resume, or keep) the top-k candidates of every image of ``cfg.splits`` with the
    single-stream teacher; candidates come from the neighbours of teacher ``dual`` (default
    ``cfg.dual``). ``teacher``: a built teacher (in-process); ``entry``: its params entry, from
    which every worker builds its own (required on Dask). Returns the run summary, also written
    to ``<summary_dir>/<dual>.json``."""
    t0 = time.perf_counter()
    dual = dual or cfg.dual
    source = teacher_source(cfg, teacher, entry, "itm")
    with open_executor(cfg.executor, cfg.dask, "itm") as executor:
        job, result = run_store_stage(Path(cfg.out_root) / dual, f"`distill itm {dual}`",
                                      lambda: plan_itm(cfg, dual, source, executor), executor, progress)
    return _summary(cfg, dual, job, result, time.perf_counter() - t0)


def _summary(cfg: ItmConfig, dual: str, job: StoreJob, result: RunResult, seconds: float) -> dict[str, Any]:
    skipped = skipped_by_split(job, result)
    computed = [result.infos[k] for k in result.computed]
    summary = {
        "dual": dual, "single": cfg.single, "k": cfg.k,
        "single_teacher_fingerprint": fingerprint(job.meta["teacher"]["fingerprint"]),
        "up_to_date": result.up_to_date, "executor": cfg.executor,
        "forward_calls": sum(i.get("forward_calls", 0) for i in computed),
        **result.counters(),
        "rows": {s: m.n_images for s, m in job.meta["manifests"].items()},
        "pairs_scored": sum(i.get("pairs", 0) for i in computed),
        "skipped_count": sum(len(v) for v in skipped.values()),
        "skipped": skipped, "seconds": round(seconds, 3),
    }
    summary_dir = Path(cfg.summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / f"{dual}.json").write_text(json.dumps(portable(summary), indent=2, sort_keys=True) + "\n")
    return summary
