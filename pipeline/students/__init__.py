"""Student dual encoders: small models trained from cached teacher embeddings.

Modules: :mod:`~pipeline.students.base` (the contract, transforms, registry),
:mod:`~pipeline.students.open_clip_student`, :mod:`~pipeline.students.timm_hf` (the registered families)
and :mod:`~pipeline.students.checkpoint` (saving and loading). Importing the package registers
every student.
"""
from pipeline.students import open_clip_student, timm_hf  # noqa: F401  (registrations)
from pipeline.students.base import (CLIP_MEAN, CLIP_STD, SPEC_VERSION, STUDENTS, Levels, Student,
                                    TrainAugment, create_student, eval_preprocess)
from pipeline.students.checkpoint import (EXTRA_SEP, build_from_spec, load_student, read_checkpoint,
                                          save_checkpoint)

__all__ = ["CLIP_MEAN", "CLIP_STD", "EXTRA_SEP", "SPEC_VERSION", "STUDENTS", "Levels", "Student",
           "TrainAugment", "build_from_spec", "create_student", "eval_preprocess", "load_student",
           "read_checkpoint", "save_checkpoint"]
