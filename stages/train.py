"""``distill train``: train a student from teacher caches (no teacher runs)."""
from __future__ import annotations

from pathlib import Path

from pipeline.train import load_train_config, train
from stages.common import ParamsOpt, reported_errors, print_json


def command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the student described by params section `train` (and `recipes.<train.recipe>`)."""
    with reported_errors():
        print_json(train(load_train_config(params)))
