"""Stage `itm`: single-stream teacher scores of each image's top-k candidates — values against a
pair-by-pair recomputation, candidates, resume, refusals — and captions by text row."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from pipeline.data.captions import load_captions
from pipeline.data.manifest import load_manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import iter_samples
from pipeline.errors import CacheError, FingerprintMismatchError, PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.stores.inspect import cache_info
from pipeline.stores.itm import open_itm_scores
from pipeline.stores.neighbors import open_neighbors
from pipeline.stores.teacher import TeacherCache
from pipeline.teachers import create_teacher
from stages.cli import app
from stages.itm.run import ItmConfig, run_itm
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.teach.run import TeachConfig, run_teach
from tests.conftest import TINY_CLIP_CFG
from tests.test_teach import Interrupting as TeachInterrupting

K_NEIGHBORS = 5


@pytest.fixture(scope="module")
def blip():
    return create_teacher("blip_itm", config="tiny", seed=0)


def build_neighbors(root: Path, teacher, tmp_path: Path, k: int = K_NEIGHBORS) -> Path:
    """A tiny dual-stream teacher cache of the train split and its i2t neighbours."""
    run_teach(TeachConfig(dataset=str(root), splits=("train",), out_root=str(tmp_path / "caches"),
                          batch_size=8, rows_per_shard=8, rows_per_chunk=4,
                          summary_dir=str(tmp_path / "reports/teach")), "dual", teacher, progress=False)
    run_neighbors(NeighborsConfig(teacher="dual", k=k, directions=("i2t",), cache_root=str(tmp_path / "caches"),
                                  out_root=str(tmp_path / "nn"), rows_per_shard=8), "dual", progress=False)
    return tmp_path / "nn/dual/train.zarr"


def itm_cfg(root: Path, tmp_path: Path, **kw) -> ItmConfig:
    base = ItmConfig(dual="dual", single="blip", k=3, splits=("train",), dataset=str(root),
                     neighbors_root=str(tmp_path / "nn"), out_root=str(tmp_path / "itm"),
                     batch_size=7, device="cpu", rows_per_shard=8, summary_dir=str(tmp_path / "reports/itm"))
    return replace(base, **kw)


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def reference_scores(blip, split_root: Path, cand: np.ndarray) -> np.ndarray:
    """Every (image, candidate caption) pair scored alone, straight from the shards, float64."""
    samples = list(iter_samples(load_manifest(split_root), handler=SkipCounter()))
    by_text_id = {f"{s.sample_id}#{c}": cap for s in samples for c, cap in enumerate(s.captions)}
    text_ids = list(by_text_id)  # dict order: text rows, as the manifest numbers them
    out = np.full(cand.shape, np.nan)
    for i, sample in enumerate(samples):
        for c, j in enumerate(cand[i]):
            if j >= 0 and sample.image is not None:
                px = blip.preprocess(sample.image)[None]
                out[i, c] = float(blip.score_pairs(px, [by_text_id[text_ids[j]]])[0])
    return out


def test_scores_equal_pairwise_teacher_scores(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=19)
    nn_path = build_neighbors(root, tiny_teacher, tmp_path)
    summary = run_itm(itm_cfg(root, tmp_path), blip, progress=False)
    assert summary["units_computed"] == 3 and summary["pairs_scored"] == 19 * 3
    assert summary["forward_calls"] == 4 + 4 + 2  # units of 8, 8, 3 images; 2 images (6 pairs) a forward
    manifest = load_manifest(root / "train")
    scores = open_itm_scores(tmp_path / "itm/dual/train.zarr", expect_dataset=manifest.fingerprint)
    neighbours = open_neighbors(nn_path)["i2t_topk_idx"]
    np.testing.assert_array_equal(scores.cand_idx, neighbours[:, :3])
    assert scores.cand_idx.dtype == np.int32 and scores.cand_itm.dtype == np.float32
    ref = reference_scores(blip, root / "train", scores.cand_idx)
    np.testing.assert_allclose(scores.cand_itm, ref, atol=1e-5)
    assert scores.image_valid.all() and scores.k == 3 and np.std(scores.cand_itm) > 1e-3
    assert scores.single_teacher_fingerprint == fingerprint(blip.fingerprint())
    assert scores.source_teacher_fingerprint == TeacherCache.open(tmp_path / "caches/dual/train.zarr").teacher_fingerprint
    assert scores.attrs["single_teacher"]["teacher"] == "blip_itm"
    report = json.loads((tmp_path / "reports/itm/dual.json").read_text())
    assert report["rows"] == {"train": 19} and report["forward_calls"] == 10
    assert cache_info(tmp_path / "itm/dual/train.zarr")["arrays"]["i2t_cand_itm"]["shards"] == [8, 3]


def test_rerun_does_nothing_and_other_dataset_is_refused(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=10)
    build_neighbors(root, tiny_teacher, tmp_path)
    cfg = itm_cfg(root, tmp_path)
    first = run_itm(cfg, blip, progress=False)
    again = run_itm(cfg, blip, progress=False)
    assert first["forward_calls"] > 0 and not first["up_to_date"]
    assert again["up_to_date"] and again["forward_calls"] == 0 and again["units_computed"] == 0
    other = load_manifest(make_dataset(n_train=5, root=tmp_path / "other") / "train").fingerprint
    with pytest.raises(FingerprintMismatchError) as err:
        open_itm_scores(tmp_path / "itm/dual/train.zarr", expect_dataset=other)
    assert other in str(err.value) and load_manifest(root / "train").fingerprint in str(err.value)


def test_damaged_kept_output_is_rebuilt(make_dataset, tiny_teacher, blip, tmp_path):
    """A complete, current output that lost a shard file is not kept: it is rebuilt."""
    root = make_dataset(n_train=10)
    build_neighbors(root, tiny_teacher, tmp_path)
    cfg = itm_cfg(root, tmp_path)
    run_itm(cfg, blip, progress=False)
    store = tmp_path / "itm/dual/train.zarr"
    before = tree_digest(store)
    (store / "i2t_cand_itm/c/1/0").unlink()
    rebuilt = run_itm(cfg, blip, progress=False)
    assert not rebuilt["up_to_date"] and rebuilt["units_computed"] == 2
    assert tree_digest(store) == before and open_itm_scores(store).image_valid.all()


class Interrupting(TeachInterrupting):
    """The teach tests' wrapper, counting ITM scoring calls; ``nan`` returns Inf for one pair."""

    def score_candidates(self, pixels, texts):
        self._count()
        out = self.inner.score_candidates(pixels, texts).clone()
        if self.nan and self.forward_calls == 1:
            out[1] = float("inf")  # second candidate of the first image
        return out


