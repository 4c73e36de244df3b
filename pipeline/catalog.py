"""The names of every registered component, readable without importing its implementation.

``distill list`` and ``--help`` must start at once, and the implementations import torch,
torchvision, open_clip or transformers. So the names live here too, each with the
``"module:attr"`` of the factory registered under it; ``tests/test_startup.py`` checks this
table against the real registries, so a component registered without an entry here (or the
reverse) fails the suite.
"""
from __future__ import annotations

import importlib
from typing import Callable

CATALOG: dict[str, dict[str, str]] = {
    "teacher": {
        "aligned": "pipeline.teachers.aligned:make_aligned",
        "blip_itm": "pipeline.teachers.blip:make_blip_itm",
        "demo_clip": "pipeline.teachers.demo_clip:make_demo_clip",
        "efficientnet_lite": "pipeline.teachers.vision:make_efficientnet_lite",
        "hf_text": "pipeline.teachers.hf_text:make_hf_text",
        "open_clip": "pipeline.teachers.open_clip_teacher:make_open_clip",
        "timm_vision": "pipeline.teachers.vision:make_timm_vision",
    },
    "student": {
        "open_clip": "pipeline.students.open_clip_student:make_open_clip",
        "open_clip_tiny": "pipeline.students.open_clip_student:make_open_clip_tiny",
        "timm_hf": "pipeline.students.timm_hf:make_timm_hf",
    },
    "loss": {
        "contrastive": "pipeline.losses.basic:make_contrastive",
        "crd": "pipeline.losses.clip_kd:make_crd",
        "dsmd_contrastive": "pipeline.losses.dsmd:make_dsmd_contrastive",
        "dsmd_feature": "pipeline.losses.dsmd:make_dsmd_feature",
        "dsmd_hard_negative": "pipeline.losses.dsmd:make_dsmd_hard_negative",
        "dsmd_similarity": "pipeline.losses.dsmd:make_dsmd_similarity",
        "epmvg": "pipeline.losses.epmvg:make_epmvg",
        "fd": "pipeline.losses.clip_kd:make_fd",
        "feature": "pipeline.losses.basic:make_feature",
        "icl": "pipeline.losses.clip_kd:make_icl",
        "mcad_candidates": "pipeline.losses.mcad:make_mcad_candidates",
        "mcad_feature": "pipeline.losses.mcad:make_mcad_feature",
        "sard_matching": "pipeline.losses.structure:make_sard_matching",
        "sard_relational": "pipeline.losses.structure:make_sard_relational",
        "sard_representation": "pipeline.losses.structure:make_sard_representation",
        "similarity_kl": "pipeline.losses.basic:make_similarity_kl",
    },
    "balancer": {
        "dsmd": "pipeline.losses.balancer:make_dsmd",
        "fixed": "pipeline.losses.balancer:make_fixed",
    },
    "grounding_student": {
        "transvg_tiny": "pipeline.grounding.model:make_transvg_tiny",
    },
    "grounding_loss": {
        "box_giou": "pipeline.grounding.losses:make_box_giou",
        "box_l1": "pipeline.grounding.losses:make_box_l1",
        "epmvg_grounding": "pipeline.grounding.losses:make_epmvg_grounding",
    },
}

# Where each kind's registry lives ("module:attr"), for the consistency test.
REGISTRIES: dict[str, str] = {
    "teacher": "pipeline.teachers:TEACHERS",
    "student": "pipeline.students:STUDENTS",
    "loss": "pipeline.losses:LOSSES",
    "balancer": "pipeline.losses:BALANCERS",
    "grounding_student": "pipeline.grounding.model:GROUNDING_STUDENTS",
    "grounding_loss": "pipeline.grounding.losses:GROUNDING_LOSSES",
}


def names(kind: str) -> list[str]:
    """Sorted names of one kind of component (a key of ``CATALOG``: "teacher", "student", "loss",
    "balancer", "grounding_student", "grounding_loss")."""
    return sorted(CATALOG[kind])


def resolve(target: str) -> Callable:
    """Import and return the object a ``"module:attr"`` string names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
