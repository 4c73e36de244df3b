"""The store runner on a real Dask ``LocalCluster`` (2 worker processes, 1 thread each).

Every store stage (teach, neighbors, itm) run on the cluster gives the bytes of the in-process
run; a worker SIGKILLed while it computes a unit costs that unit only; a driver killed mid-run
resumes from its done markers; and ``dvc repro`` with the Dask executor gives the in-process
run's DVC hashes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import TeacherEntry
from pipeline.stores.itm import open_itm_scores
from pipeline.stores.neighbors import open_neighbors
from pipeline.stores.teacher import TeacherCache
from pipeline.teachers.base import Teacher
from stages.executors import DaskConfig
from stages.itm.run import ItmConfig, run_itm
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.teach.run import TeachConfig, run_teach
from tests.conftest import TINY_CLIP_CFG
from tests.test_dvc_pipeline import REPO, run, stages_run, tiny_params, write_raw_folder
from tests.test_teach import tree_digest

pytestmark = pytest.mark.slow

TINY = TeacherEntry("open_clip", {"model_cfg": TINY_CLIP_CFG, "pretrained": None})
BLIP = TeacherEntry("blip_itm", {"config": "tiny", "seed": 0})
EFFNET = TeacherEntry("efficientnet_lite")  # real weights, slow enough to be caught mid-unit


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster for the module: 2 worker processes, 1 thread each, non-daemonic (so a
    worker may start image-decoding processes)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.daemon": False}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster:
            yield cluster


@pytest.fixture
def on_cluster(cluster) -> DaskConfig:
    """The Dask settings that join the module's cluster (one torch thread per worker)."""
    return DaskConfig(scheduler=cluster.scheduler_address, torch_threads=1)


def teach_cfg(root: Path, out: Path, **kw) -> TeachConfig:
    settings = dict(dataset=str(root), out_root=str(out / "caches"), batch_size=4, rows_per_shard=8,
                    rows_per_chunk=4, device="cpu", summary_dir=str(out / "reports"))
    return TeachConfig(**(settings | kw))


def dask(cfg, on_cluster: DaskConfig):
    return replace(cfg, executor="dask", dask=on_cluster)


def test_dask_builds_teacher_neighbour_and_itm_stores_bit_identical(make_dataset, tmp_path, on_cluster):
    root = make_dataset(n_train=20, n_test=6, corrupt={3})
    stores = {}
    for mode in ("inprocess", "dask"):
        out = tmp_path / mode
        teach = teach_cfg(root, out)
        nn = NeighborsConfig(teacher="tiny", k=4, cache_root=str(out / "caches"),
                             out_root=str(out / "nn"), rows_per_shard=8, block_rows=5)
        itm = ItmConfig(dual="tiny", single="blip", k=3, dataset=str(root), neighbors_root=str(out / "nn"),
                        out_root=str(out / "itm"), batch_size=6, rows_per_shard=8, device="cpu",
                        summary_dir=str(out / "reports/itm"))
        if mode == "dask":
            teach, nn, itm = (dask(c, on_cluster) for c in (teach, nn, itm))
        forwards_here = Teacher.total_forward_calls
        summaries = [run_teach(teach, "tiny", entry=TINY, progress=False),
                     run_neighbors(nn, "tiny", progress=False),
                     run_itm(itm, entry=BLIP, progress=False)]
        if mode == "dask":  # every teacher forward ran in a worker process, none here
            assert Teacher.total_forward_calls == forwards_here
        assert all(s["executor"] == mode and not s["up_to_date"] for s in summaries)
        stores[mode] = {"teach": out / "caches/tiny", "nn": out / "nn/tiny", "itm": out / "itm/tiny"}
        stores[mode + " summaries"] = summaries

    for name in ("teach", "nn", "itm"):  # files: every byte of every store
        assert tree_digest(stores["dask"][name]) == tree_digest(stores["inprocess"][name]), name
    ref, got = (TeacherCache.open(stores[m]["teach"] / "train.zarr") for m in ("inprocess", "dask"))
    np.testing.assert_array_equal(got.image_emb, ref.image_emb)  # arrays, as readers see them
    assert not got.image_valid[3] and got.attrs["skipped"][0]["id"].endswith("s00003")
    ref_nn, got_nn = (open_neighbors(stores[m]["nn"] / "train.zarr") for m in ("inprocess", "dask"))
    for key in ("i2t_topk_idx", "t2i_topk_sim", "i2i_topk_idx", "t2t_topk_sim"):
        np.testing.assert_array_equal(got_nn[key], ref_nn[key])
    ref_itm, got_itm = (open_itm_scores(stores[m]["itm"] / "train.zarr") for m in ("inprocess", "dask"))
    np.testing.assert_array_equal(got_itm.cand_itm, ref_itm.cand_itm)
    for ref_s, got_s in zip(stores["inprocess summaries"], stores["dask summaries"]):
        assert got_s["units_computed"] == ref_s["units_computed"] > 1
        assert got_s.get("forward_calls") == ref_s.get("forward_calls")
        assert got_s["units_recomputed"] == [] and got_s["unit_attempts"] == got_s["units_computed"]

    # kept when current, on Dask too: nothing runs again
    again = run_teach(dask(teach_cfg(root, tmp_path / "dask"), on_cluster), "tiny", entry=TINY, progress=False)
    assert again["up_to_date"] and again["forward_calls"] == 0


