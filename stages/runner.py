"""One resumable runner for every store-building stage (``teach``, ``align``, ``neighbors``, ``itm``).

A stage describes its work as a :class:`StoreJob`: the stores it writes (a format each, see
:mod:`pipeline.stores`), the units of work (one whole Zarr shard of rows of one store each) and
a picklable *work* object whose ``compute(unit)`` is a pure function of the stage's settings and
the unit. The runner does the rest, once for every stage:

1. hold the output's lock (:func:`stages.lock.output_lock`) and finish or roll back a publish
   an earlier run left half-done (:func:`pipeline.scratch.recover_replaced`);
2. keep an output that is already complete, current (the format's is-current keys match) and
   undamaged (the format's cheap checks pass): a stage is never paid for twice;
3. otherwise create the stores in the scratch directory (only the driver creates metadata) and
   hand every unit not yet marked done to the executor (:mod:`stages.executors`: in-process or
   Dask). A unit is computed, written as whole shards into the staging store, its own files
   fsynced to disk (no global sync), and only then marked done by the driver, so a killed run
   (worker or driver) resumes from the done markers and never trusts a half-written unit;
4. finalise (no row left unwritten; the stage's final attributes; ``complete``) and publish the
   stores into the output by renames.

Every computation of a unit leaves an *attempt* marker in the scratch directory (unit and pid),
so the summary can say which units were computed more than once (a worker died holding them).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from pipeline.errors import CacheError
from pipeline.progress import progress_task
from pipeline.scratch import (ScratchRun, creating, discard_scratch, disk_full_errors,
                              recover_replaced, scratch_dir)
from pipeline.stores import StoreSpec
from pipeline.stores.base import (open_store, schema_name_of, sync_files, unit_files, validate_attrs,
                                  write_unit)
from pipeline.stores.location import is_remote
from stages.lock import output_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One unit of work: rows ``[start, stop)`` (one whole Zarr shard) of one store."""

    key: str      # done-marker name, unique within the run (e.g. "train-image-000000000000")
    store: str    # the store's directory under the output (e.g. "train.zarr")
    start: int
    stop: int
    part: str     # what the stage computes for these rows (e.g. "image", "text", "i2t")
    split: str

    @property
    def rows(self) -> int:
        return self.stop - self.start


