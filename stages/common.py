"""Shared option types and output helpers for the stage commands."""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import PipelineError
from pipeline.registry import UnknownNameError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (params.yaml).")]
ProgressOpt = Annotated[Optional[bool], typer.Option(
    "--progress/--no-progress", show_default=False,
    help="Progress goes to stderr: by default a bar on a terminal, otherwise a plain line at "
         "the start, at most every 30 s (DISTILL_PROGRESS_SECONDS) and at the end. --progress also "
         "shows libraries' own bars (downloads, weight loading); --no-progress shows none.")]
ExecutorOpt = Annotated[Optional[str], typer.Option(
    help="Override <stage>.executor: inprocess, or dask (units as tasks of a Dask cluster).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    help="Start a LocalCluster of N worker processes (sets <stage>.dask.workers; implies dask).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    help="Join the Dask cluster at this scheduler, e.g. tcp://host:8786 (implies dask).")]
console = Console(stderr=True)
C = TypeVar("C")


def with_executor(cfg: C, executor: str | None, workers: int | None, scheduler: str | None) -> C:
    """``cfg`` with the CLI's executor flags applied: ``--workers``/``--scheduler`` set the
    ``dask`` sub-config and imply ``--executor dask`` unless ``--executor`` says otherwise."""
    dask = cfg.dask  # type: ignore[attr-defined]
    if workers is not None:
        dask = dataclasses.replace(dask, workers=workers, scheduler=None)
    if scheduler is not None:
        dask = dataclasses.replace(dask, scheduler=scheduler)
    name = executor or ("dask" if workers is not None or scheduler is not None
                        else cfg.executor)  # type: ignore[attr-defined]
    return dataclasses.replace(cfg, executor=name, dask=dask)  # type: ignore[type-var]


def print_json(data: Any) -> None:
    """Print a result as JSON on stdout (machine readable): the only thing commands write there."""
    from pipeline.paths import portable  # paths inside the project print relative to it

    typer.echo(json.dumps(portable(data), indent=2, sort_keys=True, default=str))


def start_output(progress: bool | None) -> None:
    """Before a command's work: third-party progress bars only when ``--progress`` asked for them."""
    from pipeline.progress import library_progress

    library_progress(progress is True)


# Errors that are the user's to fix (bad input, config, a missing optional package): printed as
# one clear message without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (PipelineError, UnknownNameError, ImportError)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn user errors raised inside the block into a message on stderr and exit code 1."""
    try:
        yield
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
