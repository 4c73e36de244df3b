"""DSMD (Liang et al., arXiv 2404.10838): contrastive, feature, similarity and hard-negative
distillation at several scales of the student (its final embedding and intermediate levels).

Every loss takes ``levels``: ``"final"`` (the student's embedding) and/or integer indices into
the student's intermediate features (``-1`` = deepest). Each intermediate level of each tower has
its own learnable ``Linear(d_level, teacher_dim)`` head; the loss is the mean over its levels.
The weights between the four losses are set by the ``dsmd`` balancer (``train.balancer``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import (LOSSES, DistillBatch, DistillLoss, info_nce, need, row_kl,
                                  student_scale, teacher_scale, teacher_similarity_logits)

DEFAULT_LEVELS: tuple[Any, ...] = ("final", -1)
LevelDims = Mapping[str, Sequence[int]]  # {"image": [d_0, ...], "text": [...]}


def _level_key(level: Any) -> str:
    return "final" if level == "final" else f"level{level}"


class MultiScaleLoss(DistillLoss):
    """Shared by the DSMD losses: per-level projection heads and per-level student features.

    project_final: whether the final embedding is also projected to the teacher dim (needed when
        it is compared with teacher embeddings, not when only its own similarities are used).
    """

    name = "dsmd"

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 level_dims: LevelDims | None, levels: Sequence[Any],
                 project_final: bool) -> None:
        super().__init__()
        level_dims = level_dims or {}
        self.levels = self._check_levels(levels, level_dims)
        self.uses_levels = any(level != "final" for level in self.levels)
        heads: dict[str, nn.Module] = {}
        for modality in ("image", "text"):
            if modality not in teacher_dims:
                continue  # no cache for it: check_requirements refuses the run
            for level in self.levels:
                if level == "final" and not project_final:
                    continue
                in_dim = student_dim if level == "final" else level_dims[modality][level]
                heads[f"{modality}_{_level_key(level)}"] = nn.Linear(in_dim, teacher_dims[modality])
        self.heads = nn.ModuleDict(heads)

    def _check_levels(self, levels: Sequence[Any],
                      level_dims: LevelDims) -> tuple[Any, ...]:
        if isinstance(levels, (str, int)) or not levels:
            raise ValueError(f"{self.name}: levels must be a non-empty list of 'final' and level "
                             f"indices, e.g. ['final', -1]; got {levels!r}")
        checked = []
        for level in levels:
            if level == "final":
                checked.append(level)
                continue
            if isinstance(level, bool) or not isinstance(level, int):
                raise ValueError(f"{self.name}: level {level!r} is neither 'final' nor an integer")
            for modality in ("image", "text"):
                count = len(level_dims.get(modality, ()))
                if not -count <= level < count:
                    raise ValueError(
                        f"{self.name}: level {level} needs the student's intermediate {modality} "
                        f"features, but it exposes {count} {modality} level(s); use levels "
                        "['final'] or a student that exposes intermediate levels")
            checked.append(level)
        if len(set(map(_level_key, checked))) != len(checked):
            raise ValueError(f"{self.name}: levels {list(levels)} repeat a level")
        return tuple(checked)

    def features(self, batch: DistillBatch, level: Any, modality: str, project: bool) -> Tensor:
        """The student's ``modality`` features at ``level``; projected and normalised if asked."""
        if level == "final":
            raw = batch.image_emb if modality == "image" else batch.text_emb
            if not project:
                return raw
        else:
            raw = need(batch, f"{modality}_levels", self.name)[level]
        return F.normalize(self.heads[f"{modality}_{_level_key(level)}"](raw), dim=-1)

    def per_level(self, batch: DistillBatch, level: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: DistillBatch) -> Tensor:
        return torch.stack([self.per_level(batch, level) for level in self.levels]).mean()


class DSMDContrastive(MultiScaleLoss):
    """Contrastive distillation: each student feature picks its own teacher feature in the batch.

    Per level l and modality m, u = normalise(P_l,m(x_l,m)), t = teacher embedding of m:
        L = InfoNCE_sym(u, t; 1/τ) = ½ (CE(u·tᵀ/τ, diag) + CE(t·uᵀ/τ, diag)), averaged over m, l.
    """

    name = "dsmd_contrastive"
    requires = frozenset({"image_emb", "text_emb"})

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 level_dims: LevelDims | None, levels: Sequence[Any] = DEFAULT_LEVELS,
                 temperature: float = 0.07) -> None:
        super().__init__(student_dim, teacher_dims, level_dims, levels, project_final=True)
        self.temperature = temperature

    def per_level(self, batch: DistillBatch, level: Any) -> Tensor:
        teachers = {"image": batch.teacher_image_emb, "text": batch.teacher_text_emb}
        return torch.stack([info_nce(self.features(batch, level, m, True), teachers[m],
                                     1.0 / self.temperature) for m in ("image", "text")]).mean()


