"""``distill train``: train a student from teacher caches (no teacher runs)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import load_section
from pipeline.train import TrainConfig, train
from stages.common import ParamsOpt, reported_errors, print_json


def command(params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the student described by params section `train`."""
    with reported_errors():
        print_json(train(load_section(TrainConfig, "train", params)))
