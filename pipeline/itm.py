"""Stage ``itm``: single-stream (image-text matching) teacher scores of each image's top-k captions.

A single-stream teacher (BLIP's ITM head) reads an image and a caption together, so scoring all
N×N pairs is out of reach. MCAD (arXiv 2310.19654) distils from it on a short list instead: for
every image, its top-k captions by the dual-stream teacher, read from the neighbour store that
``distill neighbors`` built (``i2t_topk_idx``, first k columns; k = 11 as in the paper).

Output, one Zarr v3 group per split at ``<out_root>/<dual>/<split>.zarr`` (schema
``schemas/itm-scores.v1.json``):

* ``i2t_cand_idx [N_images, k] int32``: the candidate text rows, in neighbour order (-1: none);
* ``i2t_cand_itm [N_images, k] float32``: the ITM log-odds of "match" of each (image, candidate),
  NaN where the index is -1;
* ``image_status [N_images] uint8``: 1 valid, 2 invalid (an image the dual teacher marked invalid
  or that cannot be decoded: its row is all -1/NaN), 0 never written (caught on open).

Work is cut into units of one Zarr shard of image rows and resumes like ``teach``: finished
units are recorded in a scratch directory, the stores are published by a rename once complete,
and an output already complete for the same teacher, neighbours and dataset is left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import zarr

from pipeline import __version__
from pipeline.cache import (ROW_INVALID, ROW_VALID, Layout, base_attrs, create_array,
                            open_group_checked, raise_faults, read_array, row_units,
                            structure_faults, unwritten_rows, validate_attrs, write_unit)
from pipeline.config import DEVICE_PATTERN, check_settings, setting
from pipeline.data.captions import load_captions
from pipeline.data.shards import Manifest, iter_samples, load_manifest, make_handler
from pipeline.errors import CacheError, FingerprintMismatchError, PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.progress import progress_task
from pipeline.lock import output_lock
from pipeline.scratch import ScratchRun, creating, disk_full_errors, recover_replaced
from pipeline.teach import batched, prefetch

SCHEMA_NAME = "itm-scores.v1"
SCHEMA_ID = "vlm-distill/itm-scores"
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

    def __post_init__(self) -> None:
        check_settings(self, "itm")


@dataclass(frozen=True)
class ItmScores:
    """A verified ITM score store of one split, loaded into memory."""

    path: Path
    cand_idx: np.ndarray          # [N_images, k] int32 text rows; -1 = no candidate
    cand_itm: np.ndarray          # [N_images, k] float32 ITM log-odds; NaN where cand_idx is -1
    image_valid: np.ndarray       # [N_images] bool
    k: int
    dataset_fingerprint: str
    neighbors_fingerprint: str
    single_teacher_fingerprint: str
    source_teacher_fingerprint: str  # the dual-stream teacher the candidates came from
    attrs: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Candidates:
    """The first k image→text neighbours of one split, with the fingerprint of what they are."""

    path: Path
    idx: np.ndarray               # [N_images, k] int32
    fingerprint: str
    source_teacher_fingerprint: str


# ------------------------------------------------------------------------ candidates
def _open_i2t(path: Path, k: int, dual: str) -> tuple[zarr.Group, zarr.Array]:
    """The neighbour store's ``i2t_topk_idx``, refusing a store without it or with < k columns."""
    group = open_group_checked(path, "neighbors.v1")
    if "i2t_topk_idx" not in group:
        raise CacheError(f"{path}: no i2t_topk_idx array: the neighbours of {dual!r} were built "
                         "without the i2t direction; add i2t to neighbors.directions and rerun "
                         "`distill neighbors`")
    arr = group["i2t_topk_idx"]
    if arr.shape[1] < k:
        raise CacheError(f"{path}: i2t_topk_idx holds {arr.shape[1]} neighbours per image but "
                         f"itm.k is {k}; lower itm.k to at most {arr.shape[1]} or set neighbors.k "
                         f">= {k} and rerun `distill neighbors`")
    return group, arr


