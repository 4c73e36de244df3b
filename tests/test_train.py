"""Training stage: loader joins, end-to-end runs on tiny shards + a cache built from arrays."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import iter_samples
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError, FingerprintMismatchError, PipelineError, SampleDecodeError
from pipeline.losses import LossTerm
from pipeline.stores.base import ROW_INVALID, ROW_VALID
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from pipeline.students import load_student
from pipeline.training.loader import DistillStream, LoaderState, TrainItem, iter_batches
from pipeline.training.schedule import lr_at, make_optimizer
from pipeline.training.targets import open_targets
from stages.train.run import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
PER_COLOR = 8
BROKEN_KEY = "broken"
TEACHER_DIM = 8
TINY_STUDENT = {"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32,
                "vision_layers": 1, "vision_heads": 2, "context_length": 16, "text_width": 32,
                "text_heads": 2, "text_layers": 1}


def _png(rgb: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-20, 20, (24, 24, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> list[dict]:
    samples = []
    for i in range(PER_COLOR):
        for name, rgb in COLORS.items():
            samples.append({"__key__": f"{name}{i}", "png": _png(rgb, len(samples)),
                            "json": {"captions": [f"a {name} square", name], "label": name}})
    # An undecodable image: the teacher marked its row invalid; training must skip it.
    samples.insert(5, {"__key__": BROKEN_KEY, "png": b"not a png at all",
                       "json": {"captions": ["a broken picture"]}})
    return samples


def write_cache(path: Path, manifest, modalities=("image", "text"), dataset_fp: str | None = None,
                logit_scale: float = 30.0, teacher: str = "toy", noise: float = 0.0) -> Path:
    """A complete teacher cache whose embeddings are a one-hot code of each sample's colour
    (plus gaussian ``noise`` seeded by the teacher name, for teachers that should disagree)."""
    rows = list(iter_samples(manifest, decode_images=False))
    names = list(COLORS)

    def code(label):
        vec = np.zeros(TEACHER_DIM, np.float32)
        vec[names.index(label) if label in names else len(names)] = 1.0
        return vec
    image_emb = np.stack([code(s.label) for s in rows])
    text_rows = [(i, f"{s.sample_id}#{c}", s.label)
                 for i, s in enumerate(rows) for c in range(len(s.captions))]
    status = np.array([ROW_INVALID if s.key == BROKEN_KEY else ROW_VALID for s in rows], np.uint8)
    text_emb = np.stack([code(t[2]) for t in text_rows])
    if noise:
        rng = np.random.default_rng(sum(teacher.encode()))
        image_emb = image_emb + noise * rng.standard_normal(image_emb.shape).astype(np.float32)
        text_emb = text_emb + noise * rng.standard_normal(text_emb.shape).astype(np.float32)
    return write_cache_from_arrays(
        path, image_ids=np.array([s.sample_id for s in rows]),
        text_ids=np.array([t[1] for t in text_rows]), text_to_image=np.array([t[0] for t in text_rows]),
        teacher={"teacher": teacher}, dataset_fingerprint=dataset_fp or manifest.fingerprint,
        split="train", logit_scale=logit_scale, image_status=status,
        image_emb=image_emb if "image" in modalities else None,
        text_emb=text_emb if "text" in modalities else None)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    write_shards(_samples(), root / "data" / "train", "train", max_samples_per_shard=12)
    manifest = write_manifest(root / "data" / "train")
    return {"root": root, "dataset": root / "data",
            "cache": write_cache(root / "caches" / "train.zarr", manifest),
            "vision_cache": write_cache(root / "caches" / "vision.zarr", manifest, ("image",)),
            "other": write_cache(root / "caches" / "other.zarr", manifest,
                                 dataset_fp="sha256:" + "0" * 64)}


def _cfg(toy, out: Path, **overrides) -> TrainConfig:
    base = dict(student_kwargs=TINY_STUDENT, dataset=str(toy["dataset"]), caches=(str(toy["cache"]),),
                out_dir=str(out), batch_size=8, steps=8, lr=2e-3, warmup_steps=2, log_every=1,
                checkpoint_every=3, shuffle_buffer=16, device="cpu",
                losses=(LossTerm("contrastive"), LossTerm("feature", 1.0, {"metric": "cosine"}),
                        LossTerm("similarity_kl", 0.5)))
    base.update(overrides)
    return TrainConfig(**base)


def _stream(toy, epoch: int, seed: int = 0) -> DistillStream:
    manifest = load_manifest(toy["dataset"] / "train")
    targets = open_targets([str(toy["cache"])], manifest)
    from pipeline.students import TrainAugment
    return DistillStream(manifest, targets, TrainAugment(32), seed=seed, epoch=epoch,
                         shuffle_buffer=16, on_bad_image="skip")


def test_stream_joins_rows_by_id_and_skips_invalid(toy):
    manifest = load_manifest(toy["dataset"] / "train")
    targets = open_targets([str(toy["cache"])], manifest)
    elements = list(_stream(toy, epoch=0))
    items = [e for e in elements if isinstance(e, TrainItem)]
    skips = [e for e in elements if not isinstance(e, TrainItem)]
    assert [s.sample_id.split("/")[1] for s in skips] == [BROKEN_KEY]
    assert sorted(it.image_row for it in items) == sorted(
        i for i, ok in enumerate(targets.image_valid) if ok)
    for it in items:
        assert targets.image_rows[it.sample_id] == it.image_row
        assert targets.text_to_image[it.text_row] == it.image_row
        colour = it.caption.split()[1] if " " in it.caption else it.caption  # "a red square" / "red"
        assert it.sample_id.split("/")[1].startswith(colour)
        assert it.pixels.shape == (3, 32, 32)
    order0 = [it.sample_id for it in items]
    assert order0 != [it.sample_id for it in _stream(toy, epoch=1) if isinstance(it, TrainItem)]
    assert order0 == [it.sample_id for it in _stream(toy, epoch=0) if isinstance(it, TrainItem)]


def test_batches_resume_from_position_and_workers_agree(toy):
    make = lambda e: _stream(toy, e)  # noqa: E731
    ids = lambda b: [it.sample_id for it in b[0]]  # noqa: E731
    straight = iter_batches(make, 8, 0, LoaderState())
    first = [next(straight) for _ in range(6)]
    assert first[3][1].epoch == 0 and first[4][1].epoch == 1  # 32 usable = 4 batches per epoch
    resumed = iter_batches(make, 8, 0, first[1][1])
    assert [ids(next(resumed)) for _ in range(4)] == [ids(b) for b in first[2:6]]
    # Two workers split the shards, so the order differs from one process, but resumes exactly.
    workers = iter_batches(make, 8, 2, LoaderState())
    first_w = [next(workers) for _ in range(3)]
    resumed_w = iter_batches(make, 8, 2, first_w[0][1])
    assert [ids(next(resumed_w)) for _ in range(2)] == [ids(b) for b in first_w[1:3]]
    for gen in (straight, resumed, workers, resumed_w):
        gen.close()


def test_fused_optimizer_takes_the_reference_adamw_step():
    """make_optimizer's fused AdamW (CPU) updates as torch's per-tensor AdamW does, decay on
    matrices only."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    twin = copy.deepcopy(net)
    fused = make_optimizer([net], lr=0.01, weight_decay=0.1)
    assert fused.defaults["fused"]
    reference = torch.optim.AdamW([{"params": [twin[0].weight], "weight_decay": 0.1},
                                   {"params": [twin[0].bias, *twin[1].parameters()], "weight_decay": 0.0}],
                                  lr=0.01, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((net, fused), (twin, reference)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lr_schedule():
    assert lr_at(1, 1.0, 4, 10) == pytest.approx(0.25)
    assert lr_at(4, 1.0, 4, 10) == lr_at(5, 1.0, 4, 10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_at(3, 1.0, 0, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 3)))


def _log(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_end_to_end_loss_decreases(toy, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(toy, out, steps=30, checkpoint_every=100, augment=False), progress=False)
    rows = _log(out)
    assert list(rows[0]) == ["step", "epoch", "loss", "loss_contrastive", "loss_feature",
                             "loss_similarity_kl", "w_contrastive", "w_feature",
                             "w_similarity_kl", "lr", "logit_scale", "samples_per_s"]
    assert {r["w_similarity_kl"] for r in rows} == {"0.5"}  # fixed weights stay as configured
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert summary["teacher_forward_calls"] == 0 and summary["finished"]
    assert summary["skipped_count"] == 1 and summary["skip_events"] >= 1
    assert summary["steps"] == 30 and summary["samples_seen"] == 240
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["steps"] == 30
    student = load_student(out)
    final = load_file(str(out / "student.safetensors"))
    for key, value in student.state_dict().items():
        assert torch.equal(value, final[key])
    assert not (tmp_path / ".scratch").exists()  # a finished run leaves no resumable state


def test_resume_matches_straight_run(toy, tmp_path):
    straight = train(_cfg(toy, tmp_path / "a"), progress=False)
    partial = train(_cfg(toy, tmp_path / "b"), progress=False, stop_after=5)
    assert not partial["finished"] and not (tmp_path / "b" / "student.safetensors").exists()
    resumed = train(_cfg(toy, tmp_path / "b"), progress=False)
    assert resumed["resumed_from"] == 3 and resumed["steps_this_run"] == 5  # last checkpoint: 3
    assert straight["steps"] == resumed["steps"] == 8
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in log_b] == [str(s) for s in range(1, 9)]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert resumed["skipped_count"] == straight["skipped_count"] == 1


def test_summary_names_paths_relative_to_the_project(toy, tmp_path, monkeypatch):
    """Run from the project root with absolute paths inside it: train_summary.json and the
    printed summary name them relative to it (the stores read are keys of `caches`)."""
    monkeypatch.chdir(toy["root"])
    out = toy["root"] / f"model-{tmp_path.name}"
    train(_cfg(toy, out, steps=2), progress=False)
    text = (out / "train_summary.json").read_text()
    assert str(toy["root"]) not in text
    recorded = TeacherCache.open(toy["cache"]).teacher_fingerprint
    assert json.loads(text)["caches"] == {"caches/train.zarr": recorded}


def test_alone_trains_the_same_student_with_its_own_loss_only(toy, tmp_path):
    """`distill train --alone`: the distilled run's student, data, schedule and seed with the
    contrastive loss alone and no role store: the same weights as that run written by hand."""
    from stages.train.run import alone_config

    distilled = _cfg(toy, tmp_path / "alone", steps=4, vision_teacher=str(toy["vision_cache"]))
    summary = train(alone_config(distilled), progress=False)
    assert [t["name"] for t in summary["losses"]] == ["contrastive"] and summary["recipe"] == "alone"
    assert list(summary["caches"]) == [str(toy["cache"])]  # the rows only; no vision store opened
    by_hand = dataclasses.replace(distilled, out_dir=str(tmp_path / "by_hand"), losses=(LossTerm("contrastive"),),
                      vision_teacher=None)
    train(by_hand, progress=False)
    a = load_file(str(tmp_path / "alone" / "student.safetensors"))
    b = load_file(str(tmp_path / "by_hand" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_settings_is_discarded(toy, tmp_path, caplog):
    """An interrupted run's state never leaks into a run with other settings (nor blocks it)."""
    out = tmp_path / "run"
    train(_cfg(toy, out, steps=6, checkpoint_every=2), progress=False, stop_after=3)
    fresh = train(_cfg(toy, out, steps=6, checkpoint_every=2, lr=1e-2), progress=False)
    assert fresh["resumed_from"] is None and fresh["discarded_checkpoint"].startswith("sha256:")
    assert "other settings" in caplog.text
    reference = train(_cfg(toy, tmp_path / "ref", steps=6, checkpoint_every=2, lr=1e-2), progress=False)
    a = load_file(str(out / "student.safetensors"))
    b = load_file(str(tmp_path / "ref" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_does_not_block_new_settings(toy, tmp_path):
    """After a finished run (e.g. `dvc repro` after a parameter change) training starts afresh."""
    out = tmp_path / "run"
    train(_cfg(toy, out, steps=3), progress=False)
    again = train(_cfg(toy, out, steps=3, lr=1e-2), progress=False)
    assert again["finished"] and again["resumed_from"] is None


def test_refuses_cache_of_other_dataset(toy, tmp_path):
    manifest = load_manifest(toy["dataset"] / "train")
    with pytest.raises(FingerprintMismatchError) as info:
        train(_cfg(toy, tmp_path, caches=(str(toy["other"]),)), progress=False)
    assert manifest.fingerprint in str(info.value) and "sha256:" + "0" * 64 in str(info.value)


def test_missing_cache_field_fails_before_first_step(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, caches=(str(toy["vision_cache"]),))
    with pytest.raises(CacheError, match=r"'text_emb'.*stage `teach`"):
        train(cfg, progress=False)
    assert not (tmp_path / "train_log.csv").exists()
    losses = (LossTerm("contrastive"), LossTerm("feature", 1.0, {"modalities": ["image"]}))
    summary = train(dataclasses.replace(cfg, losses=losses, steps=2), progress=False)
    assert summary["finished"]


def test_no_teacher_is_imported(toy, tmp_path):
    """A training run in a fresh interpreter never loads the teacher package."""
    cfg = _cfg(toy, tmp_path, steps=2)
    script = (
        "import json, sys\n"
        "from pipeline.config import from_dict\n"
        "from stages.train.run import TrainConfig, train\n"
        f"cfg = from_dict(TrainConfig, json.loads({json.dumps(json.dumps(dataclasses.asdict(cfg)))}))\n"
        "summary = train(cfg, progress=False)\n"
        "assert summary['teacher_forward_calls'] == 0\n"
        "assert not any(m.startswith('pipeline.teach') for m in sys.modules), sorted(sys.modules)\n"
        "print('ok', summary['steps'])\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "2"]


def test_cross_modal_loss_needs_one_teacher_for_both_modalities(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, caches=(str(toy["vision_cache"]), str(toy["cache"])))
    with pytest.raises(CacheError, match="similarity_kl.*different caches"):
        train(cfg, progress=False)


def test_strict_policy_stops_on_undecodable_image(toy, tmp_path):
    out = tmp_path / "models" / "student"
    with pytest.raises(SampleDecodeError, match=BROKEN_KEY):
        train(_cfg(toy, out, on_bad_image="strict", steps=2), progress=False)
    # nothing to resume from: the failed run leaves no scratch log (nor anything else) behind
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").rglob("*")) == []


def test_failed_run_keeps_a_resumable_checkpoint(toy, tmp_path):
    """A run failing after a checkpoint keeps its scratch directory: the next run resumes there."""
    from pipeline.losses import LOSSES, ContrastiveLoss

    class FailsAtStep3(ContrastiveLoss):
        calls = 0

        def forward(self, batch):
            FailsAtStep3.calls += 1
            if FailsAtStep3.calls == 3:
                raise RuntimeError("out of memory at step 3")
            return super().forward(batch)

    LOSSES.register("fails_at_step_3")(lambda: FailsAtStep3())
    out = tmp_path / "models" / "student"
    try:
        with pytest.raises(RuntimeError, match="step 3"):
            train(_cfg(toy, out, steps=6, checkpoint_every=1, losses=(LossTerm("fails_at_step_3"),)),
                  progress=False)
    finally:
        del LOSSES._factories["fails_at_step_3"]
    scratch = tmp_path / "models" / ".scratch" / "student"
    assert (scratch / "last.safetensors").exists() and (scratch / "train_log.csv").exists()
    assert not out.exists()


def test_a_teacher_forward_during_training_is_caught(toy, tmp_path, tiny_teacher):
    """The zero-forward guarantee is measured: a loss that secretly runs a teacher fails the run."""
    from pipeline.losses import LOSSES, ContrastiveLoss

    class OnlineTeacherLoss(ContrastiveLoss):
        def forward(self, batch):
            tiny_teacher.encode_texts(["a red circle"])  # what online distillation would do
            return super().forward(batch)

    LOSSES.register("online_teacher_probe")(lambda: OnlineTeacherLoss())
    try:
        cfg = _cfg(toy, tmp_path / "run", steps=2, losses=(LossTerm("online_teacher_probe"),))
        with pytest.raises(PipelineError, match="a teacher ran 2 forward passes"):
            train(cfg, progress=False)
    finally:
        del LOSSES._factories["online_teacher_probe"]


def _hold_lock(out: Path):
    """Another process holding the output lock of ``out`` (as a concurrent run would)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stages.lock import output_lock\n"
         "with output_lock(sys.argv[1], '`distill train`'):\n    print('locked', flush=True); time.sleep(600)",
         str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_train_on_one_output_is_refused(toy, tmp_path):
    from stages.lock import LockError

    out = tmp_path / "student"
    holder = _hold_lock(out)
    try:
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            train(_cfg(toy, out), progress=False)
        assert not out.exists() and not (tmp_path / ".scratch").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    before = torch.get_num_threads()
    summary = train(_cfg(toy, out, threads=1), progress=False)  # the holder died: lock taken over
    assert summary["finished"] and summary["torch_threads"] == 1 and torch.get_num_threads() == before
