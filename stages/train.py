"""``distill train``: train a student from teacher caches (no teacher runs)."""
from __future__ import annotations

from pathlib import Path

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output


def command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Train the student described by params section `train` (and `recipes.<train.recipe>`)."""
    start_output(progress)
    from pipeline.train import load_train_config, train  # imported here: torch loads only when needed

    with reported_errors():
        print_json(train(load_train_config(params), progress=progress))
