"""``distill ground train|evaluate``: the visual grounding task (params section ``grounding``).

Data preparation and the teacher cache reuse the other stages: ``distill prepare --section
grounding.prepare`` and ``distill teach NAME --section grounding.teach``.
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOpt, ProgressOpt, print_json, reported_errors, start_output

app = typer.Typer(help="Visual grounding: train and evaluate a grounding student.", no_args_is_help=True)


@app.command("train")
def train_command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Train the grounding student of `grounding.train` (and `grounding.recipes.<recipe>`)."""
    start_output(progress)
    from stages.ground.train import load_ground_train_config, train_grounding

    with reported_errors():
        print_json(train_grounding(load_ground_train_config(params), progress=progress))


@app.command("evaluate")
def evaluate_command(params: ParamsOpt = Path("params.yaml"), progress: ProgressOpt = None) -> None:
    """Acc@0.5 and mean IoU by expression type, size, latency and the report (`grounding.evaluate`)."""
    start_output(progress)
    from stages.ground.evaluate import evaluate_grounding, load_ground_eval_config

    with reported_errors():
        metrics = evaluate_grounding(load_ground_eval_config(params))
    print_json({k: metrics[k] for k in ("acc_at_0_5", "mean_iou", "n", "by_type")})
