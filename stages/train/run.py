"""Stage 2 (``train``): fit a student dual encoder to cached teacher embeddings.

Teacher targets come only from the Zarr caches written by ``teach``; this module never builds or
imports a teacher, so a training run costs no teacher forward pass. The loop keeps all its
state in a ``TrainRun`` (no globals). Under ``torchrun`` (``distill train --nproc N``) every
process runs the same loop on its own shards, the student wrapped in DistributedDataParallel and
the losses computed on the global batch (:mod:`pipeline.training.distributed`); rank 0 alone writes the
checkpoint (with every rank's loader position), the log and the outputs.

Outputs in ``out_dir``: ``student.safetensors`` + ``student.json`` (the final model),
``train_log.csv`` (one row per ``log_every`` steps) and ``train_summary.json``. While a run is
going, its resumable state lives beside the output in ``<out parent>/.scratch/<out name>/``:
``last.safetensors`` (weights, optimizer, step, loader position, RNG) and the growing
``train_log.csv``. ``dvc repro`` deletes a stage's outputs before running it, so state kept
inside ``out_dir`` could never be resumed; a finished run publishes the log and removes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.config import (DEVICE_PATTERN, TeacherEntry, check_settings, from_dict, load_params, recipe_fields,
                             setting)
from pipeline.data.captions import load_captions
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.devices import resolve_device, torch_threads
from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.paths import portable
from pipeline.losses import CombinedLoss, LossTerm, build_objective, check_requirements
from pipeline.progress import progress_task
from pipeline.students import Student, create_student, save_checkpoint
from pipeline.training.batch import BatchPlan, assemble
from pipeline.training.checkpoint import apply_train_state, read_train_state, write_train_state
from pipeline.training.distributed import (SINGLE, World, all_gather_objects, barrier, close_world,
                                           device_for, gather_batch, init_world, local_batch_size)
from pipeline.training.guards import teacher_forwards
from pipeline.training.loader import (DistillStream, LoaderState, PlannedStream, SkipEvent,
                                      ViewReplay, collate, iter_batches)
from pipeline.training.metrics_log import MetricsLog, NoLog, log_columns
from pipeline.training.sampler import (hard_negative_rate, image_neighbors_from_i2t, plan_epoch,
                                       random_batch_rate)
from pipeline.training.schedule import MAX_LOGIT_SCALE, lr_at, make_optimizer, set_lr
from pipeline.training.targets import (ReadOptions, TargetSources, TeacherTargets, check_views,
                                       open_targets)
from stages.lock import output_lock

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentInit:
    """Where the student's first weights come from (``train.init``). Unset: its factory's
    (random, or ``pretrained``/``pretrained_file`` in ``train.student_kwargs``). ``from_teacher``:
    weight inheritance, a student of that teacher's family with the chosen layers and the
    teacher's weights (:mod:`pipeline.students.inherit`); ``train.student_kwargs`` then override
    the derived architecture."""

    from_teacher: str | None = None               # a `teachers` entry (its weights are read once)
    image_layers: tuple[int, ...] | None = setting(None, minimum=0)  # teacher image blocks kept, in
                                                  # order (None: all)
    text_layers: tuple[int, ...] | None = setting(None, minimum=0)   # teacher text layers kept
    weights: Literal["teacher", "random"] = "teacher"  # random: the same architecture with random
                                                  # weights (what inheritance adds, measured)
    teacher: TeacherEntry | None = None           # that entry; filled from `teachers.<from_teacher>`


@dataclass(frozen=True)
class TrainConfig:
    """Parameters of the ``train`` stage (``params.yaml`` section ``train``)."""

    student: str = "open_clip_tiny"                               # STUDENTS registry name
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    init: StudentInit = field(default_factory=StudentInit)        # the student's first weights
    recipe: str | None = None                 # name of a `recipes` entry of params.yaml; its keys
                                              # (losses, balancer, ...) replace those given here
    losses: tuple[LossTerm, ...] = (LossTerm("contrastive"), LossTerm("similarity_kl"))
    balancer: str | None = None               # loss-weight balancer (BALANCERS); None = fixed weights
    balancer_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "data/emoji"               # dataset root: one folder of shards per split
    split: str = "train"                      # split trained on (<dataset>/<split>)
    caches: tuple[str, ...] = ("caches/demo_clip/train.zarr",)  # cross-modal teacher caches of that split
    vision_teacher: str | None = None         # a vision-only teacher's cache of the split
    text_teacher: str | None = None           # a text-only teacher's cache of the split
    single_stream_teacher: str | None = None  # the single-stream (ITM) teacher's cache (MCAD)
    neighbors: str | None = None              # top-k neighbours of the cross-modal teacher
    itm_scores: str | None = None             # single-stream scores of those neighbours (stage itm)
    hard_negative_fraction: float = setting(0.0, minimum=0, maximum=1)  # share of each batch filled
                                              # with anchors' nearest neighbours (needs
                                              # `neighbors`); 0 = plain shuffle
    out_dir: str = "models/student"           # model, checkpoints, log and summary go here
    batch_size: int = setting(64, minimum=1)  # (image, caption) pairs per step
    steps: int | None = setting(None, minimum=1)  # total optimizer steps; None = derive from epochs
    epochs: float = setting(10.0, exclusive_minimum=0)  # used when steps is None
    lr: float = setting(5e-4, exclusive_minimum=0)      # peak AdamW learning rate
    weight_decay: float = setting(0.1, minimum=0)       # on matrices only (not biases, norms, logit_scale)
    warmup_steps: int = setting(50, minimum=0)  # linear warm-up, then cosine decay to 0
    grad_clip_norm: float | None = setting(None, exclusive_minimum=0)  # clip the global grad norm when set
    seed: int = setting(0, minimum=0)         # model init, shard/sample order, augmentation
    shuffle_buffer: int = setting(1000, minimum=0)  # samples held for shuffling (per worker; 0 = none)
    augment: bool = True                      # random resized crop + flip on training images
    views: Literal["plain", "sample"] = "plain"  # sample: each (seed, epoch, sample) replays one of
                                              # the stored teacher views (box + flip) for the student
                                              # and distils from that view's embedding; plain: view 0
                                              # as target, the student's own augmentation (`augment`)
    num_workers: int = setting(0, minimum=0)  # DataLoader workers (0 = decode in the main process);
                                              # sample order depends on it: resume with the same value
    log_every: int = setting(10, minimum=1)   # steps between rows of train_log.csv
    checkpoint_every: int = setting(200, minimum=1)  # steps between resumable checkpoints
    device: str = setting("auto", pattern=DEVICE_PATTERN)  # "auto" = cuda when available, else cpu
    threads: int | None = setting(None, minimum=1)  # torch threads of the training process; null =
                                              # torch's default, one per core (DataLoader workers use 1)
    target_cache_mb: int = setting(64, minimum=1)  # decoded store chunks kept per target array
                                              # (rows are read from the stores, never loaded whole)
    verify_stores: bool = True                # read every store chunk once at start (checksums,
                                              # fill values); false: each chunk when first read
    amp: bool = True                          # bf16 autocast for the towers on CUDA (ignored on CPU)
    on_bad_image: Literal["skip", "strict"] = "skip"  # skip: count undecodable images and go on
    resume: bool = True                       # continue an interrupted run from its scratch checkpoint

    def __post_init__(self) -> None:
        check_settings(self, "train")


@dataclass(frozen=True)
class Recipe:
    """A named recipe (params.yaml ``recipes.<name>``), chosen by ``train.recipe``: its keys
    replace the ``train`` keys of the same names, so one experiment switches a whole method."""

    losses: tuple[LossTerm, ...]
    description: str = ""                     # one line for reports
    balancer: str | None = None
    balancer_kwargs: dict[str, Any] = field(default_factory=dict)
    hard_negative_fraction: float = setting(0.0, minimum=0, maximum=1)


def load_train_config(params: str | Path | dict = "params.yaml") -> TrainConfig:
    """``TrainConfig`` from params section ``train``, with ``train.recipe`` applied."""
    data = params if isinstance(params, dict) else load_params(params)
    section = dict(data.get("train") or {})
    name = section.get("recipe")
    if name is not None:
        recipe = recipe_fields(data.get("recipes"), name, Recipe, "train.recipe", "recipes",
                               "(none: add a `recipes` section)")
        recipe.pop("description")
        section.update(recipe)
    init = dict(section.get("init") or {})
    name = init.get("from_teacher")
    if name is not None and init.get("teacher") is None:
        teachers = data.get("teachers") or {}
        if name not in teachers:
            raise ConfigError(f"train.init.from_teacher: {name!r} is not a `teachers` entry (known: "
                              f"{', '.join(sorted(teachers)) or 'none'}); add it there, or give "
                              "its entry as train.init.teacher (e.g. {teacher: aligned, kwargs: "
                              "{heads: models/align/aligned}} for the teacher `distill align` made)")
        section["init"] = init | {"teacher": teachers[name]}
    return from_dict(TrainConfig, section, "train")


def alone_config(cfg: TrainConfig) -> TrainConfig:
    """The same student, data, schedule and seed trained without a teacher: its own contrastive
    loss only and no role stores. The cross-modal caches stay: they pick the same usable rows as
    the distilled run, and no target is read from them."""
    return replace(cfg, recipe="alone", losses=(LossTerm("contrastive"),), balancer=None,
                   balancer_kwargs={}, hard_negative_fraction=0.0, vision_teacher=None,
                   text_teacher=None, single_stream_teacher=None, neighbors=None, itm_scores=None,
                   views="plain")


@dataclass
class TrainRun:
    """Everything one training run holds (passed around instead of module state)."""

    cfg: TrainConfig
    device: torch.device
    manifest: Manifest
    targets: TeacherTargets
    student: Student
    objective: CombinedLoss
    optimizer: torch.optim.Optimizer
    total_steps: int
    run_fingerprint: str
    plan: BatchPlan
    step: int = 0
    loader_state: LoaderState = LoaderState()
    samples_seen: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> reason
    skip_events: int = 0                                   # skips over all epochs
    teacher_forward_calls: int = 0                         # measured; must stay 0
    sampler: dict[str, float] = field(default_factory=dict)  # hard-negative batch statistics
    world: World = SINGLE                                  # this process among torchrun's
    model: Any = None                                      # DistributedDataParallel(StepModel) or None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def work(self) -> Path:
        """Scratch directory of an unfinished run (outside the DVC output)."""
        return self.out.parent / ".scratch" / self.out.name

    @property
    def checkpoint_path(self) -> Path:
        return self.work / "last.safetensors"


def total_steps(cfg: TrainConfig, targets: TeacherTargets) -> int:
    """``cfg.steps``, or ``epochs`` full batches over the usable images."""
    if cfg.steps is not None:
        return cfg.steps
    per_epoch = targets.usable_images() // cfg.batch_size
    if per_epoch == 0:
        raise PipelineError(f"{targets.usable_images()} usable images cannot fill one batch of "
                            f"{cfg.batch_size}; lower train.batch_size")
    return max(1, math.ceil(cfg.epochs * per_epoch))


def run_fingerprint(cfg: TrainConfig, manifest: Manifest, targets: TeacherTargets) -> str:
    """What a checkpoint must agree on to be resumed (steps may change: longer runs resume)."""
    keys = ("student", "student_kwargs", "losses", "balancer", "balancer_kwargs", "batch_size",
            "lr", "weight_decay", "warmup_steps", "grad_clip_norm", "seed", "shuffle_buffer",
            "augment", "on_bad_image", "hard_negative_fraction",
            "num_workers")  # workers split the shards: another count is another sample order
    settings = {k: v for k, v in asdict(cfg).items() if k in keys}
    if cfg.views != "plain":  # (absent when plain: fingerprints of runs without views unchanged)
        settings["views"] = cfg.views
    if cfg.init.from_teacher is not None:  # (likewise absent without inheritance)
        settings["init"] = asdict(cfg.init)
    return fingerprint({"settings": settings, "dataset": manifest.fingerprint,
                        "teachers": sorted(targets.teacher_fingerprints.values())})


def check_objective(objective: CombinedLoss, targets: TeacherTargets) -> None:
    """Fail before the first step if a loss needs cache fields, pairing or candidates the
    stores lack."""
    topk, itm = targets.topk.get("i2t_topk_idx"), targets.cand_itm
    check_requirements(objective, targets.available, targets.paths,
                       neighbor_k=None if topk is None else topk.shape[1],
                       itm_k=None if itm is None else itm.shape[1])
    for name, term in objective.terms.items():
        if term.cross_modal_teacher and not targets.paired:
            raise CacheError(
                f"loss {name!r} compares teacher image and text embeddings, but they come from "
                f"different caches ({targets.sources}); list first a cache of a teacher with both "
                "modalities (stage `teach`) or drop this loss")


def target_sources(cfg: TrainConfig) -> TargetSources:
    """The stores named by the config."""
    return TargetSources(tuple(cfg.caches), cfg.vision_teacher, cfg.text_teacher,
                         cfg.single_stream_teacher, cfg.neighbors, cfg.itm_scores)


def batch_plan(cfg: TrainConfig, objective: CombinedLoss, targets: TeacherTargets,
               manifest: Manifest) -> BatchPlan:
    """What each step computes besides the final embeddings (levels, candidate captions)."""
    if cfg.hard_negative_fraction and not ({"i2i_topk_idx", "i2t_topk_idx"} & set(targets.topk)):
        raise CacheError("train.hard_negative_fraction > 0 needs neighbours: set train.neighbors "
                         "to a store of stage `neighbors`")
    captions = load_captions(manifest) if objective.candidates else None
    return BatchPlan(targets, objective.candidates, objective.itm_candidates,
                     objective.uses_levels, captions, views=cfg.views == "sample")


class StepModel(torch.nn.Module):
    """Student and objective as one module: what DistributedDataParallel wraps. A forward runs
    the student on the local batch, gathers the global batch and returns the objective's
    ``(total, terms)``."""

    def __init__(self, student: Student, objective: CombinedLoss) -> None:
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, plan: BatchPlan, batch: dict[str, Any], device: torch.device, amp: bool,
                world: World) -> tuple[Tensor, dict[str, Tensor]]:
        distill = gather_batch(assemble(plan, self.student, batch, device, amp), world)
        return self.objective(distill)


def check_world(cfg: TrainConfig, manifest: Manifest, world: World) -> None:
    """Refuse a process count the split or the batch cannot be divided by."""
    local_batch_size(cfg.batch_size, world)
    readers = world.size * max(1, cfg.num_workers)
    if world.active and not cfg.hard_negative_fraction and len(manifest.shards) < world.size:
        raise PipelineError(f"{manifest.root}: {len(manifest.shards)} shards cannot be split across "
                            f"{world.size} training processes (each reads whole shards); write the "
                            f"split in at least {world.size} shards (prepare.shard_size) or use fewer")
    if world.active and len(manifest.shards) < readers and not cfg.hard_negative_fraction:
        LOG.warning(f"{len(manifest.shards)} shards for {readers} readers ({world.size} processes x "
                    f"{max(1, cfg.num_workers)} workers): some readers stay idle")


def setup(cfg: TrainConfig, world: World = SINGLE) -> TrainRun:
    """Open data and stores, build student, objective and optimizer (deterministic in seed)."""
    manifest = load_manifest(Path(cfg.dataset) / cfg.split)
    check_world(cfg, manifest, world)
    student = build_student(cfg)  # before the stores are verified: a bad student fails at once
    targets = open_targets(cfg.caches, manifest, target_sources(cfg),
                           ReadOptions(cfg.target_cache_mb << 20, cfg.verify_stores))
    check_views(targets, cfg.views)
    device = torch.device(device_for(resolve_device(cfg.device), world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    objective = build_objective(cfg.losses, student.embed_dim, targets.dims,
                                level_dims=student.level_dims(), balancer=cfg.balancer,
                                balancer_kwargs=cfg.balancer_kwargs,
                                ensemble_dims=targets.member_dims() if targets.ensemble else ())
    check_objective(objective, targets)
    plan = batch_plan(cfg, objective, targets, manifest)
    student.to(device).train()
    objective.to(device).train()
    optimizer = make_optimizer((student, objective), cfg.lr, cfg.weight_decay)
    model = None
    if world.active:  # gradients averaged over the ranks; parameters broadcast from rank 0
        model = torch.nn.parallel.DistributedDataParallel(
            StepModel(student, objective), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # e.g. a balancer's weights outside some steps' graph
    return TrainRun(cfg, device, manifest, targets, student, objective, optimizer,
                    total_steps(cfg, targets), run_fingerprint(cfg, manifest, targets), plan,
                    world=world, model=model)


def build_student(cfg: TrainConfig) -> Student:
    """The student, seeded by ``train.seed``: from its factory, or inheriting from a teacher
    (built here to read its weights once; it runs no forward pass)."""
    if cfg.init.from_teacher is None:
        torch.manual_seed(cfg.seed)
        return create_student(cfg.student, **cfg.student_kwargs)
    from pipeline.students.inherit import inherit
    from pipeline.teachers import create_teacher

    entry = cfg.init.teacher
    if entry is None:
        raise ConfigError(f"train.init.from_teacher: {cfg.init.from_teacher!r} has no teacher entry; "
                          "add it to `teachers` in params.yaml")
    teacher = create_teacher(entry.teacher, **entry.kwargs)
    torch.manual_seed(cfg.seed)  # after the teacher: its own initialisation draws no student weights
    return inherit(teacher, cfg.init.from_teacher, cfg.init.image_layers, cfg.init.text_layers,
                   dict(cfg.student_kwargs), student_name=cfg.student, weights=cfg.init.weights)


def step_loss(run: TrainRun, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective on the (global) batch: through DistributedDataParallel under torchrun."""
    if run.model is not None:
        return run.model(run.plan, batch, run.device, run.cfg.amp, run.world)
    return run.objective(assemble(run.plan, run.student, batch, run.device, run.cfg.amp))


