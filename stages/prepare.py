"""``distill prepare``: build train/val/test WebDataset shards from a source dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import load_section
from pipeline.data.prepare import PrepareConfig, prepare
from stages.common import ParamsOpt, reported_errors, print_json


SectionOpt = Annotated[str, typer.Option(help="Params section to read (grounding: grounding.prepare).")]


def command(params: ParamsOpt = Path("params.yaml"), section: SectionOpt = "prepare") -> None:
    """Write <out>/{train,val,test}/*.tar and their manifests (params section `prepare`)."""
    with reported_errors():
        print_json(prepare(load_section(PrepareConfig, section, params)))
