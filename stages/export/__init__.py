"""``distill export``: the trained student as an open_clip model and as ONNX encoders, with a
model card."""
from __future__ import annotations

from pathlib import Path

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Write <out_dir>/open_clip, <out_dir>/onnx and <out_dir>/MODEL_CARD.md (params section
    `export`); each form is checked against the trained student before it is kept."""
    start_output(progress)
    from pipeline.config import load_section  # imported here: torch loads only when needed
    from stages.export.run import ExportConfig, run_export

    with reported_errors():
        print_json(run_export(load_section(ExportConfig, "export", params), progress))