def train_step(run: TrainRun, batch: dict[str, Any]) -> dict[str, float]:
    """One optimizer step; returns the step's metrics (losses, balancer weights, lr...)."""
    lr = lr_at(run.step + 1, run.cfg.lr, run.cfg.warmup_steps, run.total_steps)
    set_lr(run.optimizer, lr)
    total, terms = step_loss(run, batch)
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if run.cfg.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                       run.cfg.grad_clip_norm)
    run.optimizer.step()
    with torch.no_grad():
        run.student.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
    metrics = {"loss": total.item(), **{f"loss_{k}": v.item() for k, v in terms.items()}}
    return {**metrics, **run.objective.logged(), "lr": lr,
            "logit_scale": run.student.logit_scale.exp().item()}


def save_state(run: TrainRun) -> None:
    """Write the resumable checkpoint atomically (weights, optimizer, step, loader, RNG).

    Under torchrun every rank sends rank 0 its loader position, RNG state and skips (a
    collective: all ranks call this at the same step); rank 0 writes them all."""
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    ranks = all_gather_objects({"loader": asdict(run.loader_state), "rng": rng,
                                "skipped": run.skipped, "skip_events": run.skip_events}, run.world)
    if run.world.main:
        write_train_state(run.checkpoint_path, run.student, run.objective, run.optimizer, ranks,
                          {"step": run.step, "samples_seen": run.samples_seen,
                           "run_fingerprint": run.run_fingerprint})