class DSMDFeature(MultiScaleLoss):
    """Feature distillation: L = mean_m,b ‖normalise(P_l,m(x_l,m,b)) − t_m,b‖², averaged over l."""

    name = "dsmd_feature"
    requires = frozenset({"image_emb", "text_emb"})

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 level_dims: LevelDims | None,
                 levels: Sequence[Any] = DEFAULT_LEVELS) -> None:
        super().__init__(student_dim, teacher_dims, level_dims, levels, project_final=True)

    def per_level(self, batch: DistillBatch, level: Any) -> Tensor:
        teachers = {"image": batch.teacher_image_emb, "text": batch.teacher_text_emb}
        return torch.stack([((self.features(batch, level, m, True) - teachers[m]) ** 2)
                            .sum(-1).mean() for m in ("image", "text")]).mean()


class DSMDSimilarity(MultiScaleLoss):
    """Similarity distillation: in-batch image↔text softmax of the student matches the teacher's.

    Per level: S = s · u vᵀ (final: the student's own embeddings; intermediate: projected and
    normalised level features), T = s_T · t^I t^Tᵀ;
    L = ½ (KL_rows(T ‖ S) + KL_rows(Tᵀ ‖ Sᵀ)), averaged over levels.
    """

    name = "dsmd_similarity"
    requires = frozenset({"image_emb", "text_emb"})
    cross_modal_teacher = True
    ensemble = "softmax"  # an ensemble's target: the average of its teachers' distributions

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 level_dims: LevelDims | None, levels: Sequence[Any] = DEFAULT_LEVELS,
                 teacher_temperature: float | None = None, student_temperature: float | None = None,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__(student_dim, teacher_dims, level_dims, levels, project_final=False)
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.max_logit_scale = max_logit_scale

    def per_level(self, batch: DistillBatch, level: Any) -> Tensor:
        scale = student_scale(batch, self.max_logit_scale, self.student_temperature)
        student = scale * (self.features(batch, level, "image", False)
                           @ self.features(batch, level, "text", False).T)
        i2t, t2i = teacher_similarity_logits(batch, self.teacher_temperature, self.name)
        return (row_kl(i2t, student) + row_kl(t2i, student.T)) / 2


