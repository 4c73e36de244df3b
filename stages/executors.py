"""Where the units of a store stage run: in this process, or on a Dask cluster.

Both executors run :func:`stages.runner.execute_unit` on every pending unit and hand back
``(unit, info)`` as units finish; the driver (:mod:`stages.runner`) marks them done. On Dask each
unit is one task that owns whole Zarr shards, never part of one (zarr-python #3682/#3514: two
writers in one shard lose data); the driver alone creates the store metadata, holds the output
lock, marks units done and publishes. A worker that dies holding a task costs that task only: the
scheduler runs it again elsewhere, and as units are pure functions of (settings, unit) the store
is bit-identical to a serial run.

Configuration (``<stage>.executor`` and ``<stage>.dask``): ``dask.scheduler: tcp://host:8786``
joins a running cluster; otherwise a ``LocalCluster`` of ``dask.workers`` worker processes is
started for the run and closed after it.
"""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pipeline.config import check_settings, setting
from pipeline.errors import ConfigError, PipelineError
from stages.runner import Unit, UnitWork, execute_unit

log = logging.getLogger(__name__)

ExecutorName = Literal["inprocess", "dask"]
EXECUTORS = ("inprocess", "dask")


@dataclass(frozen=True)
class DaskConfig:
    """The Dask cluster a stage runs on when its ``executor`` is ``dask`` (``<stage>.dask``)."""

    scheduler: str | None = None      # tcp://host:8786: join this running cluster; None = start one
    workers: int = setting(2, minimum=1)  # worker processes of the LocalCluster started for the run
    threads_per_worker: int = setting(1, minimum=1)  # tasks at once per worker (one unit each)
    torch_threads: int | None = setting(None, minimum=1)  # torch threads per worker process; None =
                                      # cores // workers on a LocalCluster, torch's default on a
                                      # joined cluster

    def __post_init__(self) -> None:
        check_settings(self, "dask")


class InProcessExecutor:
    """Units one after the other in this process (the default; the bytes a Dask run must match)."""

    name = "inprocess"

    def run_units(self, work: UnitWork, units: list[Unit], scratch_dir: Path,
                  prepare: Callable[[Unit], None]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        """Run ``units`` in order; ``prepare(unit)`` (creating its store) just before each."""
        for unit in units:
            prepare(unit)
            yield unit, execute_unit(work, unit, scratch_dir)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` where units run (here)."""
        return fn(*args)


class DaskExecutor:
    """Units as tasks of a ``dask.distributed`` client, as many at once as the cluster runs."""

    name = "dask"

    def __init__(self, client: Any) -> None:
        self.client = client

    def run_units(self, work: UnitWork, units: list[Unit], scratch_dir: Path,
                  prepare: Callable[[Unit], None]) -> Iterator[tuple[Unit, dict[str, Any]]]:
        """Submit every unit (after ``prepare`` of each), yield them as they finish."""
        from distributed import as_completed

        for unit in units:
            prepare(unit)
        run = uuid.uuid4().hex[:8]  # task keys unique per run: a rerun never meets old results
        futures = {self.client.submit(execute_unit, work, unit, str(scratch_dir), pure=False,
                                      key=f"unit-{unit.key}-{run}"): unit for unit in units}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:  # an error or an interruption: do not leave the other units running
            self.client.cancel(list(futures))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker and return its result."""
        return self.client.submit(fn, *args, pure=False).result()


def check_executor(name: str, dask: DaskConfig, where: str) -> None:
    """Refuse an unknown executor or impossible cluster settings, naming the setting."""
    if name not in EXECUTORS:
        raise ConfigError(f"{where}.executor: {name!r} is not one of {list(EXECUTORS)}")
    for key in ("workers", "threads_per_worker"):
        if getattr(dask, key) < 1:
            raise ConfigError(f"{where}.dask.{key}: must be >= 1, got {getattr(dask, key)}")
    if dask.torch_threads is not None and dask.torch_threads < 1:
        raise ConfigError(f"{where}.dask.torch_threads: must be >= 1, got {dask.torch_threads}")


@contextmanager
def open_executor(name: str, dask: DaskConfig, where: str = "stage") -> Iterator[Any]:
    """The executor ``name`` (``inprocess`` or ``dask``), with its cluster open while in use."""
    check_executor(name, dask, where)
    if name == "inprocess":
        yield InProcessExecutor()
        return
    with dask_client(dask, where) as client:
        yield DaskExecutor(client)


@contextmanager
def dask_client(cfg: DaskConfig, where: str = "stage") -> Iterator[Any]:
    """A client of the cluster at ``cfg.scheduler``, or of a LocalCluster started for the block."""
    try:
        import dask
        from distributed import Client, LocalCluster

        from stages.dask_plugins import TorchThreads
    except ImportError as exc:
        raise PipelineError(f"{where}.executor is dask but dask.distributed is not installed: "
                            "pip install 'dask[distributed]'") from exc
    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise PipelineError(f"{where}.dask.scheduler: no Dask scheduler answers at "
                                f"{cfg.scheduler} ({exc}); start one (`dask scheduler`) or fix "
                                "the address") from None
        with client:
            if cfg.torch_threads:
                client.register_plugin(TorchThreads(cfg.torch_threads))
            log.info("joined the Dask cluster at %s (%d workers)", cfg.scheduler,
                     len(client.scheduler_info()["workers"]))
            yield client
        return
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    # workers may start processes of their own (image decoding): not daemonic
    with dask.config.set(local_worker_config(threads)):
        with LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker,
                          processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            client.register_plugin(TorchThreads(threads))
            log.info("started a LocalCluster of %d workers (%d torch threads each)", cfg.workers, threads)
            yield client


def local_worker_config(torch_threads: int) -> dict[str, Any]:
    """Dask settings for the worker processes of a LocalCluster that run teachers.

    Not daemonic: a worker may start image-decoding processes of its own. And the thread
    environment of each worker is the torch thread count: a Dask nanny starts its worker with
    ``OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` (``distributed.nanny.pre-spawn-
    environ``), and although ``torch.set_num_threads`` raises torch's own count afterwards, a
    teacher forward in such a worker ran 1.4x slower than in a plain process with the same torch
    threads (BENCHMARKS.md §2).
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    # A fixed glibc trim threshold also turns off malloc's adaptive mmap threshold, so every
    # large tensor is mmap'ed and unmapped again: each teacher op then pays page faults.
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update({k: int(torch_threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "OPENBLAS_NUM_THREADS")})
    return {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}


def worker_index() -> int:
    """This Dask worker's index (a LocalCluster names its workers 0, 1, ... and keeps the name when
    it restarts one; ``dask worker --name N`` sets it elsewhere); 0 outside a worker."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    try:
        return int(name)
    except (TypeError, ValueError):
        return 0
