"""The ``distill`` command: one subcommand per pipeline stage, plus cache inspection."""
from __future__ import annotations

import typer

from stages import align, cache, evaluate, export, ground, itm, neighbors, prepare, teach, train

app = typer.Typer(
    help="Offline distillation of vision-language teachers into small dual-encoder students.",
    no_args_is_help=True, pretty_exceptions_show_locals=False,
)
app.command("prepare")(prepare.command)
app.command("teach")(teach.command)
app.command("align")(align.command)
app.command("neighbors")(neighbors.command)
app.command("itm")(itm.command)
app.command("train")(train.command)
app.command("evaluate")(evaluate.command)
app.command("export")(export.command)
app.add_typer(cache.app, name="cache")
app.add_typer(ground.app, name="ground")


@app.command("list")
def list_components() -> None:
    """Registered teachers, students, losses and balancers (the names params.yaml may use)."""
    from pipeline.catalog import names  # the names alone: no model code is imported

    typer.echo(f"teachers: {', '.join(names('teacher'))}")
    typer.echo(f"students: {', '.join(names('student'))}")
    typer.echo(f"losses:   {', '.join(names('loss'))}")
    typer.echo(f"balancers: {', '.join(names('balancer'))}")
    typer.echo(f"grounding students: {', '.join(names('grounding_student'))}")
    typer.echo(f"grounding losses: {', '.join(names('grounding_loss'))}")


if __name__ == "__main__":
    app()
