"""Distillation losses against independent float64 row-by-row computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import CacheError
from pipeline.losses import LOSSES, DistillBatch, LossTerm, build_objective, check_requirements
from pipeline.registry import UnknownNameError

B, DS, DT = 5, 6, 4


def _log_softmax_row(row: list[float]) -> list[float]:
    """log softmax of one row, by hand: x - max - log(sum(exp(x - max)))."""
    top = max(row)
    log_z = math.log(sum(math.exp(x - top) for x in row))
    return [x - top - log_z for x in row]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _logits(left: torch.Tensor, right: torch.Tensor, scale: float) -> list[list[float]]:
    rows, cols = left.double().tolist(), right.double().tolist()
    return [[scale * _dot(r, c) for c in cols] for r in rows]


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m)]


class TinyStudent(torch.nn.Module):
    """Two linear towers standing in for a student (the losses only see embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(3, DS)
        self.text = torch.nn.Linear(3, DS)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))


def _batch(student: TinyStudent, seed: int = 0, teacher_scale: float | None = 20.0) -> DistillBatch:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(student.image(torch.randn(B, 3, generator=gen)), dim=-1)
    txt = F.normalize(student.text(torch.randn(B, 3, generator=gen)), dim=-1)
    t_img = F.normalize(torch.randn(B, DT, generator=gen), dim=-1)
    t_txt = F.normalize(torch.randn(B, DT, generator=gen), dim=-1)
    return DistillBatch(img, txt, student.logit_scale.exp(), t_img, t_txt, teacher_scale,
                        torch.arange(B), torch.arange(B))


@pytest.fixture
def student() -> TinyStudent:
    torch.manual_seed(0)
    return TinyStudent()


def test_registered_losses():
    assert {"contrastive", "feature", "similarity_kl"} <= set(LOSSES.names())


def test_contrastive_matches_row_loop(student):
    batch = _batch(student)
    loss = LOSSES.create("contrastive")(batch)
    logits = _logits(batch.image_emb.detach(), batch.text_emb.detach(), 10.0)
    i2t = [-_log_softmax_row(row)[j] for j, row in enumerate(logits)]
    t2i = [-_log_softmax_row(row)[j] for j, row in enumerate(_transpose(logits))]
    expected = (sum(i2t) / B + sum(t2i) / B) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_clamps_logit_scale(student):
    batch = _batch(student)
    batch.logit_scale = torch.tensor(500.0)
    clamped = LOSSES.create("contrastive")(batch)
    batch.logit_scale = torch.tensor(100.0)
    assert clamped.item() == pytest.approx(LOSSES.create("contrastive")(batch).item())


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_feature_matches_row_loop(student, metric):
    batch = _batch(student)
    loss_fn = build_objective([{"name": "feature", "kwargs": {"metric": metric}}], DS,
                              {"image": DT, "text": DT}).terms["feature"]
    loss = loss_fn(batch)
    per_modality = []
    for m, s_emb, t_emb in (("image", batch.image_emb, batch.teacher_image_emb),
                            ("text", batch.text_emb, batch.teacher_text_emb)):
        w = loss_fn.proj[m].weight.double().tolist()
        bias = loss_fn.proj[m].bias.double().tolist()
        rows = []
        for s, t in zip(s_emb.double().tolist(), t_emb.double().tolist()):
            p = [_dot(w_k, s) + b_k for w_k, b_k in zip(w, bias)]
            if metric == "cosine":
                rows.append(1 - _dot(p, t) / math.sqrt(_dot(p, p) * _dot(t, t)))
            else:
                rows.append(sum((a - b) ** 2 for a, b in zip(p, t)) / DT)
        per_modality.append(sum(rows) / B)
    assert loss.item() == pytest.approx(sum(per_modality) / 2, rel=1e-5)


def _kl_rows(teacher: list[list[float]], student: list[list[float]]) -> float:
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        t_logp, s_logp = _log_softmax_row(t_row), _log_softmax_row(s_row)
        total += sum(math.exp(tp) * (tp - sp) for tp, sp in zip(t_logp, s_logp))
    return total / len(teacher)


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_similarity_kl_matches_row_loop(student, temperature):
    batch = _batch(student)
    loss = LOSSES.create("similarity_kl", teacher_temperature=temperature)(batch)
    t_scale = 20.0 if temperature is None else 1 / temperature
    teacher = _logits(batch.teacher_image_emb, batch.teacher_text_emb, t_scale)
    stud = _logits(batch.image_emb.detach(), batch.text_emb.detach(), 10.0)
    expected = (_kl_rows(teacher, stud) + _kl_rows(_transpose(teacher), _transpose(stud))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_similarity_kl_hand_worked_3x3():
    """Teacher logits ln2 * I give rows (1/2, 1/4, 1/4); orthogonal students give uniform rows.

    KL per row = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8), the same in both directions.
    """
    eye = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0]] * 3)
    text = torch.tensor([[0, 1.0, 0]] * 3)
    batch = DistillBatch(image, text, torch.tensor(7.0), eye, eye, math.log(2.0),
                         torch.arange(3), torch.arange(3))
    loss = LOSSES.create("similarity_kl")(batch)
    assert loss.item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6)


def test_gradients_reach_student_and_projection_not_teacher(student):
    batch = _batch(student)
    objective = build_objective(
        [{"name": "contrastive"}, {"name": "feature", "weight": 0.5},
         {"name": "similarity_kl", "weight": 2.0}], DS, {"image": DT, "text": DT})
    total, terms = objective(batch)
    expected = terms["contrastive"] + 0.5 * terms["feature"] + 2.0 * terms["similarity_kl"]
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    for p in list(student.parameters()) + list(objective.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for t in (batch.teacher_image_emb, batch.teacher_text_emb):
        assert not t.requires_grad and t.grad is None


def test_unknown_loss_lists_known():
    with pytest.raises(UnknownNameError, match="contrastive.*feature.*similarity_kl"):
        build_objective([LossTerm("nope")], DS)


def test_requires_check_names_field_and_stage():
    objective = build_objective([{"name": "feature", "kwargs": {"modalities": ["text"]}}],
                                DS, {"image": DT})
    assert objective.requires == {"text_emb"}
    with pytest.raises(CacheError, match=r"'text_emb'.*stage `teach`"):
        check_requirements(objective, {"image_emb"}, ["caches/vision.zarr"])
    check_requirements(objective, {"text_emb"})


def test_repeated_loss_names_get_suffixes():
    objective = build_objective([{"name": "contrastive"}, {"name": "contrastive", "weight": 2}], DS)
    assert list(objective.terms) == ["contrastive", "contrastive_2"]
