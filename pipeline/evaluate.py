"""Stage 3 (``evaluate``): retrieval quality and efficiency of a student next to its teacher.

The student encodes the test split from its shards; the teacher is scored from its cache of the
same split. Both are scored on the same rows: cache rows are joined to shard samples by their
stable ids, and an image is kept only when the student could decode it AND the cache marks it
valid; a caption is kept only when its image is kept and the cache marks the caption valid.

Outputs: ``metrics.json`` (numbers nested by model and section, which ``dvc metrics show``
flattens, and under ``unavailable`` why a metric has no value), Recall@K curves as CSV for ``dvc plots``, a Markdown report, and a self-contained HTML
report with plots and a retrieval gallery. The work is split by concern: scoring in
:mod:`pipeline.evaluation.scoring`, efficiency probes in :mod:`pipeline.evaluation.efficiency`,
outputs in :mod:`pipeline.evaluation.report` and :mod:`pipeline.evaluation.html_report`; this
module holds the stage's config and runs the steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from pipeline.cache import TeacherCache
from pipeline.config import DEVICE_PATTERN, check_settings, setting
from pipeline.data.shards import Manifest, RandomAccess, SkipCounter, load_manifest
from pipeline.devices import resolve_device, torch_threads
from pipeline.evaluation.efficiency import measure_efficiency
from pipeline.evaluation.html_report import write_html_report
from pipeline.evaluation.report import clean_numbers, write_json, write_recall_curves, write_report
from pipeline.evaluation.scoring import (EvalRows, Gallery, encode_split, join_rows, pct_of_teacher,
                                         qualitative_examples, retrieval_gallery, score_embeddings,
                                         score_teacher)
from pipeline.lock import output_lock
from pipeline.progress import note
from pipeline.students import load_student


@dataclass(frozen=True)
class EvalConfig:
    """Parameters of the ``evaluate`` stage (``params.yaml`` section ``evaluate``)."""

    dataset: str = "data/emoji/test"             # dataset directory of the test split
    student_dir: str = "models/student"          # holds student.json + student.safetensors
    teacher_cache: str | None = "caches/demo_clip/test.zarr"  # same split; null = student only
    teacher: str | None = "demo_clip"            # registry name for efficiency; null = skip it
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_teacher
    ks: tuple[int, ...] = setting((1, 5, 10), minimum=1, min_items=1)  # Recall@K cut-offs (RSUM sums
                                                 # them over both directions)
    curve_max_k: int = setting(50, minimum=1)    # Recall@K curve for K = 1..curve_max_k
    ndcg_k: int = setting(10, minimum=1)         # single-modal NDCG cut-off
    encode_batch_size: int = setting(64, minimum=1)  # images (and texts) per student forward when encoding
    latency_batch_sizes: tuple[int, ...] = setting((1, 64), minimum=1)  # batch sizes timed for the
                                                 # efficiency table
    latency_warmup: int = setting(2, minimum=0)  # untimed calls before timing (allocator, caches)
    latency_repeats: int = setting(5, minimum=1)  # timed calls; the median is reported
    measure_memory: bool = True                  # peak memory via a subprocess per model
    device: str = setting("cpu", pattern=DEVICE_PATTERN)  # "cpu", "cuda" or "auto"
    threads: int | None = setting(None, minimum=1)  # torch threads for encoding and timing; null = torch's
                                                 # default, one per core (the report records the count)
    block_rows: int = setting(1024, minimum=1)   # query rows per similarity tile (bounds memory)
    n_examples: int = setting(3, minimum=0)      # test images shown with their top-3 captions
    metrics_path: str = "reports/eval/metrics.json"
    plots_dir: str = "reports/eval/plots"        # recall_at_k.csv (+ _wide.csv for dvc plots)
    report_path: str = "reports/eval/report.md"
    html_path: str = "reports/eval/index.html"   # self-contained HTML report (pictures embedded)
    gallery_captions: int = setting(6, minimum=0)  # test captions shown with their top images
    gallery_images: int = setting(4, minimum=0)  # test images shown with their top captions
    gallery_top: int = setting(5, minimum=1)     # retrieved items shown per query

    def __post_init__(self) -> None:
        check_settings(self, "evaluate")


def _teacher_rows(cache: TeacherCache | None, rows: EvalRows):
    """The teacher's (image, text) embeddings on the scored rows, when it has both towers."""
    if cache is None or cache.image_emb is None or cache.text_emb is None:
        return None
    return (cache.image_emb[rows.cache_image_rows].astype(np.float32),  # rows only, as float32
            cache.text_emb[rows.cache_text_rows].astype(np.float32))


