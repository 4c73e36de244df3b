"""``distill train``: train a student from teacher caches (no teacher runs)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output

NprocOpt = Annotated[int, typer.Option(
    "--nproc", min=1, help="Training processes on this host (one per GPU): above 1, runs "
    "`torchrun --standalone --nproc_per_node N -m stages.cli train` (NCCL on GPUs, gloo on CPUs); "
    "train.batch_size is the global batch. Across hosts, run torchrun yourself (docs/training.md).")]


AloneOpt = Annotated[bool, typer.Option(
    "--alone", help="Train the same student without a teacher (its own contrastive loss only, no "
    "role stores), as the baseline that evaluate.alone_dir scores beside the distilled student.")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out-dir", help="Override train.out_dir.")]


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None,
            nproc: NprocOpt = 1, alone: AloneOpt = False, out_dir: OutDirOpt = None) -> None:
    """Train the student described by params section `train` (and `recipes.<train.recipe>`)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch_torchrun(params, progress, nproc, alone, out_dir))
    start_output(progress)
    from stages.train.run import alone_config, load_train_config, train  # torch loads only when needed

    with reported_errors():
        cfg = load_train_config(params)
        cfg = alone_config(cfg) if alone else cfg
        cfg = dataclasses.replace(cfg, out_dir=str(out_dir)) if out_dir is not None else cfg
        summary = train(cfg, progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per run, not one per process
        print_json(summary)


def launch_torchrun(params: Path, progress: bool | None, nproc: int, alone: bool = False,
                    out_dir: Path | None = None) -> int:
    """``torchrun`` of this command on ``nproc`` local processes; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.cli", "train", "--params", str(params)]
    cmd += ["--alone"] if alone else []
    cmd += ["--out-dir", str(out_dir)] if out_dir is not None else []
    if progress is not None:
        cmd.append("--progress" if progress else "--no-progress")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default; train.threads overrides it
    return subprocess.run(cmd, env=env).returncode
