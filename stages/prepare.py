"""``distill prepare``: build train/val/test WebDataset shards from a source dataset."""
from __future__ import annotations

from pathlib import Path

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Write <out>/{train,val,test}/*.tar and their manifests (params section `prepare`)."""
    start_output(progress)
    from pipeline.config import load_section  # imported here: --help stays light
    from pipeline.data.prepare import PrepareConfig, prepare

    with reported_errors():
        print_json(prepare(load_section(PrepareConfig, "prepare", params), progress))
