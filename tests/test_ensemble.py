"""Teacher ensembles: several cross-modal caches in ``train.caches``, combined per loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.errors import FingerprintMismatchError
from pipeline.losses import (DistillBatch, EnsembleTerm, LossTerm, build_objective,
                             teacher_similarity_logits)
from pipeline.losses.basic import SimilarityKL
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from tests.test_train import _cfg, toy  # noqa: F401 (fixture)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batch(members: list[tuple[np.ndarray, np.ndarray, float]], seed: int = 0) -> DistillBatch:
    rng = np.random.default_rng(seed)
    b = members[0][0].shape[0]
    student_i = torch.from_numpy(_unit(rng.standard_normal((b, 6))).astype(np.float32))
    student_t = torch.from_numpy(_unit(rng.standard_normal((b, 6))).astype(np.float32))
    images = tuple(torch.from_numpy(m[0].astype(np.float32)) for m in members)
    texts = tuple(torch.from_numpy(m[1].astype(np.float32)) for m in members)
    return DistillBatch(student_i, student_t, torch.tensor(12.0), images[0], texts[0], members[0][2],
                        torch.arange(b), torch.arange(b), ensemble_image_emb=images,
                        ensemble_text_emb=texts, ensemble_logit_scale=tuple(m[2] for m in members))


def _members(b: int = 5) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(1)
    return [(_unit(rng.standard_normal((b, d))), _unit(rng.standard_normal((b, d))), s)
            for d, s in ((4, 30.0), (7, 8.0), (3, 55.0))]


def _softmax64(row: list[float]) -> list[float]:
    top = max(row)
    e = [np.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def test_ensemble_target_is_the_average_of_each_teachers_softmax():
    members = _members()
    i2t, t2i = teacher_similarity_logits(_batch(members), None, "test")
    b = members[0][0].shape[0]
    expect_i2t = [[0.0] * b for _ in range(b)]
    expect_t2i = [[0.0] * b for _ in range(b)]
    for image, text, scale in members:  # float64, one row at a time
        for r in range(b):
            logits = [scale * float(np.dot(image[r].astype(np.float64), text[c])) for c in range(b)]
            back = [scale * float(np.dot(text[r].astype(np.float64), image[c])) for c in range(b)]
            for c, (p, q) in enumerate(zip(_softmax64(logits), _softmax64(back))):
                expect_i2t[r][c] += p / len(members)
                expect_t2i[r][c] += q / len(members)
    np.testing.assert_allclose(torch.softmax(i2t, -1).numpy(), expect_i2t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(torch.softmax(t2i, -1).numpy(), expect_t2i, rtol=1e-5, atol=1e-7)

    # similarity_kl: KL(average teacher distribution || student), both directions, by hand
    batch = _batch(members)
    s = (12.0 * batch.image_emb.double() @ batch.text_emb.double().T).numpy()
    def kl(p, logits):
        q = np.exp(logits - logits.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    expect = (kl(np.array(expect_i2t), s) + kl(np.array(expect_t2i), s.T)) / 2
    assert float(SimilarityKL()(batch)) == pytest.approx(expect, rel=1e-5)


def test_one_teacher_keeps_the_plain_logits():
    members = _members()[:1]
    batch = _batch(members)
    single = DistillBatch(batch.image_emb, batch.text_emb, batch.logit_scale, batch.teacher_image_emb,
                          batch.teacher_text_emb, 30.0, batch.image_rows, batch.text_rows)
    i2t, t2i = teacher_similarity_logits(single, None, "test")
    assert torch.equal(i2t, 30.0 * single.teacher_image_emb @ single.teacher_text_emb.T)
    assert torch.equal(t2i, i2t.T)


def test_feature_losses_get_one_head_per_teacher_and_average_their_terms():
    members = _members()
    dims = [{"image": m[0].shape[1], "text": m[0].shape[1]} for m in members]
    objective = build_objective([{"name": "feature"}, {"name": "similarity_kl"},
                                 {"name": "contrastive"}], 6, dims[0], ensemble_dims=dims)
    feature = objective.terms["feature"]
    assert isinstance(feature, EnsembleTerm) and len(feature.copies) == 3
    assert [c.proj["image"].out_features for c in feature.copies] == [4, 7, 3]
    assert not isinstance(objective.terms["similarity_kl"], EnsembleTerm)  # softmax-averaged
    assert not isinstance(objective.terms["contrastive"], EnsembleTerm)    # reads no teacher
    batch = _batch(members)
    expect = torch.stack([c(batch.member(i)) for i, c in enumerate(feature.copies)]).mean()
    one_by_one = [float(c(DistillBatch(batch.image_emb, batch.text_emb, batch.logit_scale,
                                       batch.ensemble_image_emb[i], batch.ensemble_text_emb[i],
                                       members[i][2], batch.image_rows, batch.text_rows)).detach())
                  for i, c in enumerate(feature.copies)]
    assert float(feature(batch)) == pytest.approx(float(expect)) == pytest.approx(np.mean(one_by_one))


def test_training_from_two_teachers_of_other_widths(toy, tmp_path):  # noqa: F811
    from stages.train.run import setup, train

    manifest = load_manifest(toy["dataset"] / "train")
    first = TeacherCache.open(toy["cache"])
    rng = np.random.default_rng(3)
    project = rng.standard_normal((first.image_emb.shape[1], 12)).astype(np.float32)
    second = write_cache_from_arrays(
        tmp_path / "second.zarr", image_ids=first.image_ids, text_ids=first.text_ids,
        text_to_image=first.text_to_image, teacher={"teacher": "second"},
        dataset_fingerprint=manifest.fingerprint, split="train", logit_scale=10.0,
        image_emb=_unit(first.image_emb @ project + 0.1), text_emb=_unit(first.text_emb @ project + 0.1),
        image_status=first.image_status)
    cfg = _cfg(toy, tmp_path / "run", caches=(str(toy["cache"]), str(second)), steps=4)
    run = setup(cfg)
    assert run.targets.ensemble and [m.dim for m in run.targets.members] == [8, 12]
    assert [c.proj["image"].out_features for c in run.objective.terms["feature"].copies] == [8, 12]
    summary = train(cfg, progress=False)
    assert summary["finished"] and np.isfinite(summary["final_metrics"]["loss"])
    assert summary["ensemble"] == [str(toy["cache"]), str(second)]
    assert set(summary["caches"]) == {str(toy["cache"]), str(second)}


def test_a_store_of_another_dataset_is_refused_in_the_ensemble(toy, tmp_path):  # noqa: F811
    from stages.train.run import train

    with pytest.raises(FingerprintMismatchError, match="dataset"):
        train(_cfg(toy, tmp_path / "run", caches=(str(toy["cache"]), str(toy["other"]))), progress=False)
