"""An open_clip student as open_clip's own files: ``open_clip_config.json`` (model and
preprocess config) and ``open_clip_model.safetensors``, which
``open_clip.create_model_and_transforms("local-dir:<dir>")`` loads as it is (and, for an
unmodified built-in architecture, ``create_model_and_transforms(name, pretrained=<file>)``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.scratch import write_durable

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def preprocess_cfg(student: Any) -> dict[str, Any]:
    """open_clip's preprocess config of the student's transform (size, mean, std, resize)."""
    norm = student.image_norm
    return {"size": student.image_size, "mode": "RGB", "mean": list(norm.mean),
            "std": list(norm.std), "interpolation": norm.interpolation,
            "resize_mode": "shortest", "fill_color": 0}


def builtin_name(student: Any) -> str | None:
    """The built-in open_clip name whose config is exactly the student's (then the weights file
    loads with ``pretrained=``), else None."""
    import open_clip

    name = student.spec_kwargs.get("model")
    return name if name and open_clip.get_model_config(name) == student.model_cfg else None


def export_open_clip(student: Any, out: Path) -> dict[str, Any]:
    """Write the student's open_clip files into ``out``; returns what was written."""
    from safetensors.torch import save

    if getattr(student, "model_cfg", None) is None:
        raise PipelineError(f"student {student.registry_name!r} is not an open_clip model: export it "
                            "as ONNX (export.formats: [onnx])")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in student.model.state_dict().items()}
    write_durable(out / WEIGHTS_FILE, save(state))
    config = {"model_cfg": student.model_cfg, "preprocess_cfg": preprocess_cfg(student)}
    write_durable(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"dir": str(out), "files": [CONFIG_FILE, WEIGHTS_FILE], "builtin": builtin_name(student)}


def load_exported(out: Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, eval transform, tokenizer) of an exported folder, through open_clip alone."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return model.eval(), transform, open_clip.get_tokenizer(f"local-dir:{out}")