def stale_checkpoint(run: TrainRun) -> str | None:
    """The fingerprint of a scratch checkpoint made with other settings, data or teacher."""
    found = read_train_state(run.checkpoint_path)[1].get("run_fingerprint")
    return None if found == run.run_fingerprint else str(found)


def restore_state(run: TrainRun) -> None:
    """Load the scratch checkpoint into ``run`` (its fingerprint was checked); refuse one made
    by another number of training processes (each rank's stream position would not exist)."""
    tensors, meta = read_train_state(run.checkpoint_path)
    made_by = int(meta.get("world_size", 1))
    if made_by != run.world.size:
        raise PipelineError(
            f"{run.checkpoint_path} was written by a run of {made_by} training process(es) at step "
            f"{meta['step']}, and this run has {run.world.size}: the sample stream is split by "
            f"process, so it resumes only with the same count. Resume with `distill train --nproc "
            f"{made_by}` (torchrun --nproc_per_node {made_by}), or set train.resume: false (or "
            f"delete {run.checkpoint_path.parent}) to start afresh")
    loader = apply_train_state(tensors, meta, run.student, run.objective, run.optimizer,
                               run.world.rank, run.device)
    run.step, run.loader_state = int(meta["step"]), LoaderState(**loader)
    run.samples_seen = int(meta["samples_seen"])
    # skips so far are rank 0's to report; the other ranks count only their new ones
    run.skipped = dict(meta["skipped"]) if run.world.main else {}
    run.skip_events = int(meta["skip_events"]) if run.world.main else 0


