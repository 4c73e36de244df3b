"""``distill evaluate``: retrieval metrics, efficiency and a report for student and teacher."""
from __future__ import annotations

from pathlib import Path

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Score the student and its teacher (params section `evaluate`)."""
    start_output(progress)
    from pipeline.config import load_section
    from pipeline.evaluation.config import EvalConfig
    from stages.evaluate.run import evaluate

    with reported_errors():
        print_json(evaluate(load_section(EvalConfig, "evaluate", params), progress=progress))
