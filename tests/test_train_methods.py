"""Training with every kind of input the paper recipes read: role teachers, neighbours and
candidates, ITM scores, student levels, a balancer and hard-negative batches."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.manifest import load_manifest
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError
from pipeline.losses import LossTerm
from pipeline.stores.neighbors import open_neighbors
from pipeline.teachers import create_teacher
from stages.itm.run import ItmConfig, run_itm
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.train.run import TrainConfig, train
from tests.test_train import TINY_STUDENT, _samples, write_cache

# Two blocks per tower: one intermediate level each, for the multi-scale losses.
LEVEL_STUDENT = {**TINY_STUDENT, "vision_layers": 2, "text_layers": 2}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    write_shards(_samples(), root / "data" / "train", "train", max_samples_per_shard=12)
    manifest = write_manifest(root / "data" / "train")
    caches = root / "caches"
    out = {"root": root, "dataset": root / "data",
           "cross": write_cache(caches / "cross" / "train.zarr", manifest),
           "vision": write_cache(caches / "vision" / "train.zarr", manifest, ("image",), teacher="v",
                                  noise=0.5),
           "text": write_cache(caches / "text" / "train.zarr", manifest, ("text",), teacher="t",
                                noise=0.5),
           "single": write_cache(caches / "single" / "train.zarr", manifest, teacher="s")}
    run_neighbors(NeighborsConfig(teacher="cross", k=12, cache_root=str(caches),
                                  out_root=str(caches / "nn")), "cross", progress=False)
    out["neighbors"] = caches / "nn" / "cross" / "train.zarr"
    itm = ItmConfig(dual="cross", k=11, dataset=str(root / "data"), neighbors_root=str(caches / "nn"),
                    out_root=str(caches / "itm"), summary_dir=str(root / "reports"), device="cpu")
    run_itm(itm, create_teacher("blip_itm", config="tiny", seed=0), progress=False)
    out["itm"] = caches / "itm" / "cross" / "train.zarr"
    return out


ALL_TERMS = (LossTerm("contrastive"), LossTerm("dsmd_feature"), LossTerm("dsmd_hard_negative"),
             LossTerm("sard_representation"), LossTerm("sard_relational"),
             LossTerm("mcad_feature"), LossTerm("mcad_candidates"), LossTerm("epmvg"),
             LossTerm("icl"))


def _cfg(stores, out: Path, **overrides) -> TrainConfig:
    base = dict(student_kwargs=LEVEL_STUDENT, dataset=str(stores["dataset"]),
                caches=(str(stores["cross"]),), vision_teacher=str(stores["vision"]),
                text_teacher=str(stores["text"]), single_stream_teacher=str(stores["single"]),
                neighbors=str(stores["neighbors"]), itm_scores=str(stores["itm"]), out_dir=str(out), batch_size=8, steps=6,
                lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=2, device="cpu",
                losses=ALL_TERMS, balancer="dsmd", hard_negative_fraction=0.5)
    base.update(overrides)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_every_input_reaches_the_losses_and_resume_is_exact(stores, tmp_path):
    straight = train(_cfg(stores, tmp_path / "a"), progress=False)
    assert straight["finished"] and straight["teacher_forward_calls"] == 0
    sampler = straight["hard_negative_batches"]
    assert sampler["nearest_neighbour_in_batch"] > 1.5 * sampler["by_chance"]  # 0.41 vs 0.23
    log = _log(tmp_path / "a")
    weights = [c for c in log[0] if c.startswith("w_")]
    assert len(weights) == len(ALL_TERMS)
    lam = [c for c in log[0] if c.startswith("lambda_")]
    assert lam and len({r[lam[0]] for r in log}) > 1            # the learned fusion moves
    assert all(np.isfinite(float(r["loss"])) for r in log)
    # interrupted after step 3 (checkpoint at 2), resumed: bit-identical weights and log
    train(_cfg(stores, tmp_path / "b"), progress=False, stop_after=3)
    resumed = train(_cfg(stores, tmp_path / "b"), progress=False)
    assert resumed["resumed_from"] == 2
    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log] == [r["loss"] for r in _log(tmp_path / "b")]
    assert [r[weights[0]] for r in log] == [r[weights[0]] for r in _log(tmp_path / "b")]


def test_candidates_need_the_neighbours_store(stores, tmp_path):
    cfg = _cfg(stores, tmp_path / "c", neighbors=None, itm_scores=None, hard_negative_fraction=0.0,
               losses=(LossTerm("dsmd_hard_negative"),))
    with pytest.raises(CacheError, match="i2t_topk_idx.*stage `neighbors`"):
        train(cfg, progress=False)


def test_itm_scores_of_other_candidates_are_refused(stores, tmp_path):
    """ITM scores are only valid for the candidates they scored: a neighbours store of the same
    teacher fingerprint but other embeddings (so other candidates) is refused with them."""
    other_root = tmp_path / "caches"
    write_cache(other_root / "cross" / "train.zarr", load_manifest(stores["dataset"] / "train"),
                noise=0.5)
    run_neighbors(NeighborsConfig(teacher="cross", k=12, directions=("i2t",),
                                  cache_root=str(other_root), out_root=str(other_root / "nn")),
                  "cross", progress=False)
    other = other_root / "nn" / "cross" / "train.zarr"
    assert not np.array_equal(open_neighbors(other)["i2t_topk_idx"][:, :11],
                              open_neighbors(stores["neighbors"])["i2t_topk_idx"][:, :11])
    with pytest.raises(CacheError, match="not the first 11 neighbours"):
        train(_cfg(stores, tmp_path / "e", neighbors=str(other)), progress=False)
    # without the ITM scores, an i2t-only store still drives the hard-negative sampler
    summary = train(_cfg(stores, tmp_path / "f", neighbors=str(other), itm_scores=None, steps=1,
                         losses=(LossTerm("contrastive"),)), progress=False)
    assert summary["finished"]


def test_hard_negative_batches_need_neighbours(stores, tmp_path):
    cfg = _cfg(stores, tmp_path / "d", neighbors=None, itm_scores=None,
               losses=(LossTerm("contrastive"),))
    with pytest.raises(CacheError, match="hard_negative_fraction > 0 needs neighbours"):
        train(cfg, progress=False)
