"""The losses of CLIP-KD, DSMD, structure-aware distillation, MCAD and EpmVG against independent
float64 loop implementations (or hand-worked examples), their gradients and requirements."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import CacheError
from pipeline.losses import (BALANCERS, LOSSES, DistillBatch, SimilarityKL, build_objective,
                             check_requirements)
from pipeline.registry import UnknownNameError

B, DS, DT, DV, DL, DQ, K, K_ITM = 5, 6, 4, 7, 5, 3, 6, 4
LEVEL_DIMS = {"image": [3, 5], "text": [4, 2]}
TEACHER_DIMS = {"image": DT, "text": DT, "vision_teacher": DV, "text_teacher": DL,
                "single_image": DQ, "single_text": DQ}
TEACHER_SCALE = 20.0
STUDENT_SCALE = 10.0


# ---------------------------------------------------------------- plain-python float64 helpers
def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit(v):
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def _linear(layer: torch.nn.Linear, x):
    w, b = layer.weight.double().tolist(), layer.bias.double().tolist()
    return [_dot(row, x) + bias for row, bias in zip(w, b)]


def _rows(t: torch.Tensor):
    return t.detach().double().tolist()


def _log_softmax(row):
    top = max(row)
    log_z = math.log(sum(math.exp(x - top) for x in row))
    return [x - top - log_z for x in row]


def _ce(row, target):
    return -_log_softmax(row)[target]


def _kl(teacher_row, student_row):
    """KL(softmax(teacher) || softmax(student)) over the given entries only."""
    tp, sp = _log_softmax(teacher_row), _log_softmax(student_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(tp, sp))


def _info_nce(anchor, other, scale):
    """Symmetric InfoNCE by loops: mean of row-wise and column-wise cross-entropies."""
    logits = [[scale * _dot(a, o) for o in other] for a in anchor]
    rows = sum(_ce(r, i) for i, r in enumerate(logits)) / len(anchor)
    cols = sum(_ce([logits[j][i] for j in range(len(anchor))], i)
               for i in range(len(anchor))) / len(anchor)
    return (rows + cols) / 2


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- batch
@dataclass
class Leaves:
    """The student-side leaf tensors a batch is computed from (gradients land here)."""

    image: torch.Tensor
    text: torch.Tensor
    image_levels: list[torch.Tensor]
    text_levels: list[torch.Tensor]
    cand: torch.Tensor


def _make(seed: int = 0, image_rows: list[int] | None = None) -> tuple[DistillBatch, Leaves]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).requires_grad_(grad)

    leaves = Leaves(rand(B, DS, grad=True), rand(B, DS, grad=True),
                    [rand(B, d, grad=True) for d in LEVEL_DIMS["image"]],
                    [rand(B, d, grad=True) for d in LEVEL_DIMS["text"]],
                    rand(B, K, DS, grad=True))
    unit = lambda t: F.normalize(t, dim=-1)  # noqa: E731
    valid = torch.rand(B, K, generator=gen) > 0.2
    valid[:, 0] = True
    positive = torch.zeros(B, K, dtype=torch.bool)
    positive[0, 0] = positive[2, 1] = positive[3, 0] = True
    rows = torch.tensor(image_rows if image_rows is not None else list(range(B)))
    batch = DistillBatch(
        unit(leaves.image), unit(leaves.text), torch.tensor(STUDENT_SCALE),
        unit(rand(B, DT)), unit(rand(B, DT)), TEACHER_SCALE, rows, torch.arange(B),
        image_levels=tuple(leaves.image_levels), text_levels=tuple(leaves.text_levels),
        vision_teacher_emb=unit(rand(B, DV)), text_teacher_emb=unit(rand(B, DL)),
        single_image_emb=rand(B, DQ), single_text_emb=rand(B, DQ),
        cand_text_emb=unit(leaves.cand), cand_teacher_sim=torch.rand(B, K, generator=gen) * 2 - 1,
        cand_is_positive=positive, cand_valid=valid, cand_itm=rand(B, K_ITM) * 3)
    return batch, leaves


def _build(name: str, **kwargs):
    torch.manual_seed(1)
    objective = build_objective([{"name": name, "kwargs": kwargs}], DS, TEACHER_DIMS,
                                level_dims=LEVEL_DIMS)
    return objective.terms[name]


@pytest.fixture
def batch() -> DistillBatch:
    return _make()[0]


# ---------------------------------------------------------------- CLIP-KD
def test_fd_matches_loop(batch):
    loss = _build("fd")
    expected = _mean(
        sum(sum((p - t) ** 2 for p, t in zip(_linear(loss.proj[m], s), t_row))
            for m, s, t_row in (("image", si, ti), ("text", st, tt)))
        for si, ti, st, tt in zip(_rows(batch.image_emb), _rows(batch.teacher_image_emb),
                                  _rows(batch.text_emb), _rows(batch.teacher_text_emb)))
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_icl_matches_loop(batch, temperature):
    loss = _build("icl", temperature=temperature)
    scale = STUDENT_SCALE if temperature is None else 1 / temperature
    u = [_unit(_linear(loss.proj["image"], r)) for r in _rows(batch.image_emb)]
    v = [_unit(_linear(loss.proj["text"], r)) for r in _rows(batch.text_emb)]
    t_img, t_txt = _rows(batch.teacher_image_emb), _rows(batch.teacher_text_emb)
    i2t = _mean(_ce([scale * _dot(u[k], t) for t in t_txt], k) for k in range(B))
    t2i = _mean(_ce([scale * _dot(v[k], t) for t in t_img], k) for k in range(B))
    assert loss(batch).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_crd_is_the_similarity_kl_loss(batch):
    crd, skl = LOSSES.create("crd"), LOSSES.create("similarity_kl")
    assert isinstance(crd, SimilarityKL)
    assert crd(batch).item() == pytest.approx(skl(batch).item())


# ---------------------------------------------------------------- DSMD
def _level_features(loss, batch, level, modality, project):
    if level == "final":
        raw = _rows(batch.image_emb if modality == "image" else batch.text_emb)
        key = f"{modality}_final"
    else:
        raw = _rows((batch.image_levels if modality == "image" else batch.text_levels)[level])
        key = f"{modality}_level{level}"
    if level == "final" and not project:
        return raw
    return [_unit(_linear(loss.heads[key], r)) for r in raw]


def test_dsmd_contrastive_matches_loop(batch):
    loss = _build("dsmd_contrastive", temperature=0.2)
    teachers = {"image": _rows(batch.teacher_image_emb), "text": _rows(batch.teacher_text_emb)}
    expected = _mean(_mean(_info_nce(_level_features(loss, batch, lv, m, True), teachers[m], 5.0)
                           for m in ("image", "text")) for lv in ("final", -1))
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


def test_dsmd_feature_matches_loop_at_three_levels(batch):
    loss = _build("dsmd_feature", levels=["final", 0, 1])
    teachers = {"image": _rows(batch.teacher_image_emb), "text": _rows(batch.teacher_text_emb)}
    per_level = []
    for lv in ("final", 0, 1):
        per_mod = []
        for m in ("image", "text"):
            feats = _level_features(loss, batch, lv, m, True)
            per_mod.append(_mean(sum((a - b) ** 2 for a, b in zip(f, t))
                                 for f, t in zip(feats, teachers[m])))
        per_level.append(_mean(per_mod))
    assert loss(batch).item() == pytest.approx(_mean(per_level), rel=1e-5)


def test_dsmd_similarity_matches_loop(batch):
    loss = _build("dsmd_similarity")
    t_img, t_txt = _rows(batch.teacher_image_emb), _rows(batch.teacher_text_emb)
    teacher = [[TEACHER_SCALE * _dot(a, b) for b in t_txt] for a in t_img]
    per_level = []
    for lv in ("final", -1):
        u = _level_features(loss, batch, lv, "image", False)
        v = _level_features(loss, batch, lv, "text", False)
        student = [[STUDENT_SCALE * _dot(a, b) for b in v] for a in u]
        i2t = _mean(_kl(teacher[i], student[i]) for i in range(B))
        t2i = _mean(_kl([r[i] for r in teacher], [r[i] for r in student]) for i in range(B))
        per_level.append((i2t + t2i) / 2)
    assert loss(batch).item() == pytest.approx(_mean(per_level), rel=1e-5)


def _hard_negative_final(batch, negatives, candidates):
    """Loop version: walk the candidates in rank order, keep the first valid non-positives."""
    img, txt = _rows(batch.image_emb), _rows(batch.text_emb)
    t_img, t_txt = _rows(batch.teacher_image_emb), _rows(batch.teacher_text_emb)
    cand, sim = batch.cand_text_emb.detach().double().tolist(), _rows(batch.cand_teacher_sim)
    total = 0.0
    for i in range(B):
        t_row, s_row = [_dot(t_img[i], t_txt[i])], [_dot(img[i], txt[i])]
        for k in range(candidates):
            if len(t_row) == negatives + 1:
                break
            if bool(batch.cand_valid[i, k]) and not bool(batch.cand_is_positive[i, k]):
                t_row.append(sim[i][k])
                s_row.append(_dot(img[i], cand[i][k]))
        total += _kl([TEACHER_SCALE * x for x in t_row], [STUDENT_SCALE * x for x in s_row])
    return total / B


def _hard_negative_in_batch(u, v, batch, negatives):
    """Loop version: per anchor, the captions of other images sorted by teacher similarity."""
    t_img, t_txt = _rows(batch.teacher_image_emb), _rows(batch.teacher_text_emb)
    rows = batch.image_rows.tolist()
    total = 0.0
    for i in range(B):
        others = [j for j in range(B) if rows[j] != rows[i]]
        others.sort(key=lambda j: -_dot(t_img[i], t_txt[j]))
        chosen = [i] + others[:negatives]
        total += _kl([TEACHER_SCALE * _dot(t_img[i], t_txt[j]) for j in chosen],
                     [STUDENT_SCALE * _dot(u[i], v[j]) for j in chosen])
    return total / B


@pytest.mark.parametrize("negatives,candidates", [(2, 6), (3, 4)])
def test_dsmd_hard_negative_final_uses_cached_candidates(batch, negatives, candidates):
    loss = _build("dsmd_hard_negative", levels=["final"], negatives=negatives,
                  candidates=candidates)
    assert loss.candidates == candidates and "i2t_topk_idx" in loss.requires
    expected = _hard_negative_final(batch, negatives, candidates)
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("image_rows", [None, [0, 1, 0, 2, 3]])
def test_dsmd_hard_negative_levels_use_in_batch_negatives(image_rows):
    batch = _make(image_rows=image_rows)[0]
    loss = _build("dsmd_hard_negative", levels=[-1, 0], negatives=2)
    assert loss.candidates == 0 and "i2t_topk_idx" not in loss.requires and loss.uses_levels
    expected = _mean(_hard_negative_in_batch(_level_features(loss, batch, lv, "image", True),
                                             _level_features(loss, batch, lv, "text", True),
                                             batch, 2) for lv in (-1, 0))
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


def test_dsmd_hard_negative_hand_worked():
    """One anchor, candidates [positive, negative, invalid, negative], negatives=1.

    The target is over [own caption, first negative]: teacher logits ln3 * (1, 0) give (3/4, 1/4);
    the student scores (0, 0) give (1/2, 1/2); KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    """
    e = torch.eye(2)
    batch = DistillBatch(
        e[:1], e[1:], torch.tensor(1.0), e[:1], e[:1], math.log(3.0), torch.arange(1),
        torch.arange(1), cand_text_emb=torch.stack([e[0], e[1], e[0], e[0]])[None],
        cand_teacher_sim=torch.tensor([[0.9, 0.0, 5.0, 0.7]]),
        cand_is_positive=torch.tensor([[True, False, False, False]]),
        cand_valid=torch.tensor([[True, True, False, True]]))
    loss = LOSSES.create("dsmd_hard_negative", student_dim=2, teacher_dims={"image": 2, "text": 2},
                         levels=["final"], negatives=1, candidates=4)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert loss(batch).item() == pytest.approx(expected, rel=1e-6)


def test_dsmd_levels_need_a_student_that_exposes_them():
    with pytest.raises(ValueError, match="level -1 needs the student's intermediate image"):
        build_objective([{"name": "dsmd_feature"}], DS, TEACHER_DIMS)
    with pytest.raises(ValueError, match="level 5 needs"):
        build_objective([{"name": "dsmd_feature", "kwargs": {"levels": [5]}}], DS, TEACHER_DIMS,
                        level_dims=LEVEL_DIMS)
    objective = build_objective([{"name": "dsmd_feature", "kwargs": {"levels": ["final"]}}],
                                DS, TEACHER_DIMS)
    assert not objective.uses_levels


def test_level_features_missing_from_batch_is_a_clear_error(batch):
    loss = _build("dsmd_feature")
    batch.image_levels = ()
    with pytest.raises(CacheError, match="image_levels"):
        loss(batch)


# ---------------------------------------------------------------- structure-aware (SARD)
@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("image_rows", [None, [0, 1, 0, 2, 3]])
def test_sard_matching_matches_loop(hardest, image_rows):
    batch = _make(image_rows=image_rows)[0]
    loss = LOSSES.create("sard_matching", margin=0.3, hardest=hardest)
    img, txt, rows = _rows(batch.image_emb), _rows(batch.text_emb), batch.image_rows.tolist()
    reduce = max if hardest else sum
    total = 0.0
    for i in range(B):
        pos = _dot(img[i], txt[i])
        neg = [j for j in range(B) if rows[j] != rows[i]]
        total += reduce([max(0.0, 0.3 - pos + _dot(img[i], txt[j])) for j in neg] or [0.0])
        total += reduce([max(0.0, 0.3 - pos + _dot(img[j], txt[i])) for j in neg] or [0.0])
    assert loss(batch).item() == pytest.approx(total / B, rel=1e-5)


def test_sard_matching_warmup_sums_then_takes_the_hardest():
    """The first warmup_steps training steps equal hardest=False, later ones hardest=True;
    evaluation calls do not advance the count, and the count survives a state_dict round trip."""
    batch = _make()[0]
    summed = LOSSES.create("sard_matching", hardest=False)(batch).item()
    hardest = LOSSES.create("sard_matching", hardest=True)(batch).item()
    assert summed > hardest  # the two modes differ on this batch, so the check can fail
    loss = LOSSES.create("sard_matching", warmup_steps=2).train()
    assert loss.logged() == {"warmup": 1.0}
    assert [loss(batch).item() for _ in range(2)] == pytest.approx([summed, summed])
    loss.eval()
    assert loss(batch).item() == pytest.approx(hardest)  # step 2 reached: past the warm-up
    restored = LOSSES.create("sard_matching", warmup_steps=2)
    restored.load_state_dict(loss.state_dict())
    assert int(restored.steps) == 2 and not restored.in_warmup and restored.logged() == {"warmup": 0.0}
    with pytest.raises(ValueError, match="warmup_steps"):
        LOSSES.create("sard_matching", warmup_steps=-1)


def test_sard_matching_hand_worked_3x3():
    """Orthogonal images, texts rotated by one: S_ii = 0, one negative per row/column at 1.

    Every anchor's hardest hinge is 0.2 - 0 + 1 = 1.2, in both directions: L = 2.4.
    """
    e = torch.eye(3)
    batch = DistillBatch(e, e[[1, 2, 0]], torch.tensor(1.0), None, None, None, torch.arange(3),
                         torch.arange(3))
    assert LOSSES.create("sard_matching")(batch).item() == pytest.approx(2.4)


def test_sard_representation_matches_loop(batch):
    loss = _build("sard_representation", temperature=0.5)
    expected = _mean([
        _info_nce([_unit(_linear(loss.proj["image"], r)) for r in _rows(batch.image_emb)],
                  _rows(batch.vision_teacher_emb), 2.0),
        _info_nce([_unit(_linear(loss.proj["text"], r)) for r in _rows(batch.text_emb)],
                  _rows(batch.text_teacher_emb), 2.0)])
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


def test_sard_relational_matches_loop(batch):
    loss = _build("sard_relational", init_lambda=0.3)
    lam = 0.3
    vis, txt_t = _rows(batch.vision_teacher_emb), _rows(batch.text_teacher_emb)
    x, y = _rows(batch.image_emb), _rows(batch.text_emb)
    target = [[lam * _dot(vis[i], vis[j]) + (1 - lam) * _dot(txt_t[i], txt_t[j])
               for j in range(B)] for i in range(B)]
    per_relation = []
    for left, right in ((x, x), (y, y), (x, y)):
        per_relation.append(_mean(abs(_dot(left[i], right[j]) - target[i][j])
                                  for i in range(B) for j in range(B)))
    assert loss(batch).item() == pytest.approx(_mean(per_relation), rel=1e-5)
    assert loss.logged() == {"lambda": pytest.approx(0.3)}


def test_sard_lambda_is_learned_and_stays_in_unit_interval():
    """The student's relations follow the vision teacher: λ must move towards 1."""
    batch = _make()[0]
    vision = batch.vision_teacher_emb
    batch.image_emb = batch.text_emb = vision[:, :DS] / vision[:, :DS].norm(dim=-1, keepdim=True)
    batch.vision_teacher_emb = batch.image_emb
    loss = _build("sard_relational", relations=["image"])
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.1)
    start = loss.logged()["lambda"]
    for _ in range(20):
        optimizer.zero_grad()
        loss(batch).backward()
        optimizer.step()
    end = loss.logged()["lambda"]
    assert start == pytest.approx(0.5) and 0.8 < end < 1.0


