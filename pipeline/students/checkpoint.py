"""Student checkpoints: ``student.safetensors`` (weights, plus the extras a resumable checkpoint
holds) and ``student.json`` (the spec that rebuilds the architecture)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.students.base import SPEC_VERSION, Student, create_student

# Keys of non-student tensors in a checkpoint contain "/", which no nn.Module state-dict key does.
EXTRA_SEP = "/"


def _student_state(student: Student) -> dict[str, Tensor]:
    """State dict with shared storage broken (safetensors refuses aliasing tensors)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}


def save_checkpoint(path: Path, student: Student, extra_state: dict[str, Any], spec: dict) -> None:
    """Atomically write ``path`` (safetensors) and its spec ``path.with_suffix('.json')``.

    The student's weights are stored under their state-dict keys. ``extra_state`` entries that
    are tensors are stored under their key, which must contain ``"/"`` (e.g. ``"optim/3/exp_avg"``)
    so it can never collide with a weight; other values are JSON-encoded into the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _student_state(student)
    metadata = {"spec": json.dumps(spec, sort_keys=True)}
    for key, value in extra_state.items():
        if isinstance(value, Tensor):
            if EXTRA_SEP not in key:
                raise ValueError(f"extra tensor key {key!r} must contain {EXTRA_SEP!r}")
            tensors[key] = value.detach().cpu().contiguous().clone()
        else:
            metadata[key] = json.dumps(value)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    spec_tmp = path.with_name(path.stem + ".json.tmp")
    spec_tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    # Replace weights first: a crash between the two leaves a spec that still matches them.
    os.replace(tmp, path)
    os.replace(spec_tmp, path.with_suffix(".json"))


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors and the JSON-decoded metadata of a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: checkpoint not found")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors, metadata


def _resolve(checkpoint: Path) -> tuple[Path, Path]:
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / "student.safetensors", checkpoint / "student.json"
    return checkpoint, checkpoint.with_suffix(".json")


def build_from_spec(spec: dict[str, Any]) -> Student:
    """A freshly initialised student of the architecture a spec describes."""
    if spec.get("spec_version", SPEC_VERSION) > SPEC_VERSION:
        raise PipelineError(f"student spec version {spec['spec_version']} is newer than this code")
    return create_student(spec["student"], **spec.get("kwargs", {}))


def load_student(checkpoint_dir: Path) -> Student:
    """Rebuild a student from ``student.json`` + ``student.safetensors`` (or a checkpoint file).

    Non-weight tensors (optimizer state etc.) in the file are ignored.
    """
    if not Path(checkpoint_dir).exists():
        raise PipelineError(f"{checkpoint_dir}: no trained student here (student.json + "
                            "student.safetensors); run `distill train` (`--alone` for evaluate.alone_dir)")
    weights, spec_path = _resolve(checkpoint_dir)
    if not spec_path.exists():
        raise PipelineError(f"{spec_path}: student spec not found (expected next to {weights.name})")
    spec = json.loads(spec_path.read_text())
    student = build_from_spec(spec)
    tensors, _ = read_checkpoint(weights)
    state = {k: v for k, v in tensors.items() if EXTRA_SEP not in k}
    student.load_state_dict(state, strict=True)
    student.init_record = spec.get("init") or None  # where its first weights came from
    return student.eval()
