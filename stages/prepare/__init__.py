"""``distill prepare``: build train/val/test WebDataset shards from a source dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output

SectionOpt = Annotated[str, typer.Option(help="Params section to read (grounding: grounding.prepare).")]


def command(params: ParamsOpt = Path("params.yaml"), section: SectionOpt = "prepare",
            progress: ProgressOpt = None) -> None:
    """Write <out>/{train,val,test}/*.tar and their manifests (params section `prepare`)."""
    start_output(progress)
    from pipeline.config import load_section  # imported here: --help stays light
    from stages.prepare.run import PrepareConfig, prepare

    with reported_errors():
        print_json(prepare(load_section(PrepareConfig, section, params), progress))
