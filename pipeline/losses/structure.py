"""Structure-aware rebalanced distillation (Yang et al., arXiv 2412.10761): a cross-modal
matching loss, representation-level distillation from a vision-only and a text-only teacher, and
structure-aware relational distillation towards a learnable fusion of their relation matrices."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import (LOSSES, DistillBatch, DistillLoss, check_modalities, info_nce,
                                  need, projection_heads)

TEACHER_FIELDS = {"image": "vision_teacher_emb", "text": "text_teacher_emb"}
TEACHER_KEYS = {"image": "vision_teacher", "text": "text_teacher"}


class SARDMatching(DistillLoss):
    """Cross-modal matching on the student's own pairs: VSE++ hinge triplet loss.

    With S = student image·textᵀ (cosine) and N(i) the batch captions of other images:
        L = mean_i ( max_{j∈N(i)} [α − S_ii + S_ij]₊ + max_{j∈N(i)} [α − S_ii + S_ji]₊ )
    (``hardest=False`` sums over N(i) instead of taking the max).

    The hardest-negative hinge stalls when a student starts from scratch: at random init one
    negative per anchor carries all the gradient and the embedding collapses (VSE++ and its
    successors warm up with the sum of hinges). So the first ``warmup_steps`` training steps use
    the sum; the step count is a buffer, saved in checkpoints, so a resumed run keeps its place.
    """

    requires = frozenset()

    def __init__(self, margin: float = 0.2, hardest: bool = True, warmup_steps: int = 0) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"sard_matching: warmup_steps must be >= 0, got {warmup_steps}")
        self.margin, self.hardest, self.warmup_steps = margin, hardest, warmup_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def in_warmup(self) -> bool:
        """True while the sum of hinges stands in for the hardest negative."""
        # warmup_steps checked first: reading the step count syncs with the device every step
        return self.hardest and self.warmup_steps > 0 and int(self.steps) < self.warmup_steps

    def forward(self, batch: DistillBatch) -> Tensor:
        sim = batch.image_emb @ batch.text_emb.T
        positive = sim.diagonal()
        same = batch.image_rows[:, None] == batch.image_rows[None, :]
        cost_text = (self.margin - positive[:, None] + sim).clamp(min=0).masked_fill(same, 0)
        cost_image = (self.margin - positive[None, :] + sim).clamp(min=0).masked_fill(same, 0)
        hardest = self.hardest and not self.in_warmup
        if self.training:
            self.steps += 1
        if hardest:
            return (cost_text.max(1).values + cost_image.max(0).values).mean()
        return (cost_text.sum(1) + cost_image.sum(0)).mean()

    def logged(self) -> dict[str, float]:
        return {"warmup": float(self.in_warmup)} if self.warmup_steps else {}


@LOSSES.register("sard_matching")
def make_sard_matching(margin: float = 0.2, hardest: bool = True,
                       warmup_steps: int = 0) -> SARDMatching:
    """Hinge triplet matching loss on student pairs, hardest in-batch negatives (VSE++), after
    ``warmup_steps`` steps of the sum of hinges."""
    return SARDMatching(margin, hardest, warmup_steps)


class SARDRepresentation(DistillLoss):
    """Representation-level distillation from the single-modal teachers.

    Image: InfoNCE_sym(normalise(P_v(student image)), normalise(vision teacher); 1/τ); text: the
    same with the text-only teacher; the loss is their mean.
    """

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 temperature: float = 0.07, modalities: Sequence[str] = ("image", "text")) -> None:
        super().__init__()
        self.modalities = check_modalities("sard_representation", modalities)
        self.temperature = temperature
        self.requires = frozenset(TEACHER_FIELDS[m] for m in self.modalities)
        self.proj = projection_heads(student_dim, teacher_dims,
                                     {m: TEACHER_KEYS[m] for m in self.modalities})

    def forward(self, batch: DistillBatch) -> Tensor:
        student = {"image": batch.image_emb, "text": batch.text_emb}
        terms = []
        for m in self.modalities:
            teacher = F.normalize(need(batch, TEACHER_FIELDS[m], "sard_representation"), dim=-1)
            projected = F.normalize(self.proj[m](student[m]), dim=-1)
            terms.append(info_nce(projected, teacher, 1.0 / self.temperature))
        return torch.stack(terms).mean()


@LOSSES.register("sard_representation")
def make_sard_representation(student_dim: int, teacher_dims: Mapping[str, int],
                             temperature: float = 0.07,
                             modalities: Sequence[str] = ("image", "text")) -> SARDRepresentation:
    """InfoNCE of projected student embeddings against the vision-only / text-only teachers'."""
    return SARDRepresentation(student_dim, teacher_dims, temperature, modalities)


class SARDRelational(DistillLoss):
    """Structure-aware relational distillation towards a learnable fusion of teacher relations.

    S_v = n_v n_vᵀ and S_t = n_t n_tᵀ are the cosine relation matrices of the vision-only and
    text-only teachers over the batch; λ = sigmoid(θ) ∈ (0, 1) is learned. Each chosen student
    relation matrix R (``image``: x xᵀ, ``text``: y yᵀ, ``cross``: x yᵀ, with x, y the student's
    normalised embeddings) is pulled to the fusion by mean absolute error:
        L = mean_R mean_ij | R_ij − (λ S_v + (1 − λ) S_t)_ij |
    """

    requires = frozenset({"vision_teacher_emb", "text_teacher_emb"})
    RELATIONS = ("image", "text", "cross")

    def __init__(self, relations: Sequence[str] = RELATIONS, init_lambda: float = 0.5) -> None:
        super().__init__()
        unknown = sorted(set(relations) - set(self.RELATIONS))
        if unknown or not relations:
            raise ValueError(f"sard_relational: relations must be a non-empty subset of "
                             f"{list(self.RELATIONS)}; got {list(relations)}")
        if not 0.0 < init_lambda < 1.0:
            raise ValueError(f"sard_relational: init_lambda must be in (0, 1), got {init_lambda}")
        self.relations = tuple(relations)
        self.theta = nn.Parameter(torch.tensor(math.log(init_lambda / (1 - init_lambda))))

    @property
    def lam(self) -> Tensor:
        """The fusion weight λ of the vision teacher's relations, in (0, 1)."""
        return torch.sigmoid(self.theta)

    def forward(self, batch: DistillBatch) -> Tensor:
        vision = F.normalize(need(batch, "vision_teacher_emb", "sard_relational"), dim=-1)
        text = F.normalize(need(batch, "text_teacher_emb", "sard_relational"), dim=-1)
        target = self.lam * (vision @ vision.T) + (1 - self.lam) * (text @ text.T)
        x, y = batch.image_emb, batch.text_emb
        student = {"image": lambda: x @ x.T, "text": lambda: y @ y.T, "cross": lambda: x @ y.T}
        return torch.stack([(student[r]() - target).abs().mean() for r in self.relations]).mean()

    def logged(self) -> dict[str, float]:
        return {"lambda": float(self.lam.detach())}


@LOSSES.register("sard_relational")
def make_sard_relational(relations: Sequence[str] = SARDRelational.RELATIONS,
                         init_lambda: float = 0.5) -> SARDRelational:
    """MAE between student relation matrices and λ·S_vision + (1−λ)·S_text, λ learned."""
    return SARDRelational(relations, init_lambda)