# ---------------------------------------------------------------- MCAD
def _masked_softmax(row, mask):
    kept = [x for x, keep in zip(row, mask) if keep]
    top = max(kept)
    z = sum(math.exp(x - top) for x in kept)
    return [math.exp(x - top) / z if keep else 0.0 for x, keep in zip(row, mask)]


@pytest.mark.parametrize("itm_weight", [0.0, 0.3, 1.0])
def test_mcad_candidates_matches_loop(batch, itm_weight):
    loss = _build("mcad_candidates", candidates=K_ITM, itm_weight=itm_weight, itm_temperature=2.0)
    assert loss.candidates == loss.itm_candidates == K_ITM
    img, cand = _rows(batch.image_emb), batch.cand_text_emb.detach().double().tolist()
    total = 0.0
    for i in range(B):
        mask = [bool(v) for v in batch.cand_valid[i, :K_ITM]]
        sims = _rows(batch.cand_teacher_sim)[i][:K_ITM]
        dual = _masked_softmax([TEACHER_SCALE * s for s in sims], mask)
        itm = _masked_softmax([s / 2.0 for s in _rows(batch.cand_itm)[i]], mask)
        target = [itm_weight * a + (1 - itm_weight) * b for a, b in zip(itm, dual)]
        student = _masked_softmax([STUDENT_SCALE * _dot(img[i], c) for c in cand[i][:K_ITM]], mask)
        total += sum(p * math.log(p / q) for p, q, keep in zip(target, student, mask)
                     if keep and p > 0)
    assert loss(batch).item() == pytest.approx(total / B, rel=1e-5)


