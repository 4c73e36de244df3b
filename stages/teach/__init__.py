"""``distill teach NAME``: run teacher NAME over the dataset into Zarr caches."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import (ExecutorOpt, ParamsOpt, ProgressOpt, SchedulerOpt, WorkersOpt, console,
                           print_json, reported_errors, start_output, with_executor)


def command(
    name: Annotated[str, typer.Argument(help="A key of the `teachers` mapping in params.yaml.")],
    params: ParamsOpt = Path("params.yaml"),
    device: Annotated[Optional[str], typer.Option(help="Override teach.device (cpu, cuda, cuda:1).")] = None,
    progress: ProgressOpt = None,
    section: Annotated[str, typer.Option(help="Params section of the stage settings "
                                                  "(grounding: grounding.teach).")] = "teach",
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Cache one teacher's embeddings for every split (params sections `teach`, `teachers`).
    With the Dask executor every worker builds the teacher from its params entry."""
    start_output(progress)
    # imported here: torch and the teachers load only when a command needs them
    from dataclasses import replace

    from pipeline.config import TeacherEntry, load_params, load_section
    from stages.lock import output_lock
    from stages.teach.run import TeachConfig, run_teach

    with reported_errors():
        data = load_params(params)
        cfg = with_executor(load_section(TeachConfig, section, data), executor, workers, scheduler)
        if device:
            cfg = replace(cfg, device=device, devices=())
        entry = load_section(TeacherEntry, f"teachers.{name}", data)
        # locked before any teacher is built: a second run is refused at once, not after
        # loading weights (run_teach takes the same lock again)
        with output_lock(Path(cfg.out_root) / name, f"`distill teach {name}`"):
            teacher = _driver_teacher(cfg, entry)
            summary = run_teach(cfg, name, teacher, progress=progress, entry=entry)
    if summary["skipped_count"]:
        ids = [s["id"] for split in summary["skipped"].values() for s in split]
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        console.print(f"[yellow]{summary['skipped_count']} undecodable image(s) skipped and marked "
                      f"invalid: {shown} (all ids and reasons in {cfg.summary_dir}/{name}.json)[/]",
                      highlight=False)
    print_json({k: v for k, v in summary.items() if k != "skipped"})


def _driver_teacher(cfg, entry):
    """The teacher of an in-process run (built here, on the configured device); None on Dask,
    whose workers build their own."""
    if cfg.executor == "dask":
        return None
    from pipeline.devices import resolve_device
    from pipeline.teachers import create_teacher

    return create_teacher(entry.teacher, **entry.kwargs).to(resolve_device(cfg.device))
