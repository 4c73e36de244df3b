"""Resumable training checkpoints: one safetensors file, written atomically, holding the student's
weights, the objective's state (balancer, loss heads), the optimizer's, and per training process
its RNG state, loader position and skipped samples; the step and run fingerprint go in its
metadata. Non-weight tensor keys hold a ``/`` (``objective/...``, ``optim/<param>/<slot>``,
``rng/torch/<rank>``), which no module's state-dict key does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.students import Student, read_checkpoint, save_checkpoint

OBJECTIVE = "objective/"


def optimizer_extra(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state as checkpoint extras: tensors ``optim/<param>/<name>`` + JSON rest."""
    state = optimizer.state_dict()
    extra: dict[str, Any] = {"optim_groups": state["param_groups"]}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                extra[f"optim/{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    extra["optim_scalars"] = scalars
    return extra


def optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_extra`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta.get("optim_scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["optim_groups"]}


def rank_suffix(rank: int) -> str:
    """Key suffix of a rank's RNG tensors (rank 0 has none, as single-process checkpoints)."""
    return "" if rank == 0 else f"/{rank}"


def write_train_state(path: Path, student: Student, objective: nn.Module,
                      optimizer: torch.optim.Optimizer, ranks: list[dict[str, Any]],
                      meta: dict[str, Any]) -> None:
    """Write the checkpoint. ``ranks``: each training process's ``{"rng": {name: tensor},
    "loader": dict, "skipped": {id: reason}, "skip_events": int}``; ``meta``: step,
    samples_seen, run_fingerprint (JSON)."""
    extra: dict[str, Any] = {f"{OBJECTIVE}{k}": v for k, v in objective.state_dict().items()}
    extra.update(optimizer_extra(optimizer))
    for r, state in enumerate(ranks):
        for name, value in state["rng"].items():
            extra[f"rng/{name}{rank_suffix(r)}"] = value
    skipped: dict[str, str] = {}
    for state in ranks:
        skipped.update(state["skipped"])
    extra.update(meta, loader=ranks[0]["loader"], skipped=skipped,
                 skip_events=sum(st["skip_events"] for st in ranks), world_size=len(ranks),
                 rank_loaders=[st["loader"] for st in ranks])
    save_checkpoint(path, student, extra, student.spec())


def read_train_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's tensors and metadata."""
    return read_checkpoint(path)


def apply_train_state(tensors: dict[str, Tensor], meta: dict[str, Any], student: Student,
                      objective: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                      device: torch.device) -> dict[str, Any]:
    """Load weights, objective and optimizer state and this rank's RNG; returns this rank's
    loader position (a dict)."""
    student.load_state_dict({k: v for k, v in tensors.items() if "/" not in k})
    objective.load_state_dict({k[len(OBJECTIVE):]: v for k, v in tensors.items()
                               if k.startswith(OBJECTIVE)})
    optimizer.load_state_dict(optimizer_state(tensors, meta))
    suffix = rank_suffix(rank)
    torch.set_rng_state(tensors[f"rng/torch{suffix}"])
    if device.type == "cuda" and f"rng/cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng/cuda{suffix}"], device)
    loaders = meta.get("rank_loaders") or [meta["loader"]]
    return loaders[rank]