def _integration(module, dual, single):
    gate = [1 / (1 + math.exp(-g)) for g in _linear(module.gate, dual + single)]
    a, b = _linear(module.dual, dual), _linear(module.single, single)
    return [g * x + (1 - g) * y for g, x, y in zip(gate, a, b)]


def test_mcad_feature_matches_loop(batch):
    loss = _build("mcad_feature", fused_dim=5, module_weight=0.5, fusion_temperature=0.25)
    student = {"image": _rows(batch.image_emb), "text": _rows(batch.text_emb)}
    dual = {"image": _rows(batch.teacher_image_emb), "text": _rows(batch.teacher_text_emb)}
    single = {"image": _rows(batch.single_image_emb), "text": _rows(batch.single_text_emb)}
    align, recon, fused = [], [], {}
    for m in ("image", "text"):
        module = loss.fusion[m]
        fused[m] = [_integration(module, d, s) for d, s in zip(dual[m], single[m])]
        heads = [_linear(loss.heads[m], x) for x in student[m]]
        align.append(_mean(1 - _dot(_unit(h), _unit(z)) for h, z in zip(heads, fused[m])))
        recon.append(_mean(
            sum((a - b) ** 2 for a, b in zip(_linear(module.decode_dual, z), d))
            + sum((a - b) ** 2 for a, b in zip(_linear(module.decode_single, z), s))
            for z, d, s in zip(fused[m], dual[m], single[m])))
    contrast = _info_nce([_unit(z) for z in fused["image"]], [_unit(z) for z in fused["text"]], 4.0)
    expected = _mean(align) + 0.5 * (_mean(recon) + contrast)
    assert loss(batch).item() == pytest.approx(expected, rel=1e-5)


