"""The ``distill`` command: one subcommand per pipeline stage, plus cache inspection."""
from __future__ import annotations

import typer

from stages import cache, evaluate, ground, itm, neighbors, prepare, teach, train

app = typer.Typer(
    help="Offline distillation of vision-language teachers into small dual-encoder students.",
    no_args_is_help=True, pretty_exceptions_show_locals=False,
)
app.command("prepare")(prepare.command)
app.command("teach")(teach.command)
app.command("neighbors")(neighbors.command)
app.command("itm")(itm.command)
app.command("train")(train.command)
app.command("evaluate")(evaluate.command)
app.add_typer(cache.app, name="cache")
app.add_typer(ground.app, name="ground")


@app.command("list")
def list_components() -> None:
    """Registered teachers, students, losses and balancers (the names params.yaml may use)."""
    from pipeline.grounding.losses import GROUNDING_LOSSES
    from pipeline.grounding.model import GROUNDING_STUDENTS
    from pipeline.losses import BALANCERS, LOSSES
    from pipeline.students import STUDENTS
    from pipeline.teachers import list_teachers

    typer.echo(f"teachers: {', '.join(list_teachers())}")
    typer.echo(f"students: {', '.join(STUDENTS.names())}")
    typer.echo(f"losses:   {', '.join(LOSSES.names())}")
    typer.echo(f"balancers: {', '.join(BALANCERS.names())}")
    typer.echo(f"grounding students: {', '.join(GROUNDING_STUDENTS.names())}")
    typer.echo(f"grounding losses: {', '.join(GROUNDING_LOSSES.names())}")


if __name__ == "__main__":
    app()
