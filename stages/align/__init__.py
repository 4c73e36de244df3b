"""``distill align``: a cross-modal teacher aligned from a vision-only and a text-only teacher's caches."""
from __future__ import annotations

from pathlib import Path

from stages.common import (ExecutorOpt, ParamsOpt, ProgressOpt, SchedulerOpt, WorkersOpt,
                           print_json, reported_errors, start_output, with_executor)


def command(
    params: ParamsOpt = Path("params.yaml"),
    progress: ProgressOpt = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Train projection heads on the cached features of align.vision and align.text (no encoder
    runs) and write <cache_root>/<name>/<split>.zarr for every split both cover (params section
    `align`; the source teachers' `teachers` entries are recorded with the heads)."""
    start_output(progress)
    from pipeline.config import TeacherEntry, load_params, load_section
    from stages.align.run import AlignConfig, run_align  # imported here: torch loads only when needed

    with reported_errors():
        data = load_params(params)
        cfg = with_executor(load_section(AlignConfig, "align", data), executor, workers, scheduler)
        entries = {role: load_section(TeacherEntry, f"teachers.{name}", data)
                   for role, name in (("vision", cfg.vision), ("text", cfg.text))
                   if name in data.get("teachers", {})}
        summary = run_align(cfg, entries, progress)
    print_json(summary)
