"""``distill ground evaluate``: Acc@0.5 and mean IoU on the test split, by expression type;
parameters and latency; a Markdown report with pictures of predicted and true boxes.

Acc@0.5 is the share of expressions whose predicted box has IoU >= 0.5 with the true box (the
RefCOCO convention); IoU is computed on normalised boxes, which equals the IoU in pixels.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config import load_section
from pipeline.data.manifest import load_manifest
from pipeline.devices import resolve_device
from pipeline.evaluation.efficiency import median_latency_ms
from pipeline.evaluation.report import write_json
from pipeline.grounding.boxes import accuracy_at, box_iou, cxcywh_to_xyxy
from pipeline.grounding.data import GroundingSplit, load_split
from pipeline.grounding.model import TransVGStudent, load_grounder
from pipeline.grounding.report import draw_examples, pick_examples, write_report
from pipeline.paths import project_path
from stages.ground.train import predict, preprocess_split


@dataclass(frozen=True)
class GroundEvalConfig:
    """Parameters of ``distill ground evaluate`` (section ``grounding.evaluate``)."""

    dataset: str = "data/emoji_scenes/test"  # dataset directory of the test split
    student_dir: str = "models/grounding"    # holds student.json + student.safetensors
    batch_size: int = 256                    # expressions per forward when predicting
    latency_batch_sizes: tuple[int, ...] = (1, 64)  # (image, expression) pairs per timed call
    latency_warmup: int = 2                  # untimed calls before timing
    latency_repeats: int = 5                 # timed calls; the median is reported
    device: str = "cpu"                      # "cpu", "cuda" or "auto"
    n_examples: int = 6                      # pictures in the report (spread over types)
    metrics_path: str = "reports/ground/metrics.json"
    figures_dir: str = "reports/ground/figures"  # example_<i>.png: true (green) and predicted (red) boxes
    report_path: str = "reports/ground/report.md"


def load_ground_eval_config(params: str | Path | dict = "params.yaml") -> GroundEvalConfig:
    """``GroundEvalConfig`` from params section ``grounding.evaluate``."""
    return load_section(GroundEvalConfig, "grounding.evaluate", params)


def score(pred: Tensor, true: Tensor, types: list[str]) -> dict[str, Any]:
    """Acc@0.5, mean IoU and count, overall and by expression type (boxes normalised cxcywh)."""
    iou = box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true))
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(types):
        by_type[t].append(i)
    return {
        "acc_at_0_5": accuracy_at(iou), "mean_iou": float(iou.mean()) if len(iou) else float("nan"),
        "n": len(iou),
        "by_type": {t: {"acc_at_0_5": accuracy_at(iou[rows]), "mean_iou": float(iou[rows].mean()),
                        "n": len(rows)} for t, rows in sorted(by_type.items())},
    }


def efficiency(model: TransVGStudent, pixels: Tensor, tokens: Tensor, cfg: GroundEvalConfig,
               device: str) -> dict[str, float]:
    """Parameters per part and median latency of one forward per batch size (pixels already
    preprocessed; tokenisation timed too, as it is part of every query)."""
    out: dict[str, float] = {f"params_{k}": v for k, v in model.tower_parameters().items()}
    out["params_total"] = sum(p.numel() for p in model.parameters())
    texts = ["the larger dog left of the pizza"]
    for bs in cfg.latency_batch_sizes:
        px = pixels[torch.arange(bs) % len(pixels)].to(device)

        def run() -> Any:
            return model(px, model.tokenize(texts * bs).to(device))

        ms = median_latency_ms(run, cfg.latency_warmup, cfg.latency_repeats, device)
        out[f"ms_per_batch_b{bs}"] = ms
        out[f"ms_per_pair_b{bs}"] = ms / bs
    return out


def evaluate_grounding(cfg: GroundEvalConfig) -> dict[str, Any]:
    """Score the student on ``cfg.dataset``; write metrics, figures and the report."""
    device = resolve_device(cfg.device)
    manifest = load_manifest(cfg.dataset, verify=True)
    split: GroundingSplit = load_split(manifest.root)
    model = load_grounder(Path(cfg.student_dir)).to(device)
    pixels, tokens = preprocess_split(model, split)
    pred = predict(model, pixels, tokens, split.image_index, cfg.batch_size)
    metrics = score(pred, split.boxes, split.types)
    metrics["efficiency"] = efficiency(model, pixels, tokens, cfg, device)
    metrics.update(dataset=project_path(cfg.dataset), dataset_fingerprint=manifest.fingerprint,
                   student=model.spec(), device=device)
    examples = pick_examples(split, pred, cfg.n_examples)
    figures = draw_examples(split, pred, examples, Path(cfg.figures_dir))
    write_json(Path(cfg.metrics_path), metrics)
    write_report(Path(cfg.report_path), metrics, figures, examples, split, pred, cfg.latency_batch_sizes)
    return metrics
