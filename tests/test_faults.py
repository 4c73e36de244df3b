"""Fault tests: the caches are complete and verified, or refused with a clear message.

The ten tests of the "caches that can be trusted" issue, numbered in their docstrings, plus a few
supplementary ones (publish interrupted between its renames, stale locks, the neighbours stage).
Each uses real processes where the fault is a process's fate (SIGKILL, a concurrent run, a full
disk) and real files throughout (tar shards, Zarr stores, DVC repositories). A comment marked
``PROTECTION`` names what each test relies on: remove it and the test fails.

Subprocesses run the installed ``distill`` command. Where a test must stop a run at a known point,
it runs the same CLI through ``GATED``: the real teacher, whose forward pass blocks after a given
number of calls (so a kill lands mid-run deterministically, not by timing luck).
"""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.manifest import Manifest, ShardInfo, load_manifest
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError, FingerprintMismatchError, PipelineError, ShardError
from pipeline.fingerprint import sha256_file
from pipeline.stores.base import ROW_INVALID
from pipeline.stores.inspect import verify_cache
from pipeline.stores.neighbors import open_neighbors
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from stages.cli import app
from stages.lock import LockError, lock_path, output_lock
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.teach.run import TeachConfig, run_teach
from tests._data_helpers import caption_json, png_bytes, write_tar
from tests.conftest import TINY_CLIP_CFG, tiny_samples
from tests.test_dvc_pipeline import stages_run, tiny_params, write_raw_folder
from tests.test_teach import tree_digest

REPO = Path(__file__).resolve().parent.parent
DISTILL = Path(sys.executable).parent / "distill"
runner = CliRunner()

N_TRAIN, N_TEST, PER_TAR, ROWS, BATCH = 24, 8, 7, 8, 5  # 2 captions per image

# The `distill` CLI with the real teacher, whose forward pass blocks after GATE_AFTER calls and
# signals it by creating GATE_FILE; the test then kills it (or lets it hold its lock).
GATED = """
import os, sys, time
from pipeline.teachers.base import Teacher
count = Teacher._count_forward
def gated(self):
    if self.forward_calls >= int(os.environ["GATE_AFTER"]):
        open(os.environ["GATE_FILE"], "w").close()
        time.sleep(600)
    count(self)
Teacher._count_forward = gated
from stages.cli import app
sys.argv[0] = "distill"
app()
"""


# ----------------------------------------------------------------------------- helpers

def write_dataset(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    for split, n, start in (("train", n_train, 0), ("test", n_test, 10_000)):
        write_shards(tiny_samples(n, start), root / split, split, PER_TAR)
        write_manifest(root / split)
    return root


def write_params(path: Path, dataset: Path, out_root: Path, **teach) -> Path:
    """params.yaml with teacher `tiny` (a random-init open_clip) and small units."""
    params = {
        "teachers": {"tiny": {"teacher": "open_clip",
                              "kwargs": {"model_cfg": TINY_CLIP_CFG, "pretrained": None}}},
        "teach": {"dataset": str(dataset), "out_root": str(out_root), "batch_size": BATCH,
                  "rows_per_shard": ROWS, "rows_per_chunk": 4, "device": "cpu",
                  "summary_dir": str(out_root.parent / "reports"), **teach},
    }
    path.write_text(yaml.safe_dump(params))
    return path


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, SOURCE_DATE_EPOCH="1700000000", **extra)


