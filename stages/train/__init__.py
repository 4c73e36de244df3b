"""``distill train``: train a student from teacher caches (no teacher runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output

NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, help="Training processes on this host (one per GPU): above 1, runs "
    "`torchrun --standalone --nproc_per_node N -m stages.cli train` (NCCL on GPUs, gloo on CPUs); "
    "train.batch_size is the global batch. Across hosts, run torchrun yourself (docs/training.md).")]


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None,
            nproc: NprocOpt = 1) -> None:
    """Train the student described by params section `train` (and `recipes.<train.recipe>`)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch_torchrun(params, progress, nproc))
    start_output(progress)
    from stages.train.run import load_train_config, train  # imported here: torch loads only when needed

    with reported_errors():
        summary = train(load_train_config(params), progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per run, not one per process
        print_json(summary)


def launch_torchrun(params: Path, progress: bool | None, nproc: int) -> int:
    """``torchrun`` of this command on ``nproc`` local processes; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.cli", "train", "--params", str(params)]
    if progress is not None:
        cmd.append("--progress" if progress else "--no-progress")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default; train.threads overrides it
    return subprocess.run(cmd, env=env).returncode