def test_mcad_feature_target_gets_no_gradient_from_the_student_alignment(batch):
    """With the module's own term off, only the student heads learn: the target is stop-grad."""
    loss = _build("mcad_feature", module_weight=0.0)
    loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.heads.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in loss.fusion.parameters())


# ---------------------------------------------------------------- EpmVG
def test_epmvg_matches_loop(batch):
    loss = _build("epmvg")
    parts = []
    for m, s, t in (("image", batch.image_emb, batch.teacher_image_emb),
                    ("text", batch.text_emb, batch.teacher_text_emb)):
        parts.append(_mean(1 - _dot(_unit(_linear(loss.proj[m], a)), _unit(b))
                           for a, b in zip(_rows(s), _rows(t))))
    assert loss(batch).item() == pytest.approx(1.5 * parts[0] + 2.0 * parts[1], rel=1e-5)


def test_epmvg_weights_are_kwargs(batch):
    a = _build("epmvg", image_weight=1.0, text_weight=0.0)(batch).item()
    b = _build("epmvg", image_weight=2.0, text_weight=0.0)(batch).item()
    assert b == pytest.approx(2 * a, rel=1e-6)


# ---------------------------------------------------------------- gradients, for every loss
ALL = [("fd", {}), ("icl", {}), ("crd", {}), ("dsmd_contrastive", {}), ("dsmd_feature", {}),
       ("dsmd_similarity", {}), ("dsmd_hard_negative", {"negatives": 2, "candidates": 6}),
       ("sard_matching", {"hardest": False}), ("sard_representation", {}),
       ("sard_relational", {}), ("mcad_candidates", {"candidates": K_ITM}),
       ("mcad_feature", {}), ("epmvg", {})]
