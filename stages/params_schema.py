"""The JSON schema of ``params.yaml``, generated from the stage config dataclasses.

``schemas/params.v1.json`` is this module's output (``python -m stages.params_schema``); a test
keeps the two in step, so the schema always documents what the stages accept.
"""
from __future__ import annotations

import json
from typing import Any

from pipeline.config import TeacherEntry, json_schema
from pipeline.evaluation.config import EvalConfig
from stages.align.run import AlignConfig
from stages.export.run import ExportConfig
from stages.ground.evaluate import GroundEvalConfig
from stages.ground.train import GroundRecipe, GroundTrainConfig
from stages.itm.run import ItmConfig
from stages.neighbors.run import NeighborsConfig
from stages.prepare.run import PrepareConfig
from stages.teach.run import TeachConfig
from stages.train.run import Recipe, TrainConfig

# Top-level teacher names that dvc.yaml interpolates into its stages (not read by the stages).
TEACHER_ROLES = {"distill_from": "cross-modal", "vision_from": "vision-only", "text_from": "text-only",
                 "single_stream_from": "single-stream ITM"}


def params_schema() -> dict[str, Any]:
    """Schema of the whole parameters file: one section per stage plus the teacher and recipe
    mappings."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "vlm-distill/params/v1",
        "title": "params.yaml of the vlm-distill pipeline",
        "type": "object",
        "properties": {
            "prepare": json_schema(PrepareConfig),
            "teachers": {"type": "object", "additionalProperties": json_schema(TeacherEntry)},
            "teach": json_schema(TeachConfig),
            "align": json_schema(AlignConfig),
            "neighbors": json_schema(NeighborsConfig),
            "itm": json_schema(ItmConfig),
            "train": json_schema(TrainConfig),
            "recipes": {"type": "object", "additionalProperties": json_schema(Recipe)},
            "evaluate": json_schema(EvalConfig),
            "export": json_schema(ExportConfig),
            **{key: {"type": "string", "description": f"teacher name dvc.yaml interpolates ({role})"}
               for key, role in TEACHER_ROLES.items()},
            "grounding": grounding_schema(),
        },
        "additionalProperties": False,
    }


def grounding_schema() -> dict[str, Any]:
    """Section ``grounding``: the grounding task's own stage settings, teacher and recipes."""
    return {
        "type": "object", "title": "grounding", "additionalProperties": False,
        "properties": {
            "teacher": {"type": "string"},
            "prepare": json_schema(PrepareConfig),
            "teach": json_schema(TeachConfig),
            "train": json_schema(GroundTrainConfig),
            "recipes": {"type": "object", "additionalProperties": json_schema(GroundRecipe)},
            "evaluate": json_schema(GroundEvalConfig),
        },
    }


if __name__ == "__main__":
    print(json.dumps(params_schema(), indent=2))
