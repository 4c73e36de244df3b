"""Training-step time: cached teacher targets vs an online teacher vs no distillation.

Three students, identical at start (same architecture, same initial weights), take steps on one
fixed batch:

(a) cached   -- teacher targets gathered from in-memory cache arrays (what `distill train` does);
(b) online   -- the teacher encodes the batch's images and captions inside every step (as
                open_clip's ``--distill`` does); its pixels are preprocessed beforehand, as a data
                loader would, so only the teacher forward is charged to the step;
(c) contrastive -- the same step with the contrastive loss only (no teacher at all).

(a) and (b) use the distillation objective of the train config, (c) its contrastive term only.
Modes are interleaved (the order rotates every repeat) so drift in machine load hits all of
them alike; medians are reported. Prints a Markdown table and writes
``benchmarks/results/bench_train_step.json``.

    python benchmarks/bench_train_step.py                      # demo_clip teacher, demo student
    python benchmarks/bench_train_step.py --device cuda --repeats 30
    python benchmarks/bench_train_step.py --teacher open_clip --teacher-model ViT-B-32 \\
        --teacher-pretrained /path/to/open_clip_pytorch_model.bin
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from _common import (demo_batch, machine_info, markdown_table, median, teacher_kwargs, timed,
                     write_results)

from pipeline.config import load_section
from pipeline.losses import DistillBatch, LossTerm, build_objective
from pipeline.students import Student, create_student
from pipeline.teachers import create_teacher
from pipeline.training.schedule import MAX_LOGIT_SCALE, make_optimizer
from stages.train.run import TrainConfig

MODES = ("cached", "online", "contrastive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml",
                   help="student, losses and batch size from its `train` section (defaults if absent)")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--dataset", default="data/emoji/train",
                   help="split to take the batch from (synthetic shapes if missing)")
    p.add_argument("--teacher", default="demo_clip", help="teacher registry name")
    p.add_argument("--teacher-model", default=None, help="`model` kwarg (open_clip, hf_text, timm)")
    p.add_argument("--teacher-pretrained", default=None, help="`pretrained` kwarg (tag or file)")
    p.add_argument("--teacher-kwarg", action="append", default=[], metavar="K=V",
                   help="extra teacher kwarg (JSON value), repeatable")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=8, help="timed steps per mode (interleaved)")
    p.add_argument("--cache-rows", type=int, default=20_000,
                   help="rows of the in-memory cache arrays the targets are gathered from")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The demo train config (params.yaml) or the dataclass defaults, batch size overridden."""
    cfg = load_section(TrainConfig, "train", args.params) if Path(args.params).exists() else TrainConfig()
    return replace(cfg, batch_size=args.batch_size) if args.batch_size else cfg


class Trainee:
    """One student with its objective and optimizer; ``step`` mirrors ``stages.train.run.train_step``."""

    def __init__(self, student: Student, objective: torch.nn.Module, cfg: TrainConfig, device: str):
        self.student = student.to(device).train()
        self.objective = objective.to(device).train()
        self.optimizer = make_optimizer((self.student, self.objective), cfg.lr, cfg.weight_decay)
        self.device = device
        self.amp = cfg.amp and device.startswith("cuda")  # bf16 towers on CUDA, as train_step

    def step(self, pixels: torch.Tensor, captions: list[str], targets: Callable[[], tuple],
             teacher_scale: float | None, rows: torch.Tensor) -> float:
        tokens = self.student.tokenize(captions).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            image_emb = self.student.encode_image(pixels)
            text_emb = self.student.encode_text(tokens)
        teacher_image, teacher_text = targets()
        batch = DistillBatch(image_emb.float(), text_emb.float(), self.student.logit_scale.exp(),
                             teacher_image, teacher_text, teacher_scale, rows, rows)
        total, _ = self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.student.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
        return float(total.detach())


def cached_targets(teacher: Any, pixels: torch.Tensor, captions: list[str], n_rows: int,
                   device: str) -> tuple[Callable[[], tuple], torch.Tensor]:
    """Cache arrays of ``n_rows`` rows holding the batch's real teacher embeddings at random rows.

    Returns the gather function (what the train loop does per step) and the batch's rows.
    """
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n_rows, size=len(captions), replace=False))
    arrays = []
    for emb in (teacher.encode_images(pixels), teacher.encode_texts(captions)):
        table = rng.standard_normal((n_rows, emb.shape[1])).astype(np.float32)
        table[rows] = emb.float().cpu().numpy()
        arrays.append(table)
    image_table, text_table = arrays

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(image_table[rows]).to(device),
                torch.from_numpy(text_table[rows]).to(device))

    return gather, torch.from_numpy(rows)


