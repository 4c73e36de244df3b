"""``distill neighbors [NAME]``: exact top-k neighbours of teacher NAME's caches."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import (ExecutorOpt, ParamsOpt, ProgressOpt, SchedulerOpt, WorkersOpt,
                           print_json, reported_errors, start_output, with_executor)


def command(
    name: Annotated[Optional[str], typer.Argument(
        help="A key of the `teachers` mapping (default: neighbors.teacher).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    progress: ProgressOpt = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Write <out_root>/NAME/<split>.zarr with *_topk_idx / *_topk_sim (params section `neighbors`)."""
    start_output(progress)
    from pipeline.config import load_section
    from stages.neighbors.run import NeighborsConfig, run_neighbors

    with reported_errors():
        cfg = with_executor(load_section(NeighborsConfig, "neighbors", params), executor, workers,
                            scheduler)
        print_json(run_neighbors(cfg, name or cfg.teacher, progress))
