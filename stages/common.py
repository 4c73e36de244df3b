"""Shared option types and output helpers for the stage commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipeline.errors import PipelineError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (params.yaml).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="Show progress bars (default: only on a terminal).")]
console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print a result as JSON on stdout (machine readable)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def fail(exc: PipelineError) -> None:
    """Print a pipeline error without a traceback and exit non-zero."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
    raise typer.Exit(code=1)
