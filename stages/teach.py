"""``distill teach NAME``: run teacher NAME over the dataset into Zarr caches."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.common import ParamsOpt, ProgressOpt, console, print_json, reported_errors, start_output


def command(
    name: Annotated[str, typer.Argument(help="A key of the `teachers` mapping in params.yaml.")],
    params: ParamsOpt = Path("params.yaml"),
    device: Annotated[Optional[str], typer.Option(help="Override teach.device (cpu, cuda, cuda:1).")] = None,
    progress: ProgressOpt = None,
    section: Annotated[str, typer.Option(help="Params section of the stage settings "
                                                  "(grounding: grounding.teach).")] = "teach",
) -> None:
    """Cache one teacher's embeddings for every split (params sections `teach`, `teachers`)."""
    start_output(progress)
    # imported here: torch and the teachers load only when a command needs them
    from pipeline.config import load_params, load_section
    from pipeline.devices import resolve_device
    from pipeline.lock import output_lock
    from pipeline.teach import TeachConfig, TeacherEntry, run_teach
    from pipeline.teachers import create_teacher

    with reported_errors():
        data = load_params(params)
        cfg = load_section(TeachConfig, section, data)
        entry = load_section(TeacherEntry, f"teachers.{name}", data)
        # locked before the teacher is built: a second run is refused at once, not after
        # loading weights (run_teach takes the same lock again)
        with output_lock(Path(cfg.out_root) / name, f"`distill teach {name}`"):
            teacher = create_teacher(entry.teacher, **entry.kwargs).to(resolve_device(device or cfg.device))
            summary = run_teach(cfg, name, teacher, progress=progress)
    if summary["skipped_count"]:
        ids = [s["id"] for split in summary["skipped"].values() for s in split]
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        console.print(f"[yellow]{summary['skipped_count']} undecodable image(s) skipped and marked "
                      f"invalid: {shown} (all ids and reasons in {cfg.summary_dir}/{name}.json)[/]",
                      highlight=False)
    print_json({k: v for k, v in summary.items() if k != "skipped"})
