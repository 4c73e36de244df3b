"""Outputs of ``evaluate``: ``metrics.json``, the Recall@K curves as CSV for ``dvc plots``, and
the Markdown report (the HTML report is :mod:`pipeline.evaluation.html_report`)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import metrics as M
from pipeline.evaluation.efficiency import MEMORY_METHOD
from pipeline.paths import portable, portable_text, project_path

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvalConfig


def clean_numbers(value: Any) -> Any:
    """JSON-safe numbers: NaN/inf become null (strict JSON readers reject NaN)."""
    if isinstance(value, dict):
        return {k: clean_numbers(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer, np.floating)):
        return clean_numbers(value.item())
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as sorted, indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(clean_numbers(data)), indent=2, sort_keys=True) + "\n")


def write_recall_curves(plots_dir: Path, curves: dict[str, dict[str, np.ndarray]]) -> list[Path]:
    """Recall@K curves as CSV: long (k, direction, model, recall) and wide (k, <model>_<dir>...).

    ``dvc plots`` draws one line per y column, so the wide file is the one to declare in dvc.yaml;
    the long file is the tidy form for other tools.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    series = [(model, direction, curve) for model, by_dir in curves.items()
              for direction, curve in by_dir.items()]
    long_path, wide_path = plots_dir / "recall_at_k.csv", plots_dir / "recall_at_k_wide.csv"
    with long_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "direction", "model", "recall"])
        for model, direction, curve in series:
            w.writerows([k + 1, direction, model, f"{v:.4f}"] for k, v in enumerate(curve))
    n_k = max((len(c) for _, _, c in series), default=0)
    with wide_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k"] + [f"{m}_{d}" for m, d, _ in series])
        for k in range(n_k):
            w.writerow([k + 1] + [f"{c[k]:.4f}" for _, _, c in series])
    return [long_path, wide_path]


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table: '–' for missing or non-finite, thousands separators for ints."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def vs_teacher(metrics: dict[str, Any], key: str) -> str:
    """The last column of the quality table: the student's share of the teacher in percent, or for
    a lower-is-better metric (MedR) the student's value as a multiple of the teacher's."""
    if key in metrics.get("times_teacher", {}):
        return f"{fmt(metrics['times_teacher'][key], 2)}× teacher's (lower is better)"
    return fmt(metrics.get("pct_of_teacher", {}).get(key), 1)


