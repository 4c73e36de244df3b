"""Data-parallel training under ``torchrun``: the process group, global-batch gathers, rank 0.

``torchrun --nproc_per_node N -m stages.cli train`` (or ``distill train --nproc N``, which runs
it) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`init_world`
joins them (NCCL on GPUs, gloo on CPUs). One student is trained: ``torch.nn.parallel.
DistributedDataParallel`` averages gradients; each rank reads its own shards of the split
(:func:`pipeline.training.loader.DistillStream`), and in-batch losses see the global batch because
every per-sample field of the batch is all-gathered before the losses, the student's with
gradients (open_clip's ``gather_with_grad``): every rank computes the same global loss, and the
averaged gradient equals a single process's on the same global batch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import PipelineError

# The differentiable all_gather is public API whose replacement is still private
# (torch.distributed._functional_collectives); its deprecation notice says nothing to a user.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and outputs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (one process when unset)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device_type: str, timeout_s: float = 1800) -> World:
    """Join the process group of a ``torchrun`` launch (a no-op for a single process)."""
    world = world_from_env()
    if world.active and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return world


def close_world(world: World) -> None:
    """Leave the process group (after the last collective)."""
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: Tensor) -> Tensor:
    """``x`` of every rank concatenated along dim 0, differentiable (the backward sums each
    slice's gradient over the ranks, as open_clip's ``gather_with_grad``)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_plain(x: Tensor) -> Tensor:
    """``x`` of every rank concatenated along dim 0 (no gradient: teacher targets, row ids)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _gather(x: Tensor) -> Tensor:
    return gather_with_grad(x) if x.requires_grad else gather_plain(x)


def gather_batch(batch: Any, world: World) -> Any:
    """A :class:`~pipeline.losses.DistillBatch` of the global batch: every per-sample tensor
    field (first dimension = the local batch) gathered from all ranks in rank order; scalars
    (the logit scales) are left as they are."""
    if not world.active:
        return batch
    local = batch.image_emb.shape[0]
    changes: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == local:
            changes[f.name] = _gather(value)
        elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            changes[f.name] = tuple(_gather(v) for v in value)
    return replace(batch, **changes)


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects; a collective)."""
    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def local_batch_size(global_batch: int, world: World) -> int:
    """Samples per rank and step: ``train.batch_size`` is the global batch."""
    if global_batch % world.size:
        raise PipelineError(f"train.batch_size {global_batch} is not divisible by the {world.size} "
                            "training processes: every rank takes an equal share of the global "
                            "batch; choose a multiple of the process count")
    return global_batch // world.size


def device_for(device: str, world: World) -> str:
    """Each rank's device: ``cuda`` becomes ``cuda:<local rank>`` (one GPU per process)."""
    if world.active and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device