def make_dataset(run: TrainRun, epoch: int) -> DistillStream:
    """The training stream of ``epoch``: streamed shards, or planned hard-negative batches."""
    cfg = run.cfg
    transform = run.student.train_transform(augment=cfg.augment)
    replay = (ViewReplay(run.targets.views, run.targets.image_view, transform.replay)
              if cfg.views == "sample" else None)
    if not cfg.hard_negative_fraction:
        return DistillStream(run.manifest, run.targets, transform, seed=cfg.seed, epoch=epoch,
                             shuffle_buffer=cfg.shuffle_buffer, on_bad_image=cfg.on_bad_image,
                             rank=run.world.rank, world_size=run.world.size, replay=replay)
    neighbors = image_neighbors(run.targets)
    batches = plan_epoch(run.targets.usable_image_rows(), neighbors, cfg.batch_size,
                         cfg.hard_negative_fraction, cfg.seed, epoch)
    # how often an image meets its nearest teacher neighbour in its batch, against chance
    run.sampler = {"epoch": epoch, "nearest_neighbour_in_batch": hard_negative_rate(batches, neighbors),
                   "by_chance": random_batch_rate(len(batches) * cfg.batch_size, cfg.batch_size)}
    if run.world.active:  # each rank takes its slice of every global batch
        local = cfg.batch_size // run.world.size
        batches = [b[run.world.rank * local:(run.world.rank + 1) * local] for b in batches]
    order = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    return PlannedStream(run.manifest, run.targets, transform, order, seed=cfg.seed, epoch=epoch,
                         on_bad_image=cfg.on_bad_image, replay=replay)


