"""``distill itm [DUAL]``: single-stream teacher scores of each image's top-k caption candidates."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import (ExecutorOpt, ParamsOpt, ProgressOpt, SchedulerOpt, WorkersOpt, console,
                           print_json, reported_errors, start_output, with_executor)


def command(
    dual: Annotated[Optional[str], typer.Argument(
        help="Key of `teachers` whose neighbours give the candidates (default: itm.dual).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    device: Annotated[Optional[str], typer.Option(help="Override itm.device (cpu, cuda, cuda:1).")] = None,
    progress: ProgressOpt = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Write <out_root>/DUAL/<split>.zarr with i2t_cand_idx / i2t_cand_itm (params sections `itm`,
    `teachers.<itm.single>`)."""
    start_output(progress)
    # imported here: torch and the teachers load only when a command needs them
    from dataclasses import replace

    from pipeline.config import TeacherEntry, load_params, load_section
    from pipeline.devices import resolve_device
    from stages.itm.run import ItmConfig, run_itm

    with reported_errors():
        data = load_params(params)
        cfg = with_executor(load_section(ItmConfig, "itm", data), executor, workers, scheduler)
        if device:
            cfg = replace(cfg, device=device, devices=())
        entry = load_section(TeacherEntry, f"teachers.{cfg.single}", data)
        teacher = None
        if cfg.executor != "dask":  # Dask workers build their own from the entry
            from pipeline.teachers import create_teacher

            teacher = create_teacher(entry.teacher, **entry.kwargs).to(resolve_device(cfg.device))
        summary = run_itm(cfg, teacher, dual, progress=progress, entry=entry)
    if summary["skipped_count"]:
        console.print(f"[yellow]{summary['skipped_count']} image(s) could not be decoded and were "
                      f"marked invalid; ids in {cfg.summary_dir}/{summary['dual']}.json[/]")
    print_json({k: v for k, v in summary.items() if k != "skipped"})