def load_candidates(path: str | Path, k: int, manifest: Manifest, dual: str = "") -> Candidates:
    """Read and check the first ``k`` image→text neighbours of ``manifest``'s split."""
    path = Path(path)
    group, arr = _open_i2t(path, k, dual)
    attrs = dict(group.attrs)
    if attrs["dataset_fingerprint"] != manifest.fingerprint:
        raise FingerprintMismatchError("dataset", str(path), manifest.fingerprint,
                                       attrs["dataset_fingerprint"],
                                       "rerun `distill teach` and `distill neighbors` on this dataset")
    idx = np.asarray(arr[:, :k], dtype=np.int32)
    sim = np.asarray(group["i2t_topk_sim"][:, :k])
    if idx.shape[0] != manifest.n_images:
        raise CacheError(f"{path}: {idx.shape[0]} image rows but the dataset has {manifest.n_images}")
    lost = np.flatnonzero(np.isnan(sim).any(axis=1))
    if lost.size:  # NaN is the similarity fill value: a shard file of the store is missing
        raise CacheError(f"{path}: i2t rows {lost[:5].tolist()} read back as fill values: a shard "
                         "file is missing; rerun `distill neighbors` or `dvc checkout`")
    if idx.size and (idx.max() >= manifest.n_texts or idx.min() < -1):
        raise CacheError(f"{path}: i2t_topk_idx holds text rows outside [0, {manifest.n_texts}): "
                         "the store does not belong to this dataset; rerun `distill neighbors`")
    digest = hashlib.sha256(idx.astype("<i4").tobytes()).hexdigest()
    source = attrs["source_teacher_fingerprint"]
    fp = fingerprint({"dataset_fingerprint": manifest.fingerprint, "k": k,
                      "source_teacher_fingerprint": source, "i2t_cand_idx_sha256": digest})
    return Candidates(path, idx, fp, source)


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
               start: int, stop: int, batch_size: int, advance: Callable
               ) -> tuple[dict[str, np.ndarray], list[dict[str, str]], int]:
    """ITM scores of the candidates of image rows ``[start, stop)``: (arrays, skipped, pairs)."""
    idx = cand[start:stop].copy()
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
        advance(len(batch))
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
@dataclass
class ItmRun:
    """State of one ``itm`` run (what the summary reports)."""

    cfg: ItmConfig
    dual: str
    teacher: Any
    teacher_fp: dict[str, Any]
    manifests: dict[str, Manifest]
    candidates: dict[str, Candidates]
    units_computed: int = 0
    units_resumed: int = 0
    pairs_scored: int = 0
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_root) / self.dual

    def store_attrs(self, split: str) -> dict[str, Any]:
        """Root attributes of the split's new (still incomplete) store."""
        manifest, cand = self.manifests[split], self.candidates[split]
        attrs = base_attrs(SCHEMA_ID) | dict(
            k=self.cfg.k, split=split, dual=self.dual, n_images=manifest.n_images,
            n_texts=manifest.n_texts, dataset_fingerprint=manifest.fingerprint,
            neighbors_fingerprint=cand.fingerprint,
            source_teacher_fingerprint=cand.source_teacher_fingerprint,
            single_teacher=self.teacher_fp, single_teacher_fingerprint=fingerprint(self.teacher_fp),
            rows_per_shard=self.cfg.rows_per_shard, skipped=[],
            compute=self.teacher.compute_info())  # device/autocast: informational only
        validate_attrs(attrs, SCHEMA_NAME, f"ITM scores of {cand.path}")
        return attrs


_CURRENT_KEYS = ("single_teacher_fingerprint", "neighbors_fingerprint", "dataset_fingerprint",
                 "k", "rows_per_shard", "schema_version")