def image_neighbors(targets: TeacherTargets) -> np.ndarray:
    """Each image's nearest images by the teacher: i2i neighbours, else i2t mapped to images."""
    if "i2i_topk_idx" in targets.topk:
        return targets.topk["i2i_topk_idx"]
    return image_neighbors_from_i2t(targets.topk["i2t_topk_idx"], targets.text_to_image)


def _record_skips(run: TrainRun, skips: list[SkipEvent]) -> None:
    run.skip_events += len(skips)
    for event in skips:
        run.skipped.setdefault(event.sample_id, event.reason)


def _loop(run: TrainRun, log: MetricsLog, advance: Any, stop_after: int | None) -> dict[str, float]:
    """Train until ``total_steps`` (or ``stop_after``, as if killed there); returns last metrics."""
    cfg, last, info = run.cfg, {}, ""
    batches = iter_batches(lambda e: make_dataset(run, e), local_batch_size(cfg.batch_size, run.world),
                           cfg.num_workers, run.loader_state)
    t_log, seen_at_log = time.perf_counter(), run.samples_seen
    coming = None  # the next batch, read one step ahead so its target rows decode meanwhile
    while run.step < run.total_steps and (stop_after is None or run.step < stop_after):
        items, run.loader_state, skips = coming or next(batches)
        coming = None
        if run.step + 1 < run.total_steps and (stop_after is None or run.step + 1 < stop_after):
            coming = next(batches)
            run.targets.prefetch(np.array([it.image_row for it in coming[0]]),
                                 np.array([it.text_row for it in coming[0]]))
        _record_skips(run, skips)
        last = train_step(run, collate(items))
        run.step += 1
        run.samples_seen += len(items) * run.world.size  # the global batch
        if run.step % cfg.log_every == 0 or run.step == run.total_steps:
            now = time.perf_counter()
            rate = (run.samples_seen - seen_at_log) / max(now - t_log, 1e-9)
            log.write({"step": run.step, "epoch": run.loader_state.epoch, **last,
                       "samples_per_s": round(rate, 2)})
            t_log, seen_at_log = now, run.samples_seen
            info = f"loss {last['loss']:.4f}  {rate:.0f} samples/s"
        if run.step % cfg.checkpoint_every == 0 or run.step == run.total_steps:
            save_state(run)
        advance(1, info)
    batches.close()
    return last