def distill(*args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run the installed `distill` command in a fresh process."""
    proc = subprocess.run([str(DISTILL), *map(str, args)], capture_output=True, text=True,
                          env=popen.pop("env", env()), timeout=300, **popen)
    if check:
        assert proc.returncode == 0, f"distill {' '.join(map(str, args))} failed:\n{proc.stderr}"
    return proc


def start_gated(params: Path, gate_after: int, gate_file: Path) -> subprocess.Popen:
    """`distill teach tiny` whose teacher stops for good before forward call gate_after + 1."""
    return subprocess.Popen(
        [sys.executable, "-c", GATED, "teach", "tiny", "--params", str(params), "--no-progress"],
        env=env(GATE_AFTER=str(gate_after), GATE_FILE=str(gate_file)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {path}:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def dvc_hash(path: Path) -> str:
    """The md5 `dvc add` / `dvc repro` record for directory ``path`` (DVC's own code)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as odb_dir:
        _, _, obj = build(LocalHashFileDB(fs, odb_dir), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def leftovers(root: Path) -> list[str]:
    """Anything temporary a run may leave: scratch, Zarr partial writes, locks, old copies."""
    patterns = (".scratch", "*.partial", "*.lock", ".*.old*", "*.creating", "*.tmp*")
    return sorted(str(p.relative_to(root)) for pat in patterns for p in root.rglob(pat))


def arrays_of(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(arr[:]) for name, arr in group.arrays()}


def units(n_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + ROWS, n_rows)) for s in range(0, n_rows, ROWS)]


def forward_calls_for(pending: set[str]) -> int:
    """Teacher forward passes the listed units need: one per batch of BATCH images, or of
    4 x BATCH captions (an independent count from the dataset sizes)."""
    calls = 0
    for split, n_img in (("train", N_TRAIN), ("test", N_TEST)):
        for kind, n, per_call in (("image", n_img, BATCH), ("text", 2 * n_img, 4 * BATCH)):
            calls += sum(-(-(b - a) // per_call) for a, b in units(n)
                         if f"{split}-{kind}-{a:012d}" in pending)
    return calls


def all_units() -> set[str]:
    return {f"{split}-{kind}-{a:012d}"
            for split, n_img in (("train", N_TRAIN), ("test", N_TEST))
            for kind, n in (("image", n_img), ("text", 2 * n_img)) for a, _ in units(n)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """A dataset and an uninterrupted `distill teach` run over it (in its own process)."""
    root = tmp_path_factory.mktemp("faults")
    dataset = write_dataset(root / "data")
    params = write_params(root / "ref.yaml", dataset, root / "ref" / "caches")
    summary = json.loads(distill("teach", "tiny", "--params", params, "--no-progress").stdout)
    assert summary["forward_calls"] == forward_calls_for(all_units()) == 16
    return {"dataset": dataset, "out": root / "ref" / "caches" / "tiny", "summary": summary}


# ----------------------------------------------------------------------------- 1


def test_1_sigkill_mid_teach_then_rerun_is_exact(reference, tmp_path):
    """Fault test 1: SIGKILL `distill teach` part-way, rerun: arrays equal an uninterrupted run's
    bit for bit, the DVC hash is the same, the rerun's forward passes cover only the unfinished
    units, and no `*.partial` or scratch file remains."""
    caches = tmp_path / "caches"
    params = write_params(tmp_path / "params.yaml", reference["dataset"], caches)
    gate = tmp_path / "gate"
    proc = start_gated(params, gate_after=5, gate_file=gate)  # 2 units done, the 3rd half-way
    wait_for(gate, proc)
    done = {p.stem for p in (caches / ".scratch/tiny/done").glob("*.json")}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done == {"train-image-000000000000", "train-image-000000000008"}
    assert not (caches / "tiny").exists()  # nothing half-done was published
    # What a SIGKILL inside zarr's LocalStore write leaves behind: a *.partial beside its shard.
    partial = caches / ".scratch/tiny/staging/train.zarr/image_emb/c/2/0.0123abcd.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\x00" * 100)

    rerun = json.loads(distill("teach", "tiny", "--params", params, "--no-progress").stdout)
    # PROTECTION: done markers (ScratchRun) — without them the rerun would redo all 16 passes.
    assert rerun["forward_calls"] == forward_calls_for(all_units() - done) == 12
    assert rerun["units_resumed"] == 2 and rerun["units_computed"] == len(all_units()) - 2
    for split in ("train", "test"):
        ours, ref = arrays_of(caches / f"tiny/{split}.zarr"), arrays_of(reference["out"] / f"{split}.zarr")
        assert ours.keys() == ref.keys()
        assert all(np.array_equal(ours[k], ref[k]) for k in ref), split
    assert tree_digest(caches / "tiny") == tree_digest(reference["out"])
    assert dvc_hash(caches / "tiny") == dvc_hash(reference["out"])
    # PROTECTION: remove_temporaries() before publishing, and the scratch directory's removal.
    assert leftovers(caches) == []
    assert verify_cache(caches / "tiny/train.zarr").ok


# ----------------------------------------------------------------------------- 2


def dvc_env(shim: Path | None = None) -> dict[str, str]:
    """PATH with the test interpreter's bin (and, first, a shim directory when given)."""
    path = os.pathsep.join([*([str(shim)] if shim else []), str(DISTILL.parent), os.environ["PATH"]])
    return env(PATH=path, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost")


def sh(cmd: list[str], cwd: Path, shim: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=dvc_env(shim), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def raising_teacher_shim(where: Path) -> Path:
    """A `distill` that is the real CLI except that any teacher forward pass raises."""
    where.mkdir()
    script = where / "distill"
    script.write_text(f"""#!{sys.executable}
import sys
from pipeline.teachers.base import Teacher
def refuse(self):
    raise RuntimeError("a teacher was run although its outputs are in the DVC cache")
Teacher._count_forward = refuse
from stages.cli import app
sys.argv[0] = "distill"
app()
""")
    script.chmod(0o755)
    return where


@pytest.mark.slow
def test_2_dvc_restores_and_pulls_without_running_a_teacher(tmp_path):
    """Fault test 2: after `dvc repro`, a second one runs nothing; a deleted output comes back
    from DVC's cache, and a fresh clone's `dvc pull` + `dvc repro` runs nothing — with a
    `distill` whose teachers raise if called. (tests/test_dvc_pipeline.py runs the whole
    pipeline, train and evaluate included.)"""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("pipeline", "stages", "schemas"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (proj / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {k: stages[k] for k in ("prepare", "teach")}}, sort_keys=False))
    params = tiny_params()
    params["teachers"] = {"tiny_clip": params["teachers"]["tiny_clip"]}  # one teach stage
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_raw_folder(proj / "raw")
    sh(["git", "init", "-q"], proj)
    sh(["dvc", "init", "-q"], proj)
    assert stages_run(sh(["dvc", "repro"], proj)) == {"prepare", "teach@tiny_clip"}
    out = proj / "caches/tiny_clip"
    digest, report = tree_digest(out), (proj / "reports/teach/tiny_clip.json").read_text()

    shim = raising_teacher_shim(tmp_path / "shim")
    # PROTECTION: DVC's stage cache (deps + params unchanged); a run would raise in the shim.
    assert stages_run(sh(["dvc", "repro"], proj, shim)) == set()
    shutil.rmtree(out)
    sh(["dvc", "repro"], proj, shim)  # restores the deleted output from the cache
    assert tree_digest(out) == digest
    assert (proj / "reports/teach/tiny_clip.json").read_text() == report

    sh(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], proj)
    sh(["dvc", "push"], proj)
    sh(["git", "add", "-A"], proj)
    sh(["git", "commit", "-qm", "caches"], proj)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(proj), str(clone)], tmp_path)
    sh(["dvc", "pull"], clone, shim)
    assert stages_run(sh(["dvc", "repro"], clone, shim)) == set()
    assert tree_digest(clone / "caches/tiny_clip") == digest
    assert verify_cache(clone / "caches/tiny_clip/train.zarr").ok