class DSMDHardNegative(MultiScaleLoss):
    """Hard-negative distillation: the teacher's scores on each anchor image's hardest negatives.

    Final level: the negatives are the first ``negatives`` valid, non-positive captions among the
    anchor's ``candidates`` cached top-K image→text neighbours of the teacher (so they come from
    the whole dataset, hardest first). With p = the anchor's own caption:
        t = s_T · [t^I_i·t^T_p, sim_T(i, n_1), …, sim_T(i, n_m)]
        z = s   · [u_i·v_p,      u_i·c_n1,     …, u_i·c_nm]      (c: student candidate embeddings)
        L = mean_i KL(softmax(t) ‖ softmax(z))
    Intermediate levels have no candidate embeddings, so the negatives there are the ``negatives``
    in-batch captions of other images with the highest teacher similarity, and u, v are the
    projected, normalised level features.
    """

    name = "dsmd_hard_negative"
    cross_modal_teacher = True

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 level_dims: LevelDims | None, levels: Sequence[Any] = DEFAULT_LEVELS,
                 negatives: int = 5, candidates: int = 10,
                 teacher_temperature: float | None = None, student_temperature: float | None = None,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__(student_dim, teacher_dims, level_dims, levels, project_final=False)
        if negatives < 1 or candidates < negatives:
            raise ValueError(f"{self.name}: need 1 <= negatives <= candidates; got "
                             f"negatives={negatives}, candidates={candidates}")
        self.negatives = negatives
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.max_logit_scale = max_logit_scale
        uses_candidates = "final" in self.levels
        self.candidates = candidates if uses_candidates else 0
        self.requires = frozenset({"image_emb", "text_emb"}
                                  | ({"i2t_topk_idx"} if uses_candidates else set()))

    def _scales(self, batch: DistillBatch) -> tuple[Tensor | float, float]:
        return (student_scale(batch, self.max_logit_scale, self.student_temperature),
                teacher_scale(batch, self.teacher_temperature, self.name))

    def _final(self, batch: DistillBatch) -> Tensor:
        k = self.candidates
        cand = need(batch, "cand_text_emb", self.name)[:, :k]
        cand_sim = need(batch, "cand_teacher_sim", self.name)[:, :k]
        negative = need(batch, "cand_valid", self.name)[:, :k] & ~need(
            batch, "cand_is_positive", self.name)[:, :k]
        chosen = negative & (negative.cumsum(1) <= self.negatives)  # hardest first: rank order
        s_scale, t_scale = self._scales(batch)
        t_pos = (batch.teacher_image_emb * batch.teacher_text_emb).sum(-1, keepdim=True)
        s_pos = (batch.image_emb * batch.text_emb).sum(-1, keepdim=True)
        s_neg = torch.einsum("bd,bkd->bk", batch.image_emb, cand)
        mask = torch.cat([torch.ones_like(chosen[:, :1]), chosen], dim=1)
        return row_kl(t_scale * torch.cat([t_pos, cand_sim], 1),
                      s_scale * torch.cat([s_pos, s_neg], 1), mask)

    def _in_batch(self, batch: DistillBatch, level: Any) -> Tensor:
        s_scale, t_scale = self._scales(batch)
        u = self.features(batch, level, "image", False)
        v = self.features(batch, level, "text", False)
        teacher = batch.teacher_image_emb @ batch.teacher_text_emb.T
        student = u @ v.T
        same_image = batch.image_rows[:, None] == batch.image_rows[None, :]
        ranked = teacher.masked_fill(same_image, float("-inf"))
        m = min(self.negatives, ranked.shape[1] - 1)
        chosen = torch.zeros_like(same_image)
        if m > 0:
            chosen.scatter_(1, ranked.topk(m, dim=1).indices, True)
        chosen &= ~same_image  # fewer eligible captions than m: drop the padding picks
        mask = torch.cat([torch.ones_like(chosen[:, :1]), chosen], dim=1)
        t = torch.cat([teacher.diagonal()[:, None], teacher], 1)
        s = torch.cat([student.diagonal()[:, None], student], 1)
        return row_kl(t_scale * t, s_scale * s, mask)

    def per_level(self, batch: DistillBatch, level: Any) -> Tensor:
        return self._final(batch) if level == "final" else self._in_batch(batch, level)


@LOSSES.register("dsmd_contrastive")
def make_dsmd_contrastive(student_dim: int, teacher_dims: Mapping[str, int],
                          level_dims: LevelDims | None = None,
                          levels: Sequence[Any] = DEFAULT_LEVELS,
                          temperature: float = 0.07) -> DSMDContrastive:
    """DSMD contrastive distillation at several scales (student feature vs teacher, InfoNCE)."""
    return DSMDContrastive(student_dim, teacher_dims, level_dims, levels, temperature)


@LOSSES.register("dsmd_feature")
def make_dsmd_feature(student_dim: int, teacher_dims: Mapping[str, int],
                      level_dims: LevelDims | None = None,
                      levels: Sequence[Any] = DEFAULT_LEVELS) -> DSMDFeature:
    """DSMD feature distillation at several scales (squared distance of normalised features)."""
    return DSMDFeature(student_dim, teacher_dims, level_dims, levels)


@LOSSES.register("dsmd_similarity")
def make_dsmd_similarity(student_dim: int, teacher_dims: Mapping[str, int],
                         level_dims: LevelDims | None = None,
                         levels: Sequence[Any] = DEFAULT_LEVELS,
                         teacher_temperature: float | None = None,
                         student_temperature: float | None = None,
                         max_logit_scale: float = 100.0) -> DSMDSimilarity:
    """DSMD similarity distillation at several scales (KL of in-batch softmax distributions)."""
    return DSMDSimilarity(student_dim, teacher_dims, level_dims, levels, teacher_temperature,
                          student_temperature, max_logit_scale)


@LOSSES.register("dsmd_hard_negative")
def make_dsmd_hard_negative(student_dim: int, teacher_dims: Mapping[str, int],
                            level_dims: LevelDims | None = None,
                            levels: Sequence[Any] = DEFAULT_LEVELS, negatives: int = 5,
                            candidates: int = 10, teacher_temperature: float | None = None,
                            student_temperature: float | None = None,
                            max_logit_scale: float = 100.0) -> DSMDHardNegative:
    """DSMD hard-negative distillation: cached top-K negatives (final), in-batch ones (levels)."""
    return DSMDHardNegative(student_dim, teacher_dims, level_dims, levels, negatives, candidates,
                            teacher_temperature, student_temperature, max_logit_scale)