def train(cfg: TrainConfig, progress: bool | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the summary also written to ``train_summary.json``.

    progress: see :func:`pipeline.progress.progress_task` (None = a bar on a terminal, else lines).
    stop_after: end this invocation after that step without a final checkpoint, as a kill would
        (for time-boxed jobs and resume tests); the next call resumes from the last checkpoint.

    Holds the lock of ``out_dir`` throughout: a second run on the same output (which would also
    share its scratch checkpoint) is refused naming the first (:class:`stages.lock.LockError`).

    Under ``torchrun`` each process calls this; rank 0 holds the lock and writes everything, the
    other ranks return the same summary without writing.
    """
    world = init_world("cuda" if resolve_device(cfg.device).startswith("cuda") else "cpu")
    lock = output_lock(Path(cfg.out_dir), "`distill train`") if world.main else contextlib.nullcontext()
    try:
        with lock, torch_threads(cfg.threads):
            return _train(cfg, progress if world.main else False, stop_after, world)
    finally:
        close_world(world)


def _resume(run: TrainRun) -> tuple[int | None, str | None]:
    """Restore the scratch checkpoint when it belongs to this configuration, else drop it.
    Returns ``(resumed_from step, discarded run fingerprint)``."""
    if not (run.cfg.resume and run.checkpoint_path.exists()):
        barrier(run.world)
        return None, None
    discarded = stale_checkpoint(run)
    barrier(run.world)  # every rank has read the checkpoint before rank 0 may remove it
    if discarded:  # an interrupted run of other settings: start afresh, as teach does
        if run.world.main:
            LOG.warning(f"{run.checkpoint_path} was made with other settings, data or teacher "
                        f"(run {discarded}); starting a new run")
            shutil.rmtree(run.work)
        return None, discarded
    restore_state(run)
    return run.step, None


def _train(cfg: TrainConfig, progress: bool | None, stop_after: int | None,
           world: World = SINGLE) -> dict[str, Any]:
    t0 = time.perf_counter()
    forwards_before = teacher_forwards()
    run = setup(cfg, world)
    resumed_from, discarded = _resume(run)
    log = (MetricsLog(run.work / "train_log.csv", log_columns(run.objective), run.step)
           if world.main else NoLog())
    start, t_loop = run.step, time.perf_counter()
    try:
        with progress_task(f"train {cfg.student}", run.total_steps, progress, start=start) as advance:
            last = _loop(run, log, advance, stop_after)
    except BaseException:
        log.close()
        if world.main:
            discard_unresumable(run)
        raise
    log.close()
    run.teacher_forward_calls = teacher_forwards() - forwards_before
    if run.teacher_forward_calls:  # targets must come from the caches alone (on every rank)
        raise PipelineError(f"a teacher ran {run.teacher_forward_calls} forward passes during training"
                            + (f" (rank {world.rank})" if world.active else ""))
    _merge_skips(run)
    loop_seconds, seconds = time.perf_counter() - t_loop, time.perf_counter() - t0
    finished = run.step >= run.total_steps
    summary = make_summary(run, last, resumed_from, run.step - start, seconds, loop_seconds, finished)
    summary["discarded_checkpoint"] = discarded
    summary["world_size"] = world.size
    if world.main:
        if finished:
            publish(run)
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "train_summary.json").write_text(json.dumps(portable(summary), indent=2, sort_keys=True) + "\n")
    barrier(world)  # the outputs exist before any rank returns
    return summary


def _merge_skips(run: TrainRun) -> None:
    """Every rank's skipped samples, for rank 0's summary (a collective)."""
    ranks = all_gather_objects((run.skipped, run.skip_events), run.world)
    if run.world.active:
        run.skipped = {k: v for skipped, _ in ranks for k, v in skipped.items()}
        run.skip_events = sum(events for _, events in ranks)


def discard_unresumable(run: TrainRun) -> None:
    """After a failed run: drop its scratch directory unless it holds a checkpoint to resume from
    (a log alone resumes nothing and would be left behind forever)."""
    if run.checkpoint_path.exists():
        return
    shutil.rmtree(run.work, ignore_errors=True)
    if run.work.parent.is_dir() and not any(run.work.parent.iterdir()):
        run.work.parent.rmdir()


def publish(run: TrainRun) -> None:
    """Write the final model and log into ``out_dir`` and drop the run's scratch state."""
    run.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run.out / "student.safetensors", run.student, {}, run.student.spec())
    shutil.copyfile(run.work / "train_log.csv", run.out / "train_log.csv")
    shutil.rmtree(run.work)
    if not any(run.work.parent.iterdir()):
        run.work.parent.rmdir()


