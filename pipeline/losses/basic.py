"""The basic objectives: CLIP contrastive, embedding regression and in-batch similarity KL."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import (LOSSES, DistillBatch, DistillLoss, info_nce, projection_heads,
                                  row_kl, student_scale, teacher_similarity_logits)


def _student_logits(batch: DistillBatch, max_logit_scale: float) -> Tensor:
    """Image->text logits of the student, scale clamped as in CLIP training."""
    return student_scale(batch, max_logit_scale) * batch.image_emb @ batch.text_emb.T


class ContrastiveLoss(DistillLoss):
    """Symmetric InfoNCE on the student's own in-batch pairs (needs no teacher)."""

    requires = frozenset()

    def __init__(self, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, batch: DistillBatch) -> Tensor:
        return info_nce(batch.image_emb, batch.text_emb,
                        student_scale(batch, self.max_logit_scale))


@LOSSES.register("contrastive")
def make_contrastive(max_logit_scale: float = 100.0) -> ContrastiveLoss:
    """CLIP's symmetric cross-entropy over in-batch image/text pairs."""
    return ContrastiveLoss(max_logit_scale)


class FeatureLoss(DistillLoss):
    """Regress each student embedding, linearly projected to the teacher's dim, onto the teacher's.

    One learnable projection per modality (teachers of the two modalities may differ in dim).
    """

    METRICS = ("cosine", "mse")

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int], metric: str = "cosine",
                 modalities: Sequence[str] = ("image", "text"), projection: str = "auto") -> None:
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"feature loss: metric {metric!r} is not one of {list(self.METRICS)}")
        unknown = sorted(set(modalities) - {"image", "text"})
        if unknown or not modalities:
            raise ValueError("feature loss: modalities must be a non-empty subset of "
                             f"image, text; got {list(modalities)}")
        self.metric, self.modalities = metric, tuple(modalities)
        self.requires = frozenset(f"{m}_emb" for m in self.modalities)
        # A modality without a teacher dim has no cache field; build_objective reports that.
        self.proj = projection_heads(student_dim, teacher_dims, {m: m for m in self.modalities},
                                     projection)

    def _distance(self, projected: Tensor, teacher: Tensor) -> Tensor:
        if self.metric == "cosine":
            return (1 - F.cosine_similarity(projected, teacher, dim=-1)).mean()
        return F.mse_loss(projected, teacher)

    def forward(self, batch: DistillBatch) -> Tensor:
        pairs = {"image": (batch.image_emb, batch.teacher_image_emb),
                 "text": (batch.text_emb, batch.teacher_text_emb)}
        terms = [self._distance(self.proj[m](pairs[m][0]), pairs[m][1]) for m in self.modalities]
        return torch.stack(terms).mean()


@LOSSES.register("feature")
def make_feature(student_dim: int, teacher_dims: Mapping[str, int], metric: str = "cosine",
                 modalities: Sequence[str] = ("image", "text"), projection: str = "auto") -> FeatureLoss:
    """Embedding regression onto the teacher's through a learnable Linear(student_dim,
    teacher_dim), or directly where the dims agree (``projection``: auto | linear | identity)."""
    return FeatureLoss(student_dim, teacher_dims, metric, modalities, projection)


class SimilarityKL(DistillLoss):
    """Match the student's in-batch image->text and text->image softmax to the teacher's."""

    requires = frozenset({"image_emb", "text_emb"})
    cross_modal_teacher = True
    ensemble = "softmax"  # an ensemble's target: the average of its teachers' distributions

    def __init__(self, teacher_temperature: float | None = None,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.teacher_temperature, self.max_logit_scale = teacher_temperature, max_logit_scale

    def forward(self, batch: DistillBatch) -> Tensor:
        teacher_i2t, teacher_t2i = teacher_similarity_logits(batch, self.teacher_temperature,
                                                             "similarity_kl")
        student_logits = _student_logits(batch, self.max_logit_scale)
        i2t = row_kl(teacher_i2t, student_logits)
        t2i = row_kl(teacher_t2i, student_logits.T)
        return (i2t + t2i) / 2


@LOSSES.register("similarity_kl")
def make_similarity_kl(teacher_temperature: float | None = None,
                       max_logit_scale: float = 100.0) -> SimilarityKL:
    """KL(teacher || student) of in-batch similarity distributions, both directions averaged.

    Teacher logits use the cache's ``logit_scale`` unless ``teacher_temperature`` is given.
    """
    return SimilarityKL(teacher_temperature, max_logit_scale)
