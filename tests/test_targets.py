"""Training inputs beyond one cache: role stores, neighbours, recipes and random-access reads."""
from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import RandomAccess, iter_samples
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError, ConfigError, FingerprintMismatchError, ShardError
from pipeline.training.targets import TargetSources, open_targets
from stages.neighbors.run import NeighborsConfig, run_neighbors
from stages.train.run import load_train_config
from tests.test_train import TEACHER_DIM, _samples, write_cache


@pytest.fixture
def split(tmp_path):
    root = tmp_path / "data" / "train"
    write_shards(_samples(), root, "train", 9)
    return load_manifest(write_manifest(root).root)


def test_random_access_reads_what_the_stream_reads(split):
    streamed = {s.sample_id: s for s in iter_samples(split, handler=lambda e: True)}
    ids = list(streamed)
    random.Random(0).shuffle(ids)
    reader = RandomAccess(split, handler=lambda e: True)
    try:
        for sid in ids:
            got, want = reader.read(sid), streamed[sid]
            assert (got.captions, got.label, got.error) == (want.captions, want.label, want.error)
            if want.image is not None:
                assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
        with pytest.raises(ShardError, match="train-000000.tar: no sample with key 'nope'"):
            reader.read("train-000000.tar/nope")
    finally:
        reader.close()


def _role_caches(tmp_path, split):
    cross = write_cache(tmp_path / "cross" / "train.zarr", split)
    vision = write_cache(tmp_path / "vision" / "train.zarr", split, modalities=("image",),
                         teacher="toy-vision")
    text = write_cache(tmp_path / "text" / "train.zarr", split, modalities=("text",),
                       teacher="toy-text")
    return cross, vision, text


def test_role_stores_are_merged_and_checked(tmp_path, split):
    cross, vision, text = _role_caches(tmp_path, split)
    sources = TargetSources((str(cross),), vision_teacher=str(vision), text_teacher=str(text))
    targets = open_targets([str(cross)], split, sources)
    assert targets.dims == {"image": TEACHER_DIM, "text": TEACHER_DIM,
                            "vision_teacher": TEACHER_DIM, "text_teacher": TEACHER_DIM}
    assert {"vision_teacher_emb", "text_teacher_emb"} <= targets.available
    assert targets.role_emb["vision_teacher_emb"].shape == targets.image_emb.shape
    # a text-only cache cannot serve as the vision teacher
    bad = TargetSources((str(cross),), vision_teacher=str(text))
    with pytest.raises(CacheError, match="train.vision_teacher .* has no image embeddings"):
        open_targets([str(cross)], split, bad)
    other = write_cache(tmp_path / "other" / "train.zarr", split, modalities=("image",),
                        dataset_fp="sha256:" + "0" * 64)
    with pytest.raises(FingerprintMismatchError, match="dataset fingerprint mismatch"):
        open_targets([str(cross)], split, TargetSources((str(cross),), vision_teacher=str(other)))


def test_neighbours_of_another_teacher_are_refused(tmp_path, split):
    cross, vision, _ = _role_caches(tmp_path, split)
    run_neighbors(NeighborsConfig(teacher="vision", k=4, cache_root=str(tmp_path),
                                  out_root=str(tmp_path / "nn")), "vision", progress=False)
    store = str(tmp_path / "nn" / "vision" / "train.zarr")
    with pytest.raises(FingerprintMismatchError) as err:
        open_targets([str(cross)], split, TargetSources((str(cross),), neighbors=store))
    assert "teacher fingerprint mismatch" in str(err.value)
    run_neighbors(NeighborsConfig(teacher="cross", k=4, cache_root=str(tmp_path),
                                  out_root=str(tmp_path / "nn")), "cross", progress=False)
    good = str(tmp_path / "nn" / "cross" / "train.zarr")
    targets = open_targets([str(cross)], split, TargetSources((str(cross),), neighbors=good))
    assert targets.topk["i2t_topk_idx"].shape == (split.n_images, 4)
    assert "i2t_topk_idx" in targets.available


def test_recipe_replaces_train_keys_and_unknown_recipes_are_listed():
    params = {"train": {"recipe": "hard", "epochs": 2, "losses": [{"name": "feature"}]},
              "recipes": {"hard": {"description": "x", "losses": [{"name": "contrastive"}],
                                   "hard_negative_fraction": 0.5},
                          "plain": {"losses": [{"name": "contrastive"}]}}}
    cfg = load_train_config(params)
    assert [t.name for t in cfg.losses] == ["contrastive"]
    assert (cfg.hard_negative_fraction, cfg.epochs, cfg.recipe) == (0.5, 2, "hard")
    params["train"]["recipe"] = "nope"
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known: hard, plain"):
        load_train_config(params)
    params["train"]["recipe"] = "plain"
    params["recipes"]["plain"]["lr"] = 1.0  # recipes hold method keys only
    with pytest.raises(ConfigError, match=r"recipes.plain: unknown key\(s\) \['lr'\]"):
        load_train_config(params)


@pytest.mark.parametrize("workers", [0, 2])
def test_planned_stream_yields_the_planned_order(tmp_path, split, workers):
    from pipeline.students import TrainAugment
    from pipeline.training.loader import LoaderState, PlannedStream, SkipEvent, iter_batches

    cache = write_cache(tmp_path / "cross" / "train.zarr", split)
    targets = open_targets([str(cache)], split)
    invalid = np.flatnonzero(~targets.image_valid)
    rest = np.random.default_rng(0).permutation(np.flatnonzero(targets.image_valid))[:23]
    order = np.concatenate([rest[:3], invalid, rest[3:]])  # a skip inside the first batch
    make = lambda e: PlannedStream(split, targets, TrainAugment(16), order, seed=0,  # noqa: E731
                                   epoch=e, on_bad_image="skip")
    batches = iter_batches(make, 4, workers, LoaderState())
    seen, skipped = [], []
    while True:
        items, state, skips = next(batches)
        if state.epoch > 0:  # the epoch's last partial batch was dropped
            break
        seen += [it.image_row for it in items]
        skipped += [targets.image_rows[s.sample_id] for s in skips if isinstance(s, SkipEvent)]
    batches.close()
    valid = [int(r) for r in order if targets.image_valid[r]]
    assert len(invalid) and skipped == invalid.tolist()
    assert seen == valid[:len(valid) // 4 * 4]


def test_every_recipe_of_params_yaml_builds_and_fits_the_demo_stores():
    """A recipe with a typo or a need the demo's stores cannot meet fails here, not in `dvc exp`."""
    import yaml

    from pipeline.losses import build_objective, check_requirements
    from pipeline.students import create_student
    from tests.test_train import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    fields = {"image_emb", "text_emb", "vision_teacher_emb", "text_teacher_emb", "single_image_emb",
              "single_text_emb", "i2t_topk_idx", "i2t_cand_itm"}
    dims = {"image": 384, "text": 384, "vision_teacher": 1280, "text_teacher": 384,
            "single_image": 16, "single_text": 16}
    student = create_student(params["train"]["student"], **params["train"]["student_kwargs"])
    assert params["train"]["recipe"] in params["recipes"]
    for name in params["recipes"]:
        cfg = load_train_config({**params, "train": {**params["train"], "recipe": name}})
        objective = build_objective(cfg.losses, student.embed_dim, dims,
                                    level_dims=student.level_dims(), balancer=cfg.balancer,
                                    balancer_kwargs=cfg.balancer_kwargs)
        check_requirements(objective, fields, neighbor_k=params["neighbors"]["k"],
                           itm_k=params["itm"]["k"])
