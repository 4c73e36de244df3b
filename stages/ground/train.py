"""``distill ground train``: fit a grounding student; distillation targets come from the cache.

The training split is read into memory once (images preprocessed, expressions tokenised): the
demo's and RefCOCO-sized splits fit. When a configured loss reads teacher fields (``requires``),
the teacher cache of the split (stage ``teach`` over the grounding dataset, section
``grounding.teach``) is opened with its dataset fingerprint checked against the split's
manifest, and each expression is joined to its rows by stable id (``<shard>/<key>`` for the
scene, ``<shard>/<key>#<c>`` for the expression). No teacher is built: the run counts teacher
forward passes, reports them and fails if there was any.

Outputs in ``out_dir`` (replaced as a whole at the end): ``student.safetensors`` +
``student.json``, ``train_log.csv`` and ``train_summary.json``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config import from_dict, load_params, recipe_fields
from pipeline.data.manifest import load_manifest
from pipeline.devices import resolve_device
from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.evaluation.report import write_json
from pipeline.grounding.boxes import accuracy_at, box_iou, cxcywh_to_xyxy
from pipeline.grounding.data import GroundingSplit, load_split
from pipeline.grounding.losses import GROUNDING_LOSSES, GroundingLoss, GroundTargets
from pipeline.grounding.model import TransVGStudent, create_grounder, save_grounder
from pipeline.fields import made_by
from pipeline.losses.base import LossTerm
from pipeline.progress import progress_task
from pipeline.scratch import replace_dir
from pipeline.stores.teacher import TeacherCache
from pipeline.training.guards import teacher_forwards
from pipeline.training.schedule import lr_at

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTrainConfig:
    """Parameters of ``distill ground train`` (``params.yaml`` section ``grounding.train``)."""

    student: str = "transvg_tiny"                                 # GROUNDING_STUDENTS name
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    recipe: str | None = None              # a `grounding.recipes` entry: its losses replace `losses`
    losses: tuple[LossTerm, ...] = (LossTerm("box_l1", 5.0), LossTerm("box_giou", 2.0))
    dataset: str = "data/emoji_scenes"     # prepared grounding dataset root
    split: str = "train"                   # split trained on (<dataset>/<split>)
    cache: str | None = "caches/grounding/demo_clip/train.zarr"  # teacher cache of that split;
                                           # opened only when a loss reads teacher fields
    out_dir: str = "models/grounding"      # model, log and summary
    batch_size: int = 64                   # expressions per step (>= 1)
    epochs: float = 20.0                   # passes over the expressions (> 0)
    lr: float = 5e-4                       # peak AdamW learning rate
    weight_decay: float = 0.01             # on matrices only
    warmup_steps: int = 20                 # linear warm-up, then cosine decay
    seed: int = 0                          # initialisation and batch order
    log_every: int = 10                    # steps between rows of train_log.csv
    device: str = "auto"                   # "auto" = cuda when available, else cpu


@dataclass(frozen=True)
class GroundRecipe:
    """A named loss list (``grounding.recipes.<name>``) chosen by ``grounding.train.recipe``."""

    losses: tuple[LossTerm, ...]
    description: str = ""


def load_ground_train_config(params: str | Path | dict = "params.yaml") -> GroundTrainConfig:
    """``GroundTrainConfig`` from ``grounding.train`` with ``grounding.train.recipe`` applied."""
    data = params if isinstance(params, dict) else load_params(params)
    grounding = data.get("grounding") or {}
    section = dict(grounding.get("train") or {})
    name = section.get("recipe")
    if name is not None:
        section["losses"] = recipe_fields(grounding.get("recipes"), name, GroundRecipe,
                                          "grounding.train.recipe", "grounding.recipes",
                                          "(none: add grounding.recipes)")["losses"]
    cfg = from_dict(GroundTrainConfig, section, "grounding.train")
    if cfg.batch_size < 1 or not cfg.epochs > 0 or not cfg.losses:
        raise ConfigError("grounding.train: batch_size must be >= 1, epochs > 0 and losses non-empty")
    return cfg


@dataclass
class Objective:
    """The weighted losses of a run."""

    terms: dict[str, GroundingLoss]
    weights: dict[str, float]

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(t.requires for t in self.terms.values()))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.terms.values() for p in t.parameters()]

    def __call__(self, out: Any, targets: GroundTargets) -> tuple[Tensor, dict[str, float]]:
        parts = {name: term(out, targets) for name, term in self.terms.items()}
        total = sum(self.weights[n] * v for n, v in parts.items())
        return total, {n: float(v.detach()) for n, v in parts.items()}  # type: ignore[return-value]


def build_objective(losses: tuple[LossTerm, ...], student_dim: int, teacher_dims: dict[str, int]) -> Objective:
    """Losses by registry name; a repeated name is refused (log columns are per name)."""
    names = [t.name for t in losses]
    if len(set(names)) != len(names):
        raise ConfigError(f"grounding.train.losses: a loss is listed twice in {names}")
    terms = {t.name: GROUNDING_LOSSES.create(t.name, student_dim=student_dim, teacher_dims=teacher_dims,
                                             **t.kwargs) for t in losses}
    return Objective(terms, {t.name: t.weight for t in losses})


def needed_fields(losses: tuple[LossTerm, ...]) -> frozenset[str]:
    """Teacher cache fields the losses read (built with placeholder dims: only ``requires``)."""
    probe = build_objective(losses, 8, {"image": 8, "text": 8})
    return probe.requires


def teacher_targets(cfg: GroundTrainConfig, split: GroundingSplit, fields: frozenset[str],
                    dataset_fingerprint: str) -> dict[str, Tensor]:
    """Per expression: the cached teacher embedding of its scene and of itself."""
    if not fields:
        return {}
    if cfg.cache is None:
        raise ConfigError(f"grounding.train: the losses read {sorted(fields)} "
                          f"({made_by('image_emb')}); set grounding.train.cache")
    cache = TeacherCache.open(cfg.cache, expect_dataset=dataset_fingerprint)
    out: dict[str, Tensor] = {}
    for kind, ids, row_of in (("image", [split.image_ids[i] for i in split.image_index.tolist()],
                               cache.image_row()),
                              ("text", split.text_ids, cache.text_row())):
        if f"{kind}_emb" not in fields:
            continue
        emb, valid = getattr(cache, f"{kind}_emb"), getattr(cache, f"{kind}_valid")
        if emb is None:
            raise CacheError(f"{cache.path}: has no {kind}_emb; the losses need "
                             f"{made_by(f'{kind}_emb')}")
        missing = [i for i in ids if i not in row_of]
        if missing:
            raise CacheError(f"{cache.path}: no {kind} row for {len(missing)} id(s), e.g. {missing[:3]}; "
                             "rebuild it with `distill teach` over the grounding dataset")
        rows = np.array([row_of[i] for i in ids], dtype=np.int64)
        if not valid[rows].all():
            raise CacheError(f"{cache.path}: {int((~valid[rows]).sum())} {kind} rows are invalid "
                             "(undecodable at teach time); fix the images and rerun teach")
        out[kind] = torch.from_numpy(emb[rows])
    return out


def preprocess_split(model: TransVGStudent, split: GroundingSplit) -> tuple[Tensor, Tensor]:
    """Preprocessed pixels ``[N_img, 3, S, S]`` and tokens ``[T, L]`` of a whole split."""
    pixels = torch.stack([model.preprocess(im) for im in split.images])
    return pixels, model.tokenize(split.expressions)


def _optimizer(model: TransVGStudent, objective: Objective, cfg: GroundTrainConfig) -> torch.optim.AdamW:
    params = [p for p in (*model.parameters(), *objective.parameters()) if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)


def train_grounding(cfg: GroundTrainConfig, progress: bool | None = None) -> dict[str, Any]:
    """Train, then publish ``out_dir``; returns the summary written to ``train_summary.json``."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    forwards_before = teacher_forwards()
    manifest = load_manifest(Path(cfg.dataset) / cfg.split, verify=True)
    split = load_split(manifest.root)
    if len(split) < cfg.batch_size:
        raise ConfigError(f"grounding.train.batch_size {cfg.batch_size} exceeds the {len(split)} "
                          f"expressions of {manifest.root}")
    teacher = teacher_targets(cfg, split, needed_fields(cfg.losses), manifest.fingerprint)
    model = create_grounder(cfg.student, **cfg.student_kwargs).to(device)
    objective = build_objective(cfg.losses, model.width, {k: v.shape[1] for k, v in teacher.items()})
    for term in objective.terms.values():
        term.to(device)
    pixels, tokens = preprocess_split(model, split)
    optimizer = _optimizer(model, objective, cfg)
    per_epoch = len(split) // cfg.batch_size
    steps = max(1, math.ceil(cfg.epochs * per_epoch))
    out = Path(cfg.out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    columns = ["step", "epoch", "loss", *(f"loss_{n}" for n in objective.terms), "lr", "samples_per_s"]
    gen = torch.Generator().manual_seed(cfg.seed)
    last: dict[str, float] = {}
    try:
        with (tmp / "train_log.csv").open("w", newline="") as log_file, \
                progress_task("ground train", steps, progress) as advance:
            log = csv.DictWriter(log_file, fieldnames=columns)
            log.writeheader()
            step, t_log, order = 0, time.perf_counter(), torch.empty(0, dtype=torch.long)
            while step < steps:
                if len(order) < cfg.batch_size:  # a new epoch: every expression once, shuffled
                    order = torch.randperm(len(split), generator=gen)
                idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
                step += 1
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                img = split.image_index[idx]
                targets = GroundTargets(split.boxes[idx].to(device),
                                        teacher["image"][idx].to(device) if "image" in teacher else None,
                                        teacher["text"][idx].to(device) if "text" in teacher else None)
                result = model(pixels[img].to(device), tokens[idx].to(device))
                loss, parts = objective(result, targets)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise PipelineError(f"grounding training diverged at step {step} (loss {value}); "
                                        "lower grounding.train.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance(1)
                if step % cfg.log_every == 0 or step == steps:
                    now = time.perf_counter()
                    n_logged = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                    last = {"step": step, "epoch": round(step / per_epoch, 3) if per_epoch else 0.0,
                            "loss": value, **{f"loss_{k}": v for k, v in parts.items()},
                            "lr": lr, "samples_per_s": n_logged * cfg.batch_size / max(now - t_log, 1e-9)}
                    log.writerow(last)
                    log_file.flush()
                    LOG.info("ground train step %d/%d loss %.4f", step, steps, value)
                    t_log = now
        calls = teacher_forwards() - forwards_before
        if calls:
            raise PipelineError(f"grounding training ran {calls} teacher forward pass(es); it must read "
                                "teacher outputs only from the cache")
        save_grounder(tmp / "student.safetensors", model.cpu().eval())
        train_iou = _train_iou(model, pixels, tokens, split)
        summary = {
            "student": cfg.student, "student_kwargs": cfg.student_kwargs, "recipe": cfg.recipe,
            "losses": [asdict(t) for t in cfg.losses], "steps": steps,
            "epochs": round(steps / per_epoch, 3) if per_epoch else 0.0,
            "expressions": len(split), "images": len(split.images),
            "teacher_fields": sorted(teacher), "teacher_forward_calls": calls,
            "final": {k: v for k, v in last.items() if k.startswith("loss")},
            "train_acc_at_0_5": accuracy_at(train_iou), "train_mean_iou": float(train_iou.mean()),
            "parameters": model.tower_parameters(), "device": device, "seed": cfg.seed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(tmp / "train_summary.json", summary)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


@torch.inference_mode()
def predict(model: TransVGStudent, pixels: Tensor, tokens: Tensor, image_index: Tensor,
            batch_size: int = 256) -> Tensor:
    """Predicted normalised cxcywh boxes of every expression, in batches."""
    model.eval()
    device = next(model.parameters()).device
    boxes = [model(pixels[image_index[i:i + batch_size]].to(device), tokens[i:i + batch_size].to(device)).box.cpu()
             for i in range(0, len(tokens), batch_size)]
    return torch.cat(boxes) if boxes else torch.zeros(0, 4)


def _train_iou(model: TransVGStudent, pixels: Tensor, tokens: Tensor, split: GroundingSplit) -> Tensor:
    pred = predict(model, pixels, tokens, split.image_index)
    return box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(split.boxes))