class UnitWork(Protocol):
    """A stage's computation, sent to where units run (so it must pickle for Dask)."""

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays of rows ``[unit.start, unit.stop)`` by array name, JSON-able unit info)."""


@dataclass
class StoreJob:
    """Everything the runner needs from a stage to build its output."""

    label: str                       # for logs and progress ("teach clip")
    out: Path                        # the published output directory
    fingerprint: str                 # of everything that changes the stored bytes (scratch reuse)
    stores: dict[str, StoreSpec]     # store directory name -> spec
    units: list[Unit]                # in the order an in-process run computes them
    work: UnitWork
    # final root attributes of one store from the infos of its units (e.g. the skipped samples)
    final_attrs: Callable[[str, list[dict[str, Any]]], dict[str, Any]] = lambda store, infos: {}
    meta: dict[str, Any] = field(default_factory=dict)  # what the stage's summary reports
    # run on the driver once the scratch directory is open, before any unit (it gets that
    # directory): work every unit shares, e.g. an index built once per run (kept on resume)
    setup: Callable[[Path], None] | None = None


@dataclass
class RunResult:
    """What a run did (the stages' summaries report it)."""

    up_to_date: bool
    kept_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # of a kept output
    computed: list[str] = field(default_factory=list)    # unit keys computed by this run
    resumed: list[str] = field(default_factory=list)     # unit keys an earlier run finished
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit key -> unit info
    attempts: dict[str, int] = field(default_factory=dict)  # unit key -> computations this run

    @property
    def recomputed(self) -> list[str]:
        """Units computed more than once by this run (their first worker died)."""
        return sorted(k for k, n in self.attempts.items() if n > 1)

    def counters(self) -> dict[str, Any]:
        """The summary fields every store stage reports."""
        return {"units_computed": len(self.computed), "units_resumed": len(self.resumed),
                "unit_attempts": sum(self.attempts.values()), "units_recomputed": self.recomputed}


def run_store_stage(out: Path, command: str, plan: Callable[[], StoreJob], executor: Any,
                    progress: bool | None = None) -> tuple[StoreJob, RunResult]:
    """Build (or resume, or keep) the output ``out`` of a store stage.

    ``plan`` is called once the lock is held (it reads the inputs and describes the job);
    ``executor`` runs the units (:class:`stages.executors.InProcessExecutor` or
    :class:`stages.executors.DaskExecutor`). ``command`` names the stage in lock messages.
    """
    with output_lock(out, command):
        if not is_remote(out):
            recover_replaced(out)
        job = plan()
        kept = current_attrs(job)
        if kept is not None:
            discard_scratch(job.out)  # left by a run killed right after it published
            return job, RunResult(True, kept_attrs=kept)
        return job, _compute_and_publish(job, executor, progress)


def current_attrs(job: StoreJob) -> dict[str, dict[str, Any]] | None:
    """The attributes of every store of the output when all are complete, current and
    undamaged (the output can be kept as it is); else None."""
    kept = {}
    for name, spec in job.stores.items():
        store = job.out / name
        if not (store / "zarr.json").exists():
            return None
        group = open_store(store)
        attrs = dict(group.attrs)
        fmt = spec.format
        if not attrs.get("complete") or any(fmt.current_value(attrs, k) != fmt.current_value(spec.attrs, k)
                                            for k in fmt.current_keys):
            return None
        faults = spec.format.published_faults(store, group)
        if faults:
            log.warning("%s is damaged (%s); rebuilding it", store, "; ".join(faults[:3]))
            return None
        kept[name] = attrs
    return kept


def _compute_and_publish(job: StoreJob, executor: Any, progress: bool | None) -> RunResult:
    result = RunResult(False)
    with disk_full_errors(job.out, scratch_dir(job.out)):
        scratch = ScratchRun(job.out, job.fingerprint)
        attempts_dir = scratch.dir / "attempts"
        shutil.rmtree(attempts_dir, ignore_errors=True)  # count this run's computations only
        attempts_dir.mkdir()
        pending = []
        for unit in job.units:
            if scratch.is_done(unit.key):
                result.resumed.append(unit.key)
                result.infos[unit.key] = scratch.done_info(unit.key)
            else:
                pending.append(unit)
        if job.setup is not None:
            job.setup(scratch.dir)
        total = sum(u.rows for u in job.units)
        resumed_rows = sum(u.rows for u in job.units if u.key in result.infos)
        with progress_task(job.label, total, progress, start=resumed_rows) as advance:
            _run_pending(job, executor, scratch, pending, result, advance)
        result.attempts = dict(Counter(p.name.split(".")[0] for p in attempts_dir.iterdir()))
        for name in job.stores:  # stores all of whose units an earlier run finished, or none
            _create_store(job, scratch.staging, name)
        _finalise(job, scratch.staging, result.infos)
        scratch.publish()
    return result


def _create_store(job: StoreJob, staging: Path, name: str) -> None:
    """Create store ``name`` in ``staging`` unless it exists (the driver alone creates metadata)."""
    path = staging / name
    if not path.exists():
        with creating(path) as tmp:
            job.stores[name].create(tmp)


# Set while units run in this process: a unit's computation reports rows as it finishes them
# (report_rows), so a long unit shows progress before it ends. Unset on Dask workers.
_ROW_PROGRESS: ContextVar[Callable[[int], None] | None] = ContextVar("row_progress", default=None)


def report_rows(rows: int) -> None:
    """Rows of the unit being computed just got done (progress mid-unit; a no-op off the driver)."""
    hook = _ROW_PROGRESS.get()
    if hook is not None:
        hook(rows)


def _run_pending(job: StoreJob, executor: Any, scratch: ScratchRun, pending: list[Unit],
                 result: RunResult, advance: Callable[[int], None]) -> None:
    """Run the pending units; mark each done (driver only) as its result arrives."""
    t0, rows, partial = time.perf_counter(), 0, [0]
    def prepare(unit: Unit) -> None:  # the executor calls it before a unit is sent out
        _create_store(job, scratch.staging, unit.store)

    def mid_unit(n: int) -> None:
        partial[0] += n
        advance(n)

    token = _ROW_PROGRESS.set(mid_unit)
    try:
        for unit, info in executor.run_units(job.work, pending, scratch.dir, prepare):
            scratch.mark_done(unit.key, info)
            result.computed.append(unit.key)
            result.infos[unit.key] = info
            rows += unit.rows
            # what the unit reported on its way (in-process) is counted once
            advance(max(0, unit.rows - partial[0]))
            partial[0] = 0
            log.info("%s: unit %s done (%d/%d units of this run, %.0f rows/s)", job.label, unit.key,
                     len(result.computed), len(pending), rows / max(time.perf_counter() - t0, 1e-9))
    finally:
        _ROW_PROGRESS.reset(token)


def execute_unit(work: UnitWork, unit: Unit, scratch_dir: str | Path) -> dict[str, Any]:
    """Compute one unit, write it into its staging store as whole shards and sync it to disk;
    returns the unit's info. Runs wherever the executor puts it (this process, a Dask worker);
    marking the unit done is left to the driver."""
    scratch_dir = Path(scratch_dir)
    (scratch_dir / "attempts" / f"{unit.key}.{os.getpid()}.{time.time_ns()}").touch()
    arrays, info = work.compute(unit)
    store = scratch_dir / "staging" / unit.store
    group = open_store(store, writable=True)
    write_unit(group, unit.start, unit.stop, arrays)
    # the unit's own shard files (and their directories) reach the disk before its done marker
    # does; nothing else is flushed (a global sync would flush every other job's dirty pages)
    sync_files(unit_files(store, group, unit.start, list(arrays)), store)
    return info


def _finalise(job: StoreJob, staging: Path, infos: dict[str, dict[str, Any]]) -> None:
    """Check every row was written, then set the final attributes and mark each store complete."""
    for name, spec in job.stores.items():
        group = open_store(staging / name, writable=True)
        faults = spec.format.unwritten_faults(group)
        if faults:
            raise CacheError(f"{staging / name}: {'; '.join(faults)} after all units finished; the "
                             "scratch directory is damaged: delete it and rerun")
        unit_infos = [infos[u.key] for u in job.units if u.store == name]
        attrs = dict(group.attrs) | job.final_attrs(name, unit_infos) | {"complete": True}
        validate_attrs(attrs, schema_name_of(attrs), str(staging / name))  # v1 or v2 of the format
        group.attrs.update(attrs)


def shard_units(split: str, part: str, n_rows: int, rows_per_shard: int,
                store: str | None = None) -> list[Unit]:
    """The units of ``part`` of one split's store: one per Zarr shard of ``rows_per_shard`` rows."""
    return [Unit(f"{split}-{part}-{s:012d}", store or f"{split}.zarr", s,
                 min(s + rows_per_shard, n_rows), part, split)
            for s in range(0, n_rows, rows_per_shard)]


def skipped_attrs(store: str, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Final attributes of a store whose units skip samples: every skipped sample, by id."""
    skipped = [s for info in infos for s in info.get("skipped", [])]
    return {"skipped": sorted(skipped, key=lambda s: s["id"])}


def skipped_by_split(job: StoreJob, result: RunResult) -> dict[str, list[dict[str, str]]]:
    """The samples the run's units skipped, by split, in unit order (a kept output: as stored)."""
    if result.up_to_date:
        return {name.removesuffix(".zarr"): list(attrs.get("skipped", []))
                for name, attrs in result.kept_attrs.items()}
    skipped: dict[str, list[dict[str, str]]] = {}
    for unit in job.units:
        skipped.setdefault(unit.split, []).extend(result.infos[unit.key].get("skipped", []))
    return skipped