def online_targets(teacher: Any, pixels: torch.Tensor, captions: list[str],
                   device: str) -> Callable[[], tuple]:
    """The teacher run on the batch; outputs cloned out of inference mode so autograd may save them."""
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return (teacher.encode_images(pixels).to(device).clone(),
                teacher.encode_texts(captions).to(device).clone())
    return run


def build_trainees(cfg: TrainConfig, teacher_dim: int, device: str) -> dict[str, Trainee]:
    """Three identical students: distillation objective for cached/online, contrastive for the third."""
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, **cfg.student_kwargs)
    dims = {"image": teacher_dim, "text": teacher_dim}
    contrastive = [t for t in cfg.losses if t.name == "contrastive"] or [LossTerm("contrastive")]
    trainees = {}
    for mode in MODES:
        terms = contrastive if mode == "contrastive" else cfg.losses
        torch.manual_seed(cfg.seed)  # same init of any loss parameters (feature projections)
        trainees[mode] = Trainee(copy.deepcopy(student), build_objective(terms, student.embed_dim, dims),
                                 cfg, device)
    return trainees


def run_interleaved(steps: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                    device: str) -> dict[str, list[float]]:
    """Step times per mode; every repeat runs each mode once, order rotating."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(steps[name], device))
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg, device = train_config(args), args.device
    kwargs = teacher_kwargs(args)
    teacher = create_teacher(args.teacher, **kwargs).to(device)
    if not {"image", "text"} <= teacher.modalities:
        raise SystemExit(f"teacher {args.teacher!r} lacks a modality; this benchmark needs both")
    images, captions = demo_batch(cfg.batch_size, args.dataset)
    trainees = build_trainees(cfg, teacher.embed_dim, device)
    student = trainees["cached"].student
    pixels = torch.stack([student.preprocess(im) for im in images]).to(device)
    teacher_pixels = torch.stack([teacher.preprocess(im) for im in images]).to(device)
    gather, rows = cached_targets(teacher, teacher_pixels, captions, args.cache_rows, device)
    rows = rows.to(device)
    scale = float(teacher.logit_scale)
    steps = {
        "cached": lambda: trainees["cached"].step(pixels, captions, gather, scale, rows),
        "online": lambda: trainees["online"].step(
            pixels, captions, online_targets(teacher, teacher_pixels, captions, device), scale, rows),
        "contrastive": lambda: trainees["contrastive"].step(
            pixels, captions, lambda: (None, None), None, rows),
    }
    calls_before = teacher.forward_calls
    times = run_interleaved(steps, args.warmup, args.repeats, device)
    return report(args, cfg, teacher, kwargs, times, teacher.forward_calls - calls_before, device)


def report(args: argparse.Namespace, cfg: TrainConfig, teacher: Any, kwargs: dict[str, Any],
           times: dict[str, list[float]], teacher_calls: int, device: str) -> dict[str, Any]:
    """Print the Markdown table and write the JSON result."""
    med = {m: median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    ratios = {"cached_over_contrastive": med["cached"] / med["contrastive"],
              "online_over_cached": med["online"] / med["cached"],
              # minima are the least disturbed by other work on a shared machine
              "cached_over_contrastive_min": best["cached"] / best["contrastive"],
              "online_over_cached_min": best["online"] / best["cached"]}
    rows = [[m, f"{1000 * med[m]:.1f}", f"{1000 * min(times[m]):.1f}",
             f"{cfg.batch_size / med[m]:.1f}"] for m in MODES]
    print(markdown_table(["mode", "median step (ms)", "min step (ms)", "samples/s"], rows))
    print(f"\n(a)/(c) cached / contrastive-only = {ratios['cached_over_contrastive']:.3f} "
          f"(minima: {ratios['cached_over_contrastive_min']:.3f}); (b)/(a) online / cached = "
          f"{ratios['online_over_cached']:.2f} (minima: {ratios['online_over_cached_min']:.2f})")
    result = {
        "benchmark": "bench_train_step", "machine": machine_info(device),
        "student": cfg.student, "student_kwargs": cfg.student_kwargs,
        "losses": [t.name for t in cfg.losses], "batch_size": cfg.batch_size,
        "teacher": args.teacher, "teacher_kwargs": kwargs, "teacher_embed_dim": teacher.embed_dim,
        "warmup": args.warmup, "repeats": args.repeats, "cache_rows": args.cache_rows,
        "teacher_forward_calls": teacher_calls,  # warm-up included
        "median_step_s": med, "step_times_s": times, "ratios": ratios,
    }
    print(f"\nwritten: {write_results('bench_train_step', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