# ----------------------------------------------------------------------------- 3


def jpeg(seed: int) -> bytes:
    import io
    buf = io.BytesIO()
    Image.open(io.BytesIO(tiny_samples(1, seed)[0]["png"])).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_3_corrupt_jpeg_is_skipped_counted_invalid_or_fails_strictly(tmp_path):
    """Fault test 3: a corrupt JPEG inside a shard is skipped, its key logged and counted in the
    stage's metrics file, its row `valid=False`; with `on_bad_image: strict` a clear failure."""
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg(i), "json": {"captions": [f"photo {i}"]}}
               for i in range(10)]
    samples[6]["jpg"] = samples[6]["jpg"][: len(samples[6]["jpg"]) // 2]  # cut short mid-scan
    write_shards(samples, tmp_path / "data/train", "train", 4)
    write_manifest(tmp_path / "data/train")
    params = write_params(tmp_path / "p.yaml", tmp_path / "data", tmp_path / "caches", splits=["train"])
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "train-000001.tar/k006" in result.stderr  # the key is logged
    metrics = json.loads((tmp_path / "reports/tiny.json").read_text())  # `dvc metrics` file
    assert metrics["skipped_count"] == 1
    assert [s["id"] for s in metrics["skipped"]["train"]] == ["train-000001.tar/k006"]
    cache = TeacherCache.open(tmp_path / "caches/tiny/train.zarr")
    # PROTECTION: the row-status array marks the undecodable image's row invalid (and zero).
    assert cache.image_status.tolist() == [1] * 6 + [ROW_INVALID] + [1] * 3
    assert not cache.image_valid[6] and not cache.image_emb[6].any()
    assert cache.attrs["skipped"][0]["id"] == "train-000001.tar/k006"

    strict = write_params(tmp_path / "s.yaml", tmp_path / "data", tmp_path / "strict",
                          splits=["train"], on_bad_image="strict")
    result = runner.invoke(app, ["teach", "tiny", "--params", str(strict), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "shard train-000001.tar, key k006: image could not be decoded" in result.output
    assert not (tmp_path / "strict/tiny").exists()
    # the failed run leaves nothing outside its scratch directory (finished units stay there)
    assert [p.name for p in (tmp_path / "strict").iterdir()] == [".scratch"]


# ----------------------------------------------------------------------------- 4


def test_4_truncated_tar_fails_naming_the_shard(tmp_path):
    """Fault test 4: a truncated tar is a clear failure naming the shard — never a silently
    shorter dataset — whether it was cut after its manifest was written (teach refuses) or
    before (the manifest cannot be built)."""
    dataset = write_dataset(tmp_path / "data", n_train=14, n_test=3)
    shard = dataset / "train/train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 5])
    params = write_params(tmp_path / "p.yaml", dataset, tmp_path / "caches")
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"])
    # PROTECTION: the manifest's recorded shard sizes and sha256s, checked before reading.
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train-000001.tar" in result.output
    assert not (tmp_path / "caches/tiny").exists()
    # PROTECTION: the tar reader requires every member and the end-of-archive marker.
    with pytest.raises(ShardError, match=r"shard train-000001\.tar: truncated"):
        write_manifest(dataset / "train")


# ----------------------------------------------------------------------------- 5


def forged_manifest(root: Path) -> None:
    """A manifest listing a bad shard with its true size, hash and counts (as another tool
    might write), so the refusal must come from the reader itself."""
    shards = tuple(ShardInfo(p.name, p.stat().st_size, sha256_file(p), 2, 2)
                   for p in sorted(root.glob("*.tar")))
    (root / "manifest.json").write_text(json.dumps(Manifest(root, shards).to_dict()))


@pytest.mark.parametrize("members, key", [
    ([("a.png", png_bytes(0)), ("a.json", caption_json(["x"])), ("b.png", png_bytes(1)),
      ("b.json", caption_json(["y"])), ("a.png", png_bytes(2)), ("a.json", caption_json(["z"]))], "'a'"),
    ([("a.png", png_bytes(0)), ("a.json", caption_json(["x"])),
      ("b.v2.png", png_bytes(1)), ("b.v2.json", caption_json(["y"]))], "'b'"),
], ids=["duplicate-key", "dotted-basename"])
def test_5_duplicate_key_and_dotted_basename_are_refused(tmp_path, members, key):
    """Fault test 5: a duplicated key, and a dotted basename, inside a shard are refused naming
    shard and key — when the manifest is built, and by teach's reader under a forged manifest."""
    split = tmp_path / "data/train"
    split.mkdir(parents=True)
    write_tar(split / "train-000000.tar", members)
    # PROTECTION: _iter_groups refuses repeated keys and dotted basenames (webdataset would
    # merge or split the samples silently).
    with pytest.raises(ShardError, match=rf"shard train-000000\.tar, key {key}"):
        write_manifest(split)
    forged_manifest(split)
    params = write_params(tmp_path / "p.yaml", tmp_path / "data", tmp_path / "caches", splits=["train"])
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"shard train-000000.tar, key {key}" in result.output
    assert not (tmp_path / "caches/tiny").exists()


# ----------------------------------------------------------------------------- 6

TINY_STUDENT = {"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32,
                "vision_layers": 1, "vision_heads": 2, "context_length": 16, "text_width": 32,
                "text_heads": 2, "text_layers": 1}


def train_cfg(dataset: Path, out: Path, caches: tuple[str, ...], **kw):
    from stages.train.run import TrainConfig

    return TrainConfig(student_kwargs=TINY_STUDENT, dataset=str(dataset), caches=caches,
                       out_dir=str(out), batch_size=4, steps=1, device="cpu", **kw)


def unit_rows(n: int, dim: int = 32) -> np.ndarray:
    x = np.random.default_rng(n).normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def taught(tmp_path, tiny_teacher) -> dict[str, Path]:
    """A dataset and its real teacher cache (in-process `run_teach`)."""
    dataset = write_dataset(tmp_path / "data", n_train=20, n_test=4)
    cfg = TeachConfig(dataset=str(dataset), out_root=str(tmp_path / "caches"), batch_size=BATCH,
                      rows_per_shard=ROWS, rows_per_chunk=4, summary_dir=str(tmp_path / "reports"))
    run_teach(cfg, "tiny", tiny_teacher, progress=False)
    return {"dataset": dataset, "store": tmp_path / "caches/tiny/train.zarr", "cfg": cfg}


def test_6_stage2_refuses_other_teacher_dataset_or_schema(taught, tmp_path):
    """Fault test 6: training pointed at a cache whose dataset manifest, teacher or schema
    differs is refused before a step, printing both fingerprints (or schema ids)."""
    from stages.train.run import train

    store, dataset = taught["store"], taught["dataset"]
    ours = load_manifest(dataset / "train").fingerprint
    # dataset: the same teacher over another dataset
    other = write_dataset(tmp_path / "other", n_train=9, n_test=2)
    other_fp = load_manifest(other / "train").fingerprint
    # PROTECTION: TeacherCache.open(expect_dataset=...) in the trainer's target loading.
    with pytest.raises(FingerprintMismatchError) as err:
        train(train_cfg(other, tmp_path / "m1", (str(store),)), progress=False)
    assert other_fp in str(err.value) and ours in str(err.value)

    # teacher: neighbours built from this teacher's cache, training on another teacher's cache
    cache = TeacherCache.open(store)
    other_teacher = write_cache_from_arrays(
        tmp_path / "caches2/other/train.zarr", image_ids=cache.image_ids, text_ids=cache.text_ids,
        text_to_image=cache.text_to_image, teacher={"teacher": "another"}, dataset_fingerprint=ours,
        split="train", logit_scale=20.0, image_emb=unit_rows(len(cache.image_ids)),
        text_emb=unit_rows(len(cache.text_ids)))
    run_neighbors(NeighborsConfig(teacher="tiny", k=3, cache_root=str(tmp_path / "caches"),
                                  out_root=str(tmp_path / "nn"), rows_per_shard=ROWS), "tiny", progress=False)
    nn_store = tmp_path / "nn/tiny/train.zarr"
    their = TeacherCache.open(other_teacher).teacher_fingerprint
    # PROTECTION: the neighbour store records its source teacher; the opener compares it.
    with pytest.raises(FingerprintMismatchError) as err:
        train(train_cfg(dataset, tmp_path / "m2", (str(other_teacher),), neighbors=str(nn_store)),
              progress=False)
    assert their in str(err.value) and cache.teacher_fingerprint in str(err.value)
    with pytest.raises(FingerprintMismatchError, match="source teacher fingerprint mismatch"):
        open_neighbors(nn_store, expect_teacher=their)

    # schema: a store of a later schema version
    newer = tmp_path / "newer.zarr"
    shutil.copytree(store, newer)
    meta = json.loads((newer / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 3
    (newer / "zarr.json").write_text(json.dumps(meta))
    # PROTECTION: check_schema_id() in open_group_checked().
    with pytest.raises(FingerprintMismatchError) as err:
        train(train_cfg(dataset, tmp_path / "m3", (str(newer),)), progress=False)
    assert "expected: vlm-distill/teacher-cache v1" in str(err.value)
    assert "found:    vlm-distill/teacher-cache v3" in str(err.value)
    assert not any((tmp_path / m / "train_log.csv").exists() for m in ("m1", "m2", "m3"))


# ----------------------------------------------------------------------------- 7


@pytest.mark.parametrize("damage", ["zeroed-range", "deleted-shard", "emptied-shard"])
def test_7_damaged_store_is_reported_and_training_refuses(taught, tmp_path, damage):
    """Fault test 7: a deleted Zarr shard file, a zeroed byte range inside one (and an emptied
    one): `distill cache verify` reports it and exits 1, and training refuses to start — the
    fill values Zarr would silently return are never read as data."""
    from stages.train.run import train

    store = taught["store"]
    if damage == "zeroed-range":
        target, array = store / "image_emb/c/1/0", "image_emb"
        data = bytearray(target.read_bytes())
        data[40:72] = bytes(32)  # inside the first chunk's compressed bytes
        target.write_bytes(bytes(data))
        # PROTECTION: the crc32c codec after zstd (each chunk), read_array's CacheError.
        expected = r"image_emb rows \[8, 16\): unreadable"
    elif damage == "deleted-shard":
        target, array = store / "text_to_image/c/2", "text_to_image"
        target.unlink()  # would read back as -1s: every caption pointing at no image
        expected = r"shard file text_to_image/c/2 is missing"
    else:
        target, array = store / "image_id/c/0", "image_id"
        target.write_bytes(b"")  # would read back as empty ids, silently
        expected = r"shard file image_id/c/0 is empty"
    # PROTECTION (missing/empty): every shard is written, and shard_file_faults() stats them all.
    result = runner.invoke(app, ["cache", "verify", str(store)])
    assert result.exit_code == 1
    assert re.search(expected, result.output), result.output
    with pytest.raises(CacheError, match=array):
        train(train_cfg(taught["dataset"], tmp_path / "model", (str(store),)), progress=False)
    assert not (tmp_path / "model/train_log.csv").exists()


@pytest.mark.parametrize("key,value,expected", [
    ("logit_scale", 900.0, r"logit_scale 900.0 disagrees with the recorded teacher's logit_scale"),
    ("embed_dim", 64, r"embed_dim 64 disagrees with the recorded teacher's embed_dim 32"),
    ("modalities", ["text"], r"image_emb is stored but modalities \['text'\] does not list it"),
    ("rows_per_shard", 16, r"image_emb: shards of 8 rows, but rows_per_shard is 16"),
])
def test_7_edited_root_attribute_is_reported_and_refused(taught, tmp_path, key, value, expected):
    """A root attribute edited by hand (e.g. the teacher's temperature, which training reads from
    the cache) disagrees with the fingerprinted teacher fields or the arrays: `cache verify` exits
    1 naming it and opening the store (training) refuses it."""
    from stages.train.run import train

    store = taught["store"]
    meta = json.loads((store / "zarr.json").read_text())
    assert meta["attributes"]["teacher"]["embed_dim"] == 32 and meta["attributes"]["rows_per_shard"] == ROWS
    meta["attributes"][key] = value
    (store / "zarr.json").write_text(json.dumps(meta))
    # PROTECTION: attribute_faults() in verify_cache() and in structure_faults() of every opener.
    result = runner.invoke(app, ["cache", "verify", str(store)])
    assert result.exit_code == 1
    assert re.search(expected, result.output), result.output
    with pytest.raises(CacheError, match=expected):
        TeacherCache.open(store)
    with pytest.raises(CacheError, match=expected):
        train(train_cfg(taught["dataset"], tmp_path / "model", (str(store),)), progress=False)


# ----------------------------------------------------------------------------- 8


def test_8_concurrent_teach_is_refused_and_a_dead_holder_is_taken_over(reference, tmp_path):
    """Fault test 8: two concurrent `distill teach` processes on one output: the second is
    refused, naming the first. Once the first is SIGKILLed its lock is stale (its pid is gone):
    the next run takes it over and finishes with the single-writer reference result."""
    caches = tmp_path / "caches"
    params = write_params(tmp_path / "params.yaml", reference["dataset"], caches)
    gate = tmp_path / "gate"
    first = start_gated(params, gate_after=3, gate_file=gate)
    try:
        wait_for(gate, first)
        done_before = sorted((caches / ".scratch/tiny/done").glob("*.json"))
        # PROTECTION: output_lock() — without it this run would write the same Zarr shards.
        second = distill("teach", "tiny", "--params", params, "--no-progress", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        message = " ".join(second.stderr.split())
        assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in message
        assert "refused" in message
        assert sorted((caches / ".scratch/tiny/done").glob("*.json")) == done_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads(lock_path(caches / "tiny").read_text())["pid"] == first.pid  # stale file
    third = distill("teach", "tiny", "--params", params, "--no-progress")
    assert f"taking over the stale lock of pid {first.pid}" in " ".join(third.stderr.split())
    assert tree_digest(caches / "tiny") == tree_digest(reference["out"])
    assert leftovers(caches) == []


def test_8_stale_lock_of_another_host_is_reported_with_how_to_clear_it(taught, tiny_teacher):
    """Fault test 8 (stale locks): a lock recorded on another host is never taken over (its
    process cannot be seen from here): the run is refused with the command that clears it."""
    cfg = taught["cfg"]
    out = Path(cfg.out_root) / "tiny"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 4242, "host": "build-node-7", "started": "2024-01-01T00:00:00Z",
                                "command": "distill teach tiny"}))
    with pytest.raises(LockError) as err:
        run_teach(cfg, "tiny", tiny_teacher, progress=False)
    message = str(err.value)
    assert "pid 4242 on host build-node-7" in message and f"rm '{lock}'" in message
    lock.unlink()  # what the message tells the user to do
    assert run_teach(cfg, "tiny", tiny_teacher, progress=False)["up_to_date"]
    assert not lock.exists()


def test_8_neighbors_takes_the_same_lock(taught):
    """Fault test 8 (neighbours): `neighbors` refuses to write an output another process holds."""
    out = Path(taught["cfg"].out_root) / "nn"
    cfg = NeighborsConfig(teacher="tiny", k=3, cache_root=taught["cfg"].out_root, out_root=str(out),
                          rows_per_shard=ROWS)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stages.lock import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(out / "tiny")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            run_neighbors(cfg, "tiny", progress=False)
        assert not (out / "tiny").exists() and not (out / ".scratch").exists()
    finally:
        holder.kill()
        holder.wait()
    run_neighbors(cfg, "tiny", progress=False)  # the holder died: its lock is taken over
    assert open_neighbors(out / "tiny/train.zarr")["attrs"]["k"] == 3


# ----------------------------------------------------------------------------- 9


class NanAt(torch.nn.Module):
    """The real teacher, with NaN and +Inf written into two rows of its ``call``-th output."""

    def __init__(self, inner, call: int) -> None:
        super().__init__()
        self.inner, self.call, self.forward_calls = inner, call, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def encode_images(self, pixels):
        self.forward_calls += 1
        out = self.inner.encode_images(pixels).clone()
        if self.forward_calls == self.call:
            out[1, 0], out[3, 5] = float("nan"), float("inf")
        return out

    def encode_texts(self, texts):
        self.forward_calls += 1
        return self.inner.encode_texts(texts)


def test_9_nan_teacher_output_is_refused_naming_samples(tmp_path, tiny_teacher):
    """Fault test 9: NaN / Inf in a teacher's output is refused before anything of its unit is
    written or marked done, naming the samples; finished units stay resumable."""
    dataset = write_dataset(tmp_path / "data", n_train=20, n_test=4)
    cfg = TeachConfig(dataset=str(dataset), out_root=str(tmp_path / "caches"), batch_size=BATCH,
                      rows_per_shard=ROWS, rows_per_chunk=4, summary_dir=str(tmp_path / "reports"))
    # call 3 = first batch of unit 2 (rows 8-12): rows 9 and 11 = train-000001.tar/s00009, s00011
    with pytest.raises(PipelineError) as err:
        run_teach(cfg, "tiny", NanAt(tiny_teacher, call=3), progress=False)
    assert "2 sample(s): train-000001.tar/s00009, train-000001.tar/s00011" in str(err.value)
    scratch = tmp_path / "caches/.scratch/tiny"
    # PROTECTION: check_finite() runs before write_unit() and mark_done().
    assert {p.stem for p in (scratch / "done").glob("*.json")} == {"train-image-000000000000"}
    status = zarr.open_group(str(scratch / "staging/train.zarr"), mode="r")["image_status"][:]
    assert status[:8].all() and not status[8:].any()  # unit 2: nothing written
    assert not (tmp_path / "caches/tiny").exists()
    resumed = run_teach(cfg, "tiny", tiny_teacher, progress=False)
    assert resumed["units_resumed"] == 1 and TeacherCache.open(tmp_path / "caches/tiny/train.zarr")


# ----------------------------------------------------------------------------- 10


def mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def shrink_tmpfs(fs: Path) -> None:
    """The published stores take `used` pages (one small file each): leave room for about two
    thirds of a second copy, so a rebuild fails after some of its units."""
    st = os.statvfs(fs)
    used = st.f_blocks - st.f_bfree
    subprocess.run(["mount", "-o", f"remount,size={(used + used * 2 // 3) * st.f_frsize}", str(fs)],
                   check=True)


def file_size_limit(nbytes: int):
    """A ``preexec_fn`` limiting the size of any file the child writes to ``nbytes``."""
    def limit() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
    return limit


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["tmpfs", "rlimit"])
def test_10_disk_full_fails_clearly_and_keeps_the_published_cache(tmp_path, tiny_teacher, limit):
    """Fault test 10: the disk fills up while `distill teach` rebuilds a cache: the stage fails
    with a clear message (no traceback), the previously published cache is intact, and the
    finished units are kept for the rerun.

    `tmpfs`: a real tmpfs, shrunk after the first run so the rebuild hits ENOSPC; needs root to
    mount, and is skipped without it. `rlimit`: no mount needed — the rebuilding process runs
    under RLIMIT_FSIZE (SIGXFSZ ignored), so writing a larger file fails with EFBIG, as a full
    disk would with ENOSPC. The limit lies between the sizes of the train split's image shard
    and its (larger) caption shard, read from the first run's identical files: the image unit
    is written, the caption unit is not.
    """
    fs = tmp_path / "fs"
    if limit == "tmpfs" and not mount_tmpfs(fs, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the rlimit variant covers this")
    try:
        dataset = write_dataset(tmp_path / "data", n_train=40, n_test=2)
        caches = fs / "caches"
        params = write_params(tmp_path / "p.yaml", dataset, caches, rows_per_shard=128,
                              rows_per_chunk=64, on_bad_image="strict")
        cfg = TeachConfig(dataset=str(dataset), out_root=str(caches), batch_size=BATCH,
                          rows_per_shard=128, rows_per_chunk=64, summary_dir=str(tmp_path / "r"))
        run_teach(cfg, "tiny", tiny_teacher, progress=False)  # published; `skip` policy
        before = tree_digest(caches / "tiny")
        shard = [(caches / f"tiny/train.zarr/{k}_emb/c/0/0").stat().st_size for k in ("image", "text")]
        assert shard[0] < shard[1]
        if limit == "tmpfs":
            shrink_tmpfs(fs)
        # `strict` changes the stored settings: the cache is rebuilt in scratch, then published
        failed = distill("teach", "tiny", "--params", params, "--no-progress", check=False,
                         preexec_fn=file_size_limit(sum(shard) // 2) if limit == "rlimit" else None)
        message = " ".join(failed.stderr.split())
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        # PROTECTION: disk_full_errors() and publishing only by rename after every unit is done.
        assert "disk full while writing" in message
        assert f"Nothing was published: {caches / 'tiny'} is as it was" in message
        assert os.strerror(errno.ENOSPC if limit == "tmpfs" else errno.EFBIG) in message
        assert tree_digest(caches / "tiny") == before
        assert verify_cache(caches / "tiny/train.zarr").ok
        assert not lock_path(caches / "tiny").exists()
        if limit == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
        resumed = run_teach(replace(cfg, on_bad_image="strict"), "tiny", tiny_teacher, progress=False)
        assert resumed["units_resumed"] >= 1 and leftovers(caches) == []
    finally:
        if limit == "tmpfs":
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


# ----------------------------------------------------------------------------- supplementary


def test_publish_interrupted_between_renames_is_recovered(taught, tiny_teacher, monkeypatch):
    """A run that dies between the two renames of a publish leaves the previous output as
    `.<name>.old<pid>` and no output: the next run restores it (nothing a user had is lost), and
    a rerun of the new settings publishes them with no old copy left behind."""
    import pipeline.scratch as scratch

    cfg, out = taught["cfg"], Path(taught["cfg"].out_root) / "tiny"
    before = tree_digest(out)
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append(dst)
        if Path(dst) == out:  # the second rename: staging -> output
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(scratch.os, "replace", dies_on_second_rename)
    strict = replace(cfg, on_bad_image="strict")
    with pytest.raises(KeyboardInterrupt):
        run_teach(strict, "tiny", tiny_teacher, progress=False)
    monkeypatch.setattr(scratch.os, "replace", real_replace)
    assert not out.exists() and len(list(out.parent.glob(".tiny.old*"))) == 1
    # PROTECTION: recover_replaced() at the start of a run.
    kept = run_teach(cfg, "tiny", tiny_teacher, progress=False)  # the old settings again
    assert kept["up_to_date"] and kept["forward_calls"] == 0 and tree_digest(out) == before
    assert not list(out.parent.glob(".tiny.old*")) and not (out.parent / ".scratch").exists()
    rebuilt = run_teach(strict, "tiny", tiny_teacher, progress=False)
    assert not rebuilt["up_to_date"] and leftovers(out.parent) == []