# Which student leaves each loss reads (image/text always; levels and candidates when used).
READS = {"dsmd_contrastive": {"levels"}, "dsmd_feature": {"levels"},
         "dsmd_similarity": {"levels"}, "dsmd_hard_negative": {"levels", "cand"},
         "mcad_candidates": {"cand"}}


@pytest.mark.parametrize("name,kwargs", ALL, ids=[n for n, _ in ALL])
def test_gradients_reach_student_and_loss_parameters_not_teachers(name, kwargs):
    batch, leaves = _make()
    loss = _build(name, **kwargs)
    value = loss(batch)
    assert torch.isfinite(value)
    value.backward()
    reads = READS.get(name, set())
    used = [leaves.image] + ([leaves.text] if name != "mcad_candidates" else [])
    used += leaves.image_levels[-1:] + leaves.text_levels[-1:] if "levels" in reads else []
    used += [leaves.cand] if "cand" in reads else []
    for leaf in used:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    teachers = [batch.teacher_image_emb, batch.teacher_text_emb, batch.vision_teacher_emb,
                batch.text_teacher_emb, batch.single_image_emb, batch.single_text_emb,
                batch.cand_teacher_sim, batch.cand_itm]
    assert all(not t.requires_grad and t.grad is None for t in teachers)


# ---------------------------------------------------------------- requirements and registry
@pytest.mark.parametrize("name,kwargs,missing,stage", [
    ("sard_representation", {}, "text_teacher_emb",
     r"text-only teacher, listed as train\.text_teacher"),
    ("sard_relational", {}, "vision_teacher_emb", r"vision-only teacher.*train\.vision_teacher"),
    ("mcad_feature", {}, "single_image_emb", r"single-stream teacher.*single_stream_teacher"),
    ("mcad_candidates", {}, "i2t_cand_itm", r"stage `itm`, train\.itm_scores"),
    ("dsmd_hard_negative", {}, "i2t_topk_idx", r"stage `neighbors`, train\.neighbors"),
])
def test_missing_field_is_refused_naming_field_and_stage(name, kwargs, missing, stage):
    objective = build_objective([{"name": name, "kwargs": kwargs}], DS, TEACHER_DIMS,
                                level_dims=LEVEL_DIMS)
    available = set(objective.requires) - {missing}
    with pytest.raises(CacheError, match=rf"{name}.*'{missing}'.*{stage}"):
        check_requirements(objective, available, ["caches/clip/train.zarr"])
    check_requirements(objective, objective.requires)