def quality_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the quality table: student, the student trained alone (when scored),
    teacher, and the student against the teacher."""
    student, teacher, alone = metrics["student"], metrics.get("teacher", {}), metrics.get("alone")
    header = ["metric", "student", *(["student alone"] if alone is not None else []), "teacher",
              "student % of teacher"]
    rows = []
    for key, value in student.items():
        digits = 4 if "ndcg" in key else 2
        rows.append([key, fmt(value, digits), *([fmt(alone.get(key), digits)] if alone is not None else []),
                     fmt(teacher.get(key), digits), vs_teacher(metrics, key)])
    return header, rows


def _quality_table(metrics: dict[str, Any]) -> list[str]:
    header, rows = quality_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for key, why in metrics.get("unavailable", {}).items():
        lines += ["", f"{key} has no value (–): {why}."]
    return lines


EFFICIENCY_ROWS = (
    ("params_image", "image tower parameters"), ("params_text", "text tower parameters"),
    ("params_total", "all parameters"),
)


def efficiency_rows(batch_sizes: tuple[int, ...]) -> list[tuple[str, str]]:
    """(metric key, row title) of the efficiency table, in display order."""
    rows = list(EFFICIENCY_ROWS)
    for kind in ("image", "text"):
        for bs in batch_sizes:
            rows.append((f"{kind}_ms_per_item_b{bs}", f"{kind} encode, batch {bs} (ms per {kind})"))
            rows.append((f"{kind}_ms_per_batch_b{bs}", f"{kind} encode, batch {bs} (ms per batch)"))
    return rows + [("loaded_rss_mb", "peak RSS after loading (MiB)"),
                   ("peak_rss_mb", "peak RSS while encoding (MiB)"),
                   ("cuda_peak_mb", "peak CUDA memory (MiB)")]


def _efficiency_table(eff: dict[str, dict[str, float]], batch_sizes: tuple[int, ...]) -> list[str]:
    student, teacher = eff.get("student", {}), eff.get("teacher", {})
    lines = ["| | student | teacher |", "|---|---:|---:|"]
    for key, title in efficiency_rows(batch_sizes):
        if key in student or key in teacher:
            digits = 3 if "_ms_" in key else 1
            lines.append(f"| {title} | {fmt(student.get(key), digits)} | {fmt(teacher.get(key), digits)} |")
    return lines


def _examples_section(examples: list[dict]) -> list[str]:
    lines: list[str] = []
    for ex in examples:
        lines += [f"**`{ex['image_id']}`** (label: {ex['label'] or '–'})", "",
                  "ground truth: " + " / ".join(f"“{c}”" for c in ex["truth"]), ""]
        for rank, (caption, sim, hit) in enumerate(ex["top"], 1):
            lines.append(f"{rank}. {'✓' if hit else '✗'} “{caption}” (cos {sim:.3f})")
        lines.append("")
    return lines


def write_report(path: Path, cfg: EvalConfig, metrics: dict[str, Any], examples: list[dict],
                 notes: list[str], device: str) -> None:
    """The Markdown report: quality table, efficiency table, examples, definitions, notes."""
    counts, machine = metrics["counts"], metrics.get("machine", {})
    ks = ", ".join(str(k) for k in cfg.ks)
    lines = [
        "# Evaluation report", "",
        f"Test split `{project_path(cfg.dataset)}`: {fmt(counts.get('n_images'))} images and "
        f"{fmt(counts.get('n_texts'))} captions scored ({counts['n_images_excluded']} images and "
        f"{counts['n_texts_excluded']} captions excluded for both models: undecodable, invalid in "
        "the teacher cache, or caption of an excluded image).",
        f"Student `{project_path(cfg.student_dir)}`; teacher scored from its cache "
        f"`{project_path(cfg.teacher_cache) if cfg.teacher_cache else None}`"
        + (f"; student alone (the same student trained without a teacher) `{project_path(cfg.alone_dir)}`"
           if cfg.alone_dir else "") + ".", "",
        "## Retrieval quality", "", *_quality_table(metrics), "",
        f"Recall@K in percent (K = {ks}); image→text counts a hit when ANY of the image's captions "
        "is in the top K, text→image when the caption's image is. RSUM = sum of the Recall@K values "
        "of both directions. MedR = median 1-based rank of the first positive (lower is better; its "
        "last column is the student's MedR as a multiple of the teacher's, 1× = as good). Ties in similarity are broken by the lower row.",
        "", "## Efficiency", "", *_efficiency_table(metrics["efficiency"], cfg.latency_batch_sizes), "",
        f"Device `{device}`, {fmt(machine.get('torch_threads'))} torch threads of "
        f"{fmt(machine.get('cpus'))} CPUs, one process; load average while timing "
        f"{fmt(machine.get('load_1min'))} / {fmt(machine.get('load_5min'))} / "
        f"{fmt(machine.get('load_15min'))} (1 / 5 / 15 min). Latency = median of "
        f"{cfg.latency_repeats} timed calls after {cfg.latency_warmup} warm-up calls under "
        "`torch.inference_mode()`; images from preprocessed pixels, texts from strings "
        f"(tokenisation included). Memory: {MEMORY_METHOD}. `VmHWM` is read from "
        "/proc/self/status rather than `getrusage().ru_maxrss`, which in a child started by "
        "fork/vfork + exec also counts the parent's peak.", "",
        "## Qualitative examples (student)", "", *_examples_section(examples),
        "## Relevance definitions", "", M.NDCG_DEFINITION, "",
    ]
    if notes:
        lines += ["## Notes", "", *[f"- {portable_text(n)}" for n in notes], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