def store_is_current(run: ItmRun) -> bool:
    """Whether the output already holds complete stores for this teacher, neighbours and data."""
    for split in run.manifests:
        store = run.out / f"{split}.zarr"
        if not (store / "zarr.json").exists():
            return False
        attrs = dict(zarr.open_group(str(store), mode="r", zarr_format=3).attrs)
        expected = run.store_attrs(split)
        if not attrs.get("complete") or any(attrs.get(k) != expected[k] for k in _CURRENT_KEYS):
            return False
        run.skipped[split] = list(attrs.get("skipped", []))
    return True


def _create_store(path: Path, run: ItmRun, split: str) -> None:
    n, k = run.manifests[split].n_images, run.cfg.k
    layout = Layout(run.cfg.rows_per_shard, min(256, run.cfg.rows_per_shard))
    with creating(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        create_array(group, "i2t_cand_idx", (n, k), "int32", layout, -1)
        create_array(group, "i2t_cand_itm", (n, k), "float32", layout, np.nan)
        create_array(group, "image_status", (n,), "uint8", layout, 0)
        group.attrs.update(run.store_attrs(split))


def _run_split(run: ItmRun, scratch: ScratchRun, split: str, advance: Callable) -> None:
    """Score every unfinished unit of one split into its staging store, then mark it complete."""
    manifest, path = run.manifests[split], scratch.staging / f"{split}.zarr"
    if not path.exists():
        _create_store(path, run, split)
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    captions: list[str] | None = None
    for start, stop in row_units(manifest.n_images, run.cfg.rows_per_shard):
        unit = f"{split}-itm-{start:012d}"
        if scratch.is_done(unit):
            run.units_resumed += 1
            run.skipped.setdefault(split, []).extend(scratch.done_info(unit).get("skipped", []))
            advance(stop - start)
            continue
        captions = captions if captions is not None else load_captions(manifest)
        arrays, skipped, pairs = score_unit(run.teacher, manifest, captions,
                                            run.candidates[split].idx, start, stop,
                                            run.cfg.batch_size, advance)
        write_unit(group, start, stop, arrays)
        os.sync()  # the unit's shard files reach the disk before its done marker does
        scratch.mark_done(unit, {"skipped": skipped})
        run.skipped.setdefault(split, []).extend(skipped)
        run.units_computed += 1
        run.pairs_scored += pairs
    _finalise_store(group, run, split)


def _finalise_store(group: zarr.Group, run: ItmRun, split: str) -> None:
    missing = unwritten_rows(group["image_status"][:])
    if missing.size:
        raise CacheError(f"{group.store}: {missing.size} image rows unwritten after all units "
                         "finished; the scratch directory is damaged: delete it and rerun")
    attrs = dict(group.attrs)
    attrs.update(skipped=sorted(run.skipped.get(split, []), key=lambda s: s["id"]), complete=True)
    validate_attrs(attrs, SCHEMA_NAME, str(group.store))
    group.attrs.update(attrs)


def run_itm(cfg: ItmConfig, teacher: Any, dual: str | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Score (or resume, or keep) the top-k candidates of every image of ``cfg.splits`` with the
    single-stream ``teacher``; candidates come from the neighbours of teacher ``dual``
    (default ``cfg.dual``). Returns the run summary, also written to ``<summary_dir>/<dual>.json``."""
    t0 = time.perf_counter()
    dual = dual or cfg.dual
    pair_scorer(teacher)  # a teacher without an ITM head fails before any work
    manifests = {s: load_manifest(Path(cfg.dataset) / s, verify=True) for s in cfg.splits}
    candidates = {s: load_candidates(Path(cfg.neighbors_root) / dual / f"{s}.zarr", cfg.k, m, dual)
                  for s, m in manifests.items()}
    run = ItmRun(cfg, dual, teacher, teacher.fingerprint(), manifests, candidates)
    calls_before = teacher.forward_calls
    with output_lock(run.out, f"`distill itm {dual}`"):  # one writer per output
        recover_replaced(run.out)
        up_to_date = store_is_current(run)
        if not up_to_date:
            _compute(run, progress)
    return _summary(run, up_to_date, teacher.forward_calls - calls_before, time.perf_counter() - t0)


def _compute(run: ItmRun, progress: bool | None) -> None:
    """Score every unfinished unit in scratch space, then publish the stores at once."""
    run.skipped.clear()
    run_fp = fingerprint({"teacher": run.teacher_fp, "k": run.cfg.k, "rows": run.cfg.rows_per_shard,
                          "candidates": {s: c.fingerprint for s, c in run.candidates.items()},
                          "package": __version__})
    with disk_full_errors(run.out, run.out.parent / ".scratch" / run.out.name):
        scratch = ScratchRun(run.out, run_fp)
        total = sum(m.n_images for m in run.manifests.values())
        with progress_task(f"itm {run.dual}", total, progress) as advance:
            for split in run.cfg.splits:
                _run_split(run, scratch, split, advance)
        scratch.publish()


def _summary(run: ItmRun, up_to_date: bool, forward_calls: int, seconds: float) -> dict[str, Any]:
    summary = {
        "dual": run.dual, "single": run.cfg.single, "k": run.cfg.k,
        "single_teacher_fingerprint": fingerprint(run.teacher_fp),
        "up_to_date": up_to_date, "forward_calls": forward_calls,
        "units_computed": run.units_computed, "units_resumed": run.units_resumed,
        "rows": {s: m.n_images for s, m in run.manifests.items()},
        "pairs_scored": run.pairs_scored,
        "skipped_count": sum(len(v) for v in run.skipped.values()),
        "skipped": run.skipped, "seconds": round(seconds, 3),
    }
    summary_dir = Path(run.cfg.summary_dir)
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / f"{run.dual}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ------------------------------------------------------------------------------- reading
def open_itm_scores(path: str | Path, expect_dataset: str | None = None) -> ItmScores:
    """Open and check one split's ITM score store: schema, completeness, the dataset fingerprint
    (when ``expect_dataset`` is given) and that no row reads back as fill values."""
    path = Path(path)
    group = open_group_checked(path, SCHEMA_NAME)
    attrs = dict(group.attrs)
    if expect_dataset is not None and expect_dataset != attrs["dataset_fingerprint"]:
        raise FingerprintMismatchError("dataset", str(path), expect_dataset, attrs["dataset_fingerprint"],
                                       "rerun `distill itm` (or `dvc repro`), or point to the right store")
    raise_faults(path, structure_faults(path, group))  # edited attributes; a lost shard reads as fill
    idx = read_array(group, "i2t_cand_idx", path).astype(np.int32)
    itm = read_array(group, "i2t_cand_itm", path).astype(np.float32)
    status = read_array(group, "image_status", path)
    _check_rows(path, idx, itm, status)
    return ItmScores(path, idx, itm, status == ROW_VALID, int(attrs["k"]),
                     attrs["dataset_fingerprint"], attrs["neighbors_fingerprint"],
                     attrs["single_teacher_fingerprint"], attrs["source_teacher_fingerprint"], attrs)


def _check_rows(path: Path, idx: np.ndarray, itm: np.ndarray, status: np.ndarray) -> None:
    """A lost shard file reads back as fill values (status 0, index -1, score NaN): refuse it."""
    has = idx >= 0
    bad = (status == 0) | ((status == ROW_VALID) & ((has != np.isfinite(itm)).any(axis=1) | ~has.any(axis=1)))
    rows = np.flatnonzero(bad)
    if rows.size:
        raise CacheError(
            f"{path}: {rows.size} image rows were never written or read back as fill values (first "
            f"rows {rows[:5].tolist()}): a shard file is missing or the run did not finish; restore "
            "the store with `dvc checkout`/`dvc pull` or rebuild it with `distill itm`")
