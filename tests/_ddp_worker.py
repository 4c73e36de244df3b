"""A training process for tests/test_ddp.py, started by ``torchrun`` (real processes, gloo).

    torchrun --nproc_per_node N tests/_ddp_worker.py train CONFIG.json [STOP_AFTER]
    torchrun --nproc_per_node N tests/_ddp_worker.py step1 CONFIG.json OUT.pt

``train`` runs :func:`stages.train.run.train` (``STOP_AFTER``: end after that step as a kill
would). ``step1`` builds the run, takes each rank's first batch, computes the global-batch loss
through DistributedDataParallel and its backward (no optimizer step), and rank 0 saves the loss,
every parameter's gradient and every rank's batch to ``OUT.pt``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.config import from_dict
from pipeline.training.distributed import (all_gather_objects, close_world, init_world,
                                           local_batch_size)
from pipeline.training.loader import LoaderState, collate, iter_batches
from stages.train.run import TrainConfig, make_dataset, setup, step_loss, train


def step1(cfg: TrainConfig, out: Path) -> None:
    world = init_world("cpu")
    try:
        run = setup(cfg, world)
        batches = iter_batches(lambda e: make_dataset(run, e), local_batch_size(cfg.batch_size, world),
                               cfg.num_workers, LoaderState())
        items, _, _ = next(batches)
        batches.close()
        batch = collate(items)
        total, terms = step_loss(run, batch)
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = {f"{prefix}.{name}": p.grad.clone()
                 for prefix, module in (("student", run.student), ("objective", run.objective))
                 for name, p in module.named_parameters() if p.grad is not None}
        local = {k: batch[k] for k in ("pixels", "image_rows", "text_rows", "captions")}
        every = all_gather_objects(local, world)
        if world.main:
            torch.save({"loss": total.item(), "terms": {k: v.item() for k, v in terms.items()},
                        "grads": grads, "batches": every, "world_size": world.size}, out)
    finally:
        close_world(world)


def main() -> None:
    mode, config = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    cfg = from_dict(TrainConfig, config, "train")
    if mode == "train":
        stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
        train(cfg, progress=False, stop_after=stop_after)
    else:
        step1(cfg, Path(sys.argv[3]))


if __name__ == "__main__":
    main()