@contextmanager
def torch_threads(n: int):
    """torch's CPU thread count for the block. The workers run 1 thread each, and a CPU
    convolution's last bits depend on how many threads split it, so the serial reference of
    an EfficientNet store runs with as many."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kill_first_attempt(scratch: Path, part: str, killed: list[tuple[str, int]]) -> threading.Thread:
    """A thread that SIGKILLs the process of the first attempt marker of a ``part`` unit (the
    worker computing it) as soon as the marker appears, and records (unit, pid)."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            attempts = scratch / "attempts"
            markers = sorted(attempts.glob(f"*-{part}-*")) if attempts.is_dir() else []
            if markers:
                unit, pid = markers[0].name.split(".")[:2]
                os.kill(int(pid), signal.SIGKILL)
                killed.append((unit, int(pid)))
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ivf_index_is_built_once_and_shared_by_dask_workers(tmp_path, on_cluster):
    from stages.neighbors.run import IvfConfig
    from tests.test_teach import random_cache

    random_cache(tmp_path / "caches/syn/train.zarr", n_img=60, captions=2, dim=8)
    digests, recalls = {}, {}
    for mode in ("inprocess", "dask"):
        nn = NeighborsConfig(teacher="syn", k=4, cache_root=str(tmp_path / "caches"), out_root=str(tmp_path / mode),
                             rows_per_shard=16, method="ivf", ivf=IvfConfig(nlist=4, nprobe=2, train_rows=40),
                             recall_queries=30)
        summary = run_neighbors(dask(nn, on_cluster) if mode == "dask" else nn, "syn", progress=False)
        assert summary["executor"] == mode and summary["units_computed"] == 4 + 8 + 4 + 8
        digests[mode], recalls[mode] = tree_digest(tmp_path / mode / "syn"), summary["recall"]
    # the workers searched the index the driver built (kept in the scratch directory): the same bytes
    assert digests["dask"] == digests["inprocess"] and recalls["dask"] == recalls["inprocess"]


def test_worker_killed_mid_unit_costs_that_unit_only(make_dataset, tmp_path, on_cluster):
    root = make_dataset(n_train=24, n_test=8)
    with torch_threads(1):
        serial = run_teach(teach_cfg(root, tmp_path / "serial"), "eff", entry=EFFNET, progress=False)
    cfg = dask(teach_cfg(root, tmp_path / "dask"), on_cluster)
    killed: list[tuple[str, int]] = []
    watcher = kill_first_attempt(tmp_path / "dask/caches/.scratch/eff", "image", killed)
    summary = run_teach(cfg, "eff", entry=EFFNET, progress=False)
    watcher.join()
    assert killed, "no unit was seen starting"
    unit, pid = killed[0]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker process is gone
    assert summary["units_recomputed"] == [unit]  # computed again, and no other unit
    assert summary["unit_attempts"] == summary["units_computed"] + 1 == serial["units_computed"] + 1
    assert tree_digest(tmp_path / "dask/caches/eff") == tree_digest(tmp_path / "serial/caches/eff")