def make_summary(run: TrainRun, last: dict[str, float], resumed_from: int | None,
                 steps_this_run: int, seconds: float, loop_seconds: float,
                 finished: bool) -> dict[str, Any]:
    """The run summary (``train_summary.json``)."""
    skipped = [{"id": k, "reason": v} for k, v in sorted(run.skipped.items())]
    return {
        "student": run.cfg.student, "spec": run.student.spec(), "finished": finished,
        "recipe": run.cfg.recipe, "losses": [asdict(t) for t in run.cfg.losses],
        "balancer": run.cfg.balancer,
        "steps": run.step, "total_steps": run.total_steps, "resumed_from": resumed_from,
        "steps_this_run": steps_this_run, "epoch": run.loader_state.epoch,
        "samples_seen": run.samples_seen, "final_metrics": last,
        "teacher_forward_calls": run.teacher_forward_calls, "hard_negative_batches": run.sampler,
        "skipped_count": len(skipped), "skip_events": run.skip_events, "skipped": skipped[:1000],
        "tower_parameters": run.student.tower_parameters(), "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(loop_seconds / steps_this_run, 4) if steps_this_run else None,
        "dataset_fingerprint": run.manifest.fingerprint,
        "caches": run.targets.teacher_fingerprints, "run_fingerprint": run.run_fingerprint,
        # (only when used: summaries of runs without views or ensembles stay as they were)
        **({"views": {"mode": run.cfg.views, "per_image": run.targets.views}}
           if run.cfg.views != "plain" else {}),
        **({"ensemble": [m.path for m in run.targets.members]} if run.targets.ensemble else {}),
    }
