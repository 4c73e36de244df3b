"""Shared option types and output helpers for the stage commands."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import PipelineError
from pipeline.registry import UnknownNameError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file (params.yaml).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="Show progress bars (default: only on a terminal).")]
console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print a result as JSON on stdout (machine readable)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


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