def test_killed_driver_resumes_on_dask_with_only_unfinished_units(make_dataset, tmp_path, on_cluster):
    root = make_dataset(n_train=32, n_test=8)
    cfg = teach_cfg(root, tmp_path / "dask", rows_per_shard=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "teachers": {"eff": {"teacher": EFFNET.teacher}},
        "teach": {"dataset": cfg.dataset, "out_root": cfg.out_root, "batch_size": 4,
                  "rows_per_shard": 4, "rows_per_chunk": 4, "device": "cpu",
                  "summary_dir": cfg.summary_dir}}))
    driver = subprocess.Popen([sys.executable, "-m", "stages.cli", "teach", "eff", "--params", str(params),
                               "--scheduler", on_cluster.scheduler, "--no-progress"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = tmp_path / "dask/caches/.scratch/eff/done"
    deadline = time.monotonic() + 180
    while not any(done_dir.glob("*.json")) and time.monotonic() < deadline:  # a marker is whole
        assert driver.poll() is None, driver.stderr.read().decode()
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1.0)  # tasks the dead driver left running finish (or are cancelled) by now
    done = {p.stem for p in done_dir.glob("*.json")}
    n_units = 32 // 4 + 64 // 4 + 8 // 4 + 16 // 4  # image and text units (2 captions an image)
    assert 0 < len(done) < n_units
    assert not (tmp_path / "dask/caches/eff").exists()  # nothing half-done was published

    resumed = run_teach(dask(cfg, on_cluster), "eff", entry=EFFNET, progress=False)
    assert resumed["units_resumed"] == len(done)
    assert resumed["units_computed"] == n_units - len(done)  # only the unfinished units ran
    with torch_threads(1):
        run_teach(teach_cfg(root, tmp_path / "serial", rows_per_shard=4), "eff", entry=EFFNET,
                  progress=False)
    assert tree_digest(tmp_path / "dask/caches/eff") == tree_digest(tmp_path / "serial/caches/eff")


def dvc_project(path: Path, executor_params: dict) -> Path:
    """A git + DVC project of the repository's pipeline with tiny parameters (as in
    tests/test_dvc_pipeline.py), with ``executor_params`` merged into the teach, align, neighbors
    and itm sections."""
    import shutil

    path.mkdir()
    for name in ("pipeline", "stages", "schemas"):
        shutil.copytree(REPO / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    params = tiny_params()
    for section in ("teach", "align", "neighbors", "itm"):
        params[section].update(executor_params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_raw_folder(path / "raw")
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    return path


def store_hashes(project: Path) -> dict[str, str]:
    """The DVC hash of every store the store stages output, from dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {f"{stage}:{out['path']}": out["md5"] for stage, entry in lock.items()
            for out in entry.get("outs", []) if out["path"].startswith("caches/")}


def test_dvc_repro_with_dask_executor_gives_the_in_process_hashes(tmp_path, on_cluster):
    targets = ["itm"]  # and what it depends on: prepare, two teachers, align, neighbors
    serial = dvc_project(tmp_path / "serial", {"executor": "inprocess"})
    assert "itm" in stages_run(run(["dvc", "repro", *targets], serial))
    on_dask = dvc_project(tmp_path / "dask", {"executor": "dask",
                                              "dask": {"scheduler": on_cluster.scheduler,
                                                       "torch_threads": 1}})
    assert stages_run(run(["dvc", "repro", *targets], on_dask)) == {
        "prepare", "teach@tiny_clip", "teach@tiny_vision", "align", "neighbors", "itm"}
    hashes = store_hashes(on_dask)
    assert len(hashes) == 5 and hashes == store_hashes(serial)
    summary = yaml.safe_load((on_dask / "reports/teach/tiny_clip.json").read_text())
    assert summary["executor"] == "dask" and summary["units_computed"] > 0
