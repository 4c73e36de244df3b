"""``distill evaluate``: retrieval metrics, efficiency and a report for student and teacher."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import load_section
from pipeline.evaluate import EvalConfig, evaluate
from stages.common import ParamsOpt, reported_errors, print_json


def command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Score the student and its teacher (params section `evaluate`)."""
    with reported_errors():
        print_json(evaluate(load_section(EvalConfig, "evaluate", params)))
