"""Where a store stage's teacher comes from when its units run.

In-process, the stage is handed a teacher object (:class:`LiveTeacher`). On Dask a model is never
pickled: every worker process builds its own teacher once from the teacher's ``params.yaml``
entry (:class:`TeacherRef`) on its own device, and keeps it for every later unit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from stages.executors import worker_index

_BUILT: dict[str, Any] = {}  # teachers built in this process, by (entry, device)


@dataclass(frozen=True)
class TeacherRef:
    """A teacher's params entry and device(s): enough to build it in any worker process."""

    teacher: str                                          # registry name
    kwargs: dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    device: str = "auto"                                  # used when ``devices`` is empty
    devices: tuple[str, ...] = ()                         # Dask worker i uses devices[i % len]

    def device_here(self) -> str:
        """The device of this process: its worker's entry of ``devices``, else ``device``."""
        if self.devices:
            return self.devices[worker_index() % len(self.devices)]
        return resolve_device(self.device)

    def get(self) -> Any:
        """This process's teacher, built on first use."""
        from pipeline.teachers import create_teacher

        device = self.device_here()
        key = json.dumps([self.teacher, self.kwargs, device], sort_keys=True, default=str)
        if key not in _BUILT:
            _BUILT[key] = create_teacher(self.teacher, **self.kwargs).to(device)
        return _BUILT[key]


class LiveTeacher:
    """A teacher already built in the driver process (the in-process executor only)."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher

    def get(self) -> Any:
        return self.teacher

    def __reduce__(self) -> Any:
        raise PipelineError("a teacher object cannot be sent to Dask workers: run the stage from "
                            "the teacher's params entry (the `distill` command does) instead")


def describe_teacher(source: TeacherRef | LiveTeacher) -> dict[str, Any]:
    """What the driver records about a teacher (fingerprint, modalities, width, scale, compute),
    read where units run, so a Dask driver never loads the model itself."""
    teacher = source.get()
    return {"fingerprint": teacher.fingerprint(), "modalities": sorted(teacher.modalities),
            "embed_dim": int(teacher.embed_dim), "logit_scale": float(teacher.logit_scale),
            "compute": teacher.compute_info(), "has_itm": callable(getattr(teacher, "score_candidates", None))
            or callable(getattr(teacher, "score_pairs", None)), "name": getattr(teacher, "name", "?")}


def teacher_source(cfg: Any, teacher: Any = None, entry: Any = None, where: str = "teach") -> TeacherRef | LiveTeacher:
    """The teacher units use: the given object in-process, else built from its params entry
    (a :class:`pipeline.config.TeacherEntry`) where units run — always so on Dask, as a model is
    never pickled. ``cfg``: the stage's config (``executor``, ``device``, ``devices``)."""
    if entry is not None and (teacher is None or cfg.executor == "dask"):
        return TeacherRef(entry.teacher, dict(entry.kwargs), cfg.device, tuple(cfg.devices))
    if teacher is None:
        raise PipelineError(f"{where}: no teacher given (pass the teacher or its params entry)")
    if cfg.executor == "dask":
        raise PipelineError(f"{where}.executor is dask: workers build the teacher from its params "
                            "entry; pass entry=, not a teacher object")
    return LiveTeacher(teacher)
