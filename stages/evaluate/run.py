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

from pathlib import Path
from typing import Any

from pipeline.data.manifest import Manifest, load_manifest
from pipeline.devices import resolve_device, torch_threads
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.efficiency import measure_efficiency
from pipeline.evaluation.html_report import write_html_report
from pipeline.evaluation.report import clean_numbers, write_json, write_recall_curves, write_report
from pipeline.evaluation.scoring import (EvalRows, Scores, encode_split, gallery_images, join_rows, pct_of_teacher,
                                         qualitative_examples, retrieval_gallery, score_embeddings,
                                         score_teacher, teacher_rows, times_teacher)
from pipeline.progress import note
from pipeline.stores.teacher import TeacherCache
from pipeline.students import load_student
from stages.lock import output_lock


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
        metrics["times_teacher"] = times_teacher(student_scores.metrics, teacher_scores.metrics)
        curves["teacher"] = teacher_scores.curves
    if cfg.alone_dir:  # what distillation adds: the same student trained without a teacher
        alone_scores = score_alone(cfg, manifest, rows, labels, device, progress)
        metrics["alone"] = alone_scores.metrics
        curves["alone"] = alone_scores.curves
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
    gallery = retrieval_gallery(split, rows, teacher_rows(cache, rows), cfg.gallery_captions,
                                cfg.gallery_images, cfg.gallery_top)
    write_html_report(Path(cfg.html_path), cfg, metrics, curves, gallery,
                      gallery_images(manifest, gallery), notes, device)
    return metrics


def score_alone(cfg: EvalConfig, manifest: Manifest, rows: EvalRows, labels: list[str | None],
                device: str, progress: bool | None) -> Scores:
    """Scores of the student trained alone (``cfg.alone_dir``) on the same rows as the student."""
    alone = load_student(Path(cfg.alone_dir)).to(device).eval()
    split = encode_split(alone, manifest, cfg.encode_batch_size, device, progress)
    return score_embeddings(split.image_emb[rows.image_rows], split.text_emb[rows.text_rows],
                            rows.text_to_image, labels, cfg)