def test_interrupted_run_resumes_only_unfinished_units(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=30)
    build_neighbors(root, tiny_teacher, tmp_path)
    full = run_itm(itm_cfg(root, tmp_path, out_root=str(tmp_path / "ref")), blip, progress=False)
    cfg = itm_cfg(root, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_itm(cfg, Interrupting(blip, budget=9), progress=False)  # 4 forwards per unit of 8
    assert not (tmp_path / "itm/dual").exists()  # nothing published half-done
    resumed = run_itm(cfg, blip, progress=False)
    assert resumed["units_resumed"] == 2 and resumed["units_computed"] == 2
    assert resumed["forward_calls"] == full["forward_calls"] - 8
    assert tree_digest(tmp_path / "itm/dual") == tree_digest(tmp_path / "ref/dual")
    assert not (tmp_path / "itm/.scratch").exists()


def test_k_larger_than_the_neighbours_is_refused(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=10)
    nn_path = build_neighbors(root, tiny_teacher, tmp_path)
    with pytest.raises(CacheError) as err:
        run_itm(itm_cfg(root, tmp_path, k=K_NEIGHBORS + 1), blip, progress=False)
    assert str(nn_path) in str(err.value)
    assert f"holds {K_NEIGHBORS} neighbours" in str(err.value) and f"itm.k is {K_NEIGHBORS + 1}" in str(err.value)


def test_nan_scores_are_refused_naming_the_image(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=10)
    build_neighbors(root, tiny_teacher, tmp_path)
    with pytest.raises(PipelineError, match=r"NaN/Inf for 1 image\(s\): train-000000.tar/s00000"):
        run_itm(itm_cfg(root, tmp_path), Interrupting(blip, 10**6, nan=True), progress=False)
    assert not (tmp_path / "itm/dual").exists()


def test_undecodable_image_row_is_invalid(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=12, corrupt={3})
    build_neighbors(root, tiny_teacher, tmp_path)
    summary = run_itm(itm_cfg(root, tmp_path), blip, progress=False)
    assert summary["skipped"]["train"][0]["id"] == "train-000000.tar/s00003"
    scores = open_itm_scores(tmp_path / "itm/dual/train.zarr")
    assert (scores.cand_idx[3] == -1).all() and np.isnan(scores.cand_itm[3]).all()
    assert not scores.image_valid[3] and np.delete(scores.image_valid, 3).all()
    assert np.isfinite(np.delete(scores.cand_itm, 3, axis=0)).all()
    assert (scores.cand_idx == -1).sum() == 3  # only the invalid row lacks candidates
    assert scores.attrs["skipped"][0]["id"] == "train-000000.tar/s00003"


@pytest.mark.parametrize("damage", ["i2t_cand_itm/c/1/0", "image_status/c/0", "incomplete"])
def test_damaged_or_incomplete_store_is_refused(make_dataset, tiny_teacher, blip, tmp_path, damage):
    root = make_dataset(n_train=12)
    build_neighbors(root, tiny_teacher, tmp_path)
    run_itm(itm_cfg(root, tmp_path), blip, progress=False)
    store = tmp_path / "itm/dual/train.zarr"
    if damage == "incomplete":
        group = zarr.open_group(str(store), mode="r+")
        group.attrs.update({"complete": False})
        match = "marked incomplete"
    else:
        (store / damage).unlink()  # a lost shard file would read back as fill values
        match = f"shard file {damage} is missing"
    with pytest.raises(CacheError, match=match):
        open_itm_scores(store)


def test_a_teacher_without_itm_head_is_refused(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=6)
    build_neighbors(root, tiny_teacher, tmp_path)
    with pytest.raises(PipelineError, match="no image-text matching head"):
        run_itm(itm_cfg(root, tmp_path), tiny_teacher, progress=False)


def test_captions_follow_the_cache_text_rows(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=17, per_shard=5)
    build_neighbors(root, tiny_teacher, tmp_path)
    manifest = load_manifest(root / "train")
    captions = load_captions(manifest)
    text_ids = TeacherCache.open(tmp_path / "caches/dual/train.zarr").text_ids.tolist()
    # independent lookup: each cached text id "shard/key#c" names sample shard/key's caption c
    by_sample = {s.sample_id: s.captions for s in iter_samples(manifest, decode_images=False)}
    expected = [by_sample[tid.rsplit("#", 1)[0]][int(tid.rsplit("#", 1)[1])] for tid in text_ids]
    assert captions == expected and len(captions) == manifest.n_texts == 34
    assert captions[:4] == ["a red circle", "circle number 0 in red", "a green circle", "circle number 1 in green"]


def test_cli_runs_the_stage_from_params(make_dataset, tiny_teacher, tmp_path):
    root = make_dataset(n_train=8)
    build_neighbors(root, tiny_teacher, tmp_path)
    cfg = itm_cfg(root, tmp_path)
    params = {"teachers": {"dual": {"teacher": "open_clip", "kwargs": {"model_cfg": TINY_CLIP_CFG}},
                           "blip": {"teacher": "blip_itm", "kwargs": {"config": "tiny", "seed": 0}}},
              "itm": {**{k: v for k, v in vars(cfg).items() if k not in ("dask", "devices")},
                      "splits": ["train"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["itm", "--params", str(tmp_path / "params.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dual"] == "dual" and summary["pairs_scored"] == 8 * 3 and summary["forward_calls"] == 4
    assert open_itm_scores(tmp_path / "itm/dual/train.zarr").cand_idx.shape == (8, 3)


class PairsOnly(torch.nn.Module):
    """A single-stream teacher offering only ``score_pairs`` (no per-image candidate scoring)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        if name == "score_candidates":
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_teacher_with_only_score_pairs_gives_the_same_scores(make_dataset, tiny_teacher, blip, tmp_path):
    root = make_dataset(n_train=9)
    build_neighbors(root, tiny_teacher, tmp_path)
    run_itm(itm_cfg(root, tmp_path), blip, progress=False)
    run_itm(itm_cfg(root, tmp_path, out_root=str(tmp_path / "pairs")), PairsOnly(blip), progress=False)
    a = open_itm_scores(tmp_path / "itm/dual/train.zarr")
    b = open_itm_scores(tmp_path / "pairs/dual/train.zarr")
    np.testing.assert_array_equal(a.cand_idx, b.cand_idx)
    np.testing.assert_allclose(a.cand_itm, b.cand_itm, atol=1e-5)


def test_a_second_writer_is_refused_by_the_output_lock(make_dataset, tiny_teacher, blip, tmp_path):
    import subprocess
    import sys

    from stages.lock import LockError

    root = make_dataset(n_train=6)
    build_neighbors(root, tiny_teacher, tmp_path)
    cfg = itm_cfg(root, tmp_path)
    out = Path(cfg.out_root) / "dual"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stages.lock import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            run_itm(cfg, blip, progress=False)
        assert not out.exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert run_itm(cfg, blip, progress=False)["units_computed"] == 1  # dead holder: taken over