def gallery_images(manifest: Manifest, gallery: Gallery) -> dict[str, PIL.Image.Image]:
    """The images the gallery shows, read by id from the shards (only those, not the split)."""
    reader = RandomAccess(manifest, handler=SkipCounter())
    try:
        images = {sid: reader.read(sid).image for sid in gallery.image_ids()}
    finally:
        reader.close()
    gray = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    return {sid: im if im is not None else gray for sid, im in images.items()}


def evaluate(cfg: EvalConfig, progress: bool | None = None) -> dict[str, Any]:
    """Score student and teacher on the test split; write metrics.json, plots and the reports.

    Returns the metrics dict exactly as written to ``cfg.metrics_path``. Holds the lock of
    ``metrics_path`` throughout: a second evaluation writing the same reports is refused.
    """
    with output_lock(Path(cfg.metrics_path), "`distill evaluate`"), torch_threads(cfg.threads):
        return _evaluate(cfg, progress)


def _evaluate(cfg: EvalConfig, progress: bool | None) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    manifest = load_manifest(cfg.dataset)
    student = load_student(Path(cfg.student_dir)).to(device).eval()
    split = encode_split(student, manifest, cfg.encode_batch_size, device, progress,
                         keep_images=max(cfg.latency_batch_sizes))
    cache = (TeacherCache.open(cfg.teacher_cache, expect_dataset=manifest.fingerprint, lazy=True)
             if cfg.teacher_cache else None)
    rows = join_rows(split, cache)
    note(f"evaluate: scoring retrieval on {len(rows.image_rows)} images", progress)
    labels = [split.labels[i] for i in rows.image_rows]
    student_scores = score_embeddings(split.image_emb[rows.image_rows], split.text_emb[rows.text_rows],
                                      rows.text_to_image, labels, cfg)
    metrics: dict[str, Any] = {"student": student_scores.metrics}
    if student_scores.unavailable:  # in words, not a bare null (same rows for the teacher)
        metrics["unavailable"] = student_scores.unavailable
    curves = {"student": student_scores.curves}
    if cache is not None:
        teacher_scores = score_teacher(cache, rows, labels, cfg)
        metrics["teacher"] = teacher_scores.metrics
        metrics["pct_of_teacher"] = pct_of_teacher(student_scores.metrics, teacher_scores.metrics)
        curves["teacher"] = teacher_scores.curves
    metrics["counts"] = {**student_scores.counts, "n_images_excluded": rows.n_images_excluded,
                         "n_texts_excluded": rows.n_texts_excluded}
    notes: list[str] = []
    note("evaluate: measuring size, latency and memory", progress)
    metrics["efficiency"], metrics["machine"] = measure_efficiency(cfg, student, split, device, notes)
    metrics = clean_numbers(metrics)
    write_json(Path(cfg.metrics_path), metrics)
    write_recall_curves(Path(cfg.plots_dir), curves)
    examples = qualitative_examples(split, rows, cfg.n_examples)
    write_report(Path(cfg.report_path), cfg, metrics, examples, notes, device)
    gallery = retrieval_gallery(split, rows, _teacher_rows(cache, rows), cfg.gallery_captions,
                                cfg.gallery_images, cfg.gallery_top)
    write_html_report(Path(cfg.html_path), cfg, metrics, curves, gallery,
                      gallery_images(manifest, gallery), notes, device)
    return metrics
