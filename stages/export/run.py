"""The ``export`` stage: a trained student taken out of this project.

Writes into ``out_dir`` (replaced as a whole, atomically): ``open_clip/`` (an open_clip student's
config and weights, loaded by ``open_clip.create_model_and_transforms("local-dir:...")``),
``onnx/`` (image and text encoders with a dynamic batch, and their preprocessing) and
``MODEL_CARD.md``. Before anything is kept, each form is loaded back the way a user would
(open_clip's own factory; onnxruntime) and its embeddings compared with the trained student's on
batches of 1 and 7: a form that differs by more than ``atol`` is refused.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import check_settings, setting
from pipeline.errors import PipelineError
from pipeline.export.card import card_title, model_card
from pipeline.export.onnx_form import export_onnx, max_differences
from pipeline.export.open_clip_form import export_open_clip, load_exported
from pipeline.progress import note
from pipeline.scratch import replace_dir, write_durable
from pipeline.students import load_student
from stages.lock import output_lock

CHECK_BATCHES = (1, 7)
CAPTIONS = ("a red apple on a table", "two dogs", "a smiling face with sunglasses", "a flag",
            "the moon at night", "a green leaf", "an old car")


@dataclass(frozen=True)
class ExportConfig:
    """Parameters of the ``export`` stage (``params.yaml`` section ``export``)."""

    student_dir: str = "models/student"           # student.json + student.safetensors (+ train_summary.json)
    out_dir: str = "models/export"                # replaced as a whole
    formats: tuple[Literal["open_clip", "onnx"], ...] = setting(("open_clip", "onnx"), min_items=1)
                                                  # open_clip: only for open_clip students (others
                                                  # are noted and skipped)
    opset: int = setting(18, minimum=18)          # ONNX opset (the torch.export-based exporter's)
    metrics_path: str | None = "reports/eval/metrics.json"  # the evaluation quoted in the card
    name: str | None = None                       # the card's title (None: family, teachers, recipe)
    onnx_atol: float = setting(1e-4, exclusive_minimum=0)   # largest |onnxruntime - torch| allowed
    open_clip_atol: float = setting(1e-5, exclusive_minimum=0)  # largest |open_clip - torch| allowed

    def __post_init__(self) -> None:
        check_settings(self, "export")


def check_batches(student: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed inputs of 1 and 7 samples (pixels in the student's normalised range; captions)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in CHECK_BATCHES:
        pixels = torch.randn(n, 3, student.image_size, student.image_size, generator=gen)
        out.append((pixels, student.tokenize(list(CAPTIONS[:n]))))
    return out


def _check_open_clip(student: Any, out: Path, atol: float) -> float:
    model, _, tokenizer = load_exported(out)
    worst = 0.0
    with torch.no_grad():
        for pixels, _ in check_batches(student):
            tokens = tokenizer(list(CAPTIONS[:len(pixels)]))
            diff = max((model.encode_image(pixels, normalize=True) - student.encode_image(pixels)).abs().max(),
                       (model.encode_text(tokens, normalize=True) - student.encode_text(tokens)).abs().max())
            worst = max(worst, float(diff))
    if worst > atol:
        raise PipelineError(f"{out}: open_clip loads the exported student with embeddings {worst:.2e} "
                            f"away from the trained one (export.open_clip_atol {atol:g}); not kept")
    return worst


def _check_onnx(student: Any, out: Path, atol: float) -> dict[str, float]:
    worst = {"image": 0.0, "text": 0.0}
    for pixels, tokens in check_batches(student):
        for kind, diff in max_differences(student, out, pixels, tokens).items():
            worst[kind] = max(worst[kind], diff)
    if max(worst.values()) > atol:
        raise PipelineError(f"{out}: onnxruntime gives embeddings {worst} away from the trained "
                            f"student (export.onnx_atol {atol:g}); not kept")
    return worst


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_export(cfg: ExportConfig, progress: bool | None = None) -> dict[str, Any]:
    """Export the student of ``cfg.student_dir``; returns the summary (also in the output)."""
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    with output_lock(out, "`distill export`"):
        student = load_student(Path(cfg.student_dir)).eval()
        tmp = out.with_name(f".{out.name}.tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        exported: dict[str, Any] = {}
        try:
            if "open_clip" in cfg.formats:
                if getattr(student, "model_cfg", None) is None:
                    exported["open_clip_skipped"] = f"{student.registry_name} is not an open_clip model"
                else:
                    note(f"export: open_clip form of {cfg.student_dir}", progress)
                    exported["open_clip"] = export_open_clip(student, tmp / "open_clip")
                    exported["open_clip"]["max_difference"] = _check_open_clip(
                        student, tmp / "open_clip", cfg.open_clip_atol)
            if "onnx" in cfg.formats:
                note(f"export: ONNX encoders of {cfg.student_dir}", progress)
                exported["onnx"] = export_onnx(student, tmp / "onnx", cfg.opset)
                exported["onnx"]["max_difference"] = _check_onnx(student, tmp / "onnx", cfg.onnx_atol)
            for form in ("open_clip", "onnx"):  # the card and summary name the published folders
                if form in exported:
                    exported[form]["dir"] = str(out / form)
            spec = student.spec()
            summary = _read_json(Path(cfg.student_dir) / "train_summary.json")
            metrics = _read_json(Path(cfg.metrics_path)) if cfg.metrics_path else None
            card = model_card(cfg.name or card_title(spec, summary), spec, summary, metrics, exported)
            write_durable(tmp / "MODEL_CARD.md", card)
            result = {"student_dir": cfg.student_dir, "out_dir": str(out), "spec": spec,
                      "exported": exported, "seconds": round(time.perf_counter() - t0, 3)}
            write_durable(tmp / "export_summary.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result