def test_too_few_cached_candidates_is_refused():
    objective = build_objective([{"name": "mcad_candidates"}], DS, TEACHER_DIMS)
    with pytest.raises(CacheError, match="11 candidates.*holds 8"):
        check_requirements(objective, objective.requires, neighbor_k=8, itm_k=11)
    with pytest.raises(CacheError, match="i2t_cand_itm.*holds 5"):
        check_requirements(objective, objective.requires, neighbor_k=20, itm_k=5)
    check_requirements(objective, objective.requires, neighbor_k=11, itm_k=11)


def test_objective_reports_candidates_and_levels():
    objective = build_objective(
        [{"name": "mcad_candidates"}, {"name": "dsmd_hard_negative", "kwargs": {"candidates": 16}},
         {"name": "dsmd_similarity"}, {"name": "contrastive"}], DS, TEACHER_DIMS,
        level_dims=LEVEL_DIMS)
    assert objective.candidates == 16 and objective.itm_candidates == 11
    assert objective.uses_levels
    plain = build_objective([{"name": "contrastive"}, {"name": "fd"}], DS, TEACHER_DIMS)
    assert plain.candidates == plain.itm_candidates == 0 and not plain.uses_levels


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="crd.*dsmd_hard_negative.*epmvg.*fd.*icl.*"
                                               "mcad_candidates.*sard_relational"):
        build_objective([{"name": "kd_magic"}], DS, TEACHER_DIMS)
    with pytest.raises(UnknownNameError, match="unknown balancer 'gradnorm'; known: dsmd, fixed"):
        build_objective([{"name": "contrastive"}], DS, balancer="gradnorm")
    assert {"fixed", "dsmd"} <= set(BALANCERS.names())


def test_bad_kwargs_name_the_loss_and_accepted_kwargs():
    with pytest.raises(TypeError, match=r"loss 'epmvg'.*accepted kwargs.*image_weight"):
        build_objective([{"name": "epmvg", "kwargs": {"img_weight": 1}}], DS, TEACHER_DIMS)
