"""Frozen teachers, chosen by name from params.yaml.

>>> teacher = create_teacher("open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
>>> emb = teacher.encode_images(torch.stack([teacher.preprocess(img)]))   # [1, 512] float32

Implementations register themselves on import; optional demo dependencies (MiniLM,
EfficientNet-Lite0, ImageNet class names) are imported only when such a teacher is built.
"""
from __future__ import annotations

from typing import Any

# imported for their registrations
from pipeline.teachers import aligned, blip, demo_clip, hf_text, open_clip_teacher, vision  # noqa: F401
from pipeline.teachers.base import DEFAULT_LOGIT_SCALE, TEACHERS, Teacher

__all__ = ["DEFAULT_LOGIT_SCALE", "TEACHERS", "Teacher", "create_teacher", "list_teachers"]


def list_teachers() -> list[str]:
    """Registered teacher names, sorted."""
    return TEACHERS.names()


def create_teacher(name: str, **kw: Any) -> Teacher:
    """Build the teacher registered under ``name``; unknown names raise UnknownNameError
    listing the known ones."""
    return TEACHERS.create(name, **kw)
