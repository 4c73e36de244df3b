"""CLIP-KD (Yang et al., arXiv 2307.12732): feature distillation, interactive contrastive
learning and contrastive relational distillation, from cached teacher embeddings."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import (LOSSES, DistillBatch, DistillLoss, check_modalities,
                                  projection_heads, student_scale)
from pipeline.losses.basic import SimilarityKL


class FDLoss(DistillLoss):
    """CLIP-KD feature distillation (FD): squared L2 distance to the teacher embedding.

    L_FD = 1/B Σ_b Σ_m ‖P_m(s_m,b) − t_m,b‖², m over the modalities, P_m a learnable
    Linear(student_dim, teacher_dim) and t the cached (L2-normalised) teacher embedding.
    """

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 modalities: Sequence[str] = ("image", "text"), projection: str = "auto") -> None:
        super().__init__()
        self.modalities = check_modalities("fd", modalities)
        self.requires = frozenset(f"{m}_emb" for m in self.modalities)
        self.proj = projection_heads(student_dim, teacher_dims, {m: m for m in self.modalities},
                                     projection)

    def forward(self, batch: DistillBatch) -> Tensor:
        pairs = {"image": (batch.image_emb, batch.teacher_image_emb),
                 "text": (batch.text_emb, batch.teacher_text_emb)}
        per_sample = sum(((self.proj[m](pairs[m][0]) - pairs[m][1]) ** 2).sum(-1)
                         for m in self.modalities)
        return per_sample.mean()


@LOSSES.register("fd")
def make_fd(student_dim: int, teacher_dims: Mapping[str, int],
            modalities: Sequence[str] = ("image", "text"), projection: str = "auto") -> FDLoss:
    """CLIP-KD feature distillation: MSE between projected student and teacher embeddings
    (``projection``: auto | linear | identity)."""
    return FDLoss(student_dim, teacher_dims, modalities, projection)


class ICLLoss(DistillLoss):
    """CLIP-KD interactive contrastive learning (ICL): student anchors, teacher contrasts.

    With u = normalise(P_img(student image)), v = normalise(P_txt(student text)) in the teacher
    space, t^I / t^T the teacher's image / text embeddings and s the softmax scale:
        L_I2T = −1/B Σ_k log softmax_b(s · u_k · t^T_b)[k]
        L_T2I = −1/B Σ_k log softmax_b(s · v_k · t^I_b)[k]
        L_ICL = (L_I2T + L_T2I) / 2
    s is the student's logit scale (clamped at ``max_logit_scale``) or ``1/temperature``.
    """

    requires = frozenset({"image_emb", "text_emb"})
    cross_modal_teacher = True

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 temperature: float | None = None, max_logit_scale: float = 100.0,
                 projection: str = "auto") -> None:
        super().__init__()
        self.temperature, self.max_logit_scale = temperature, max_logit_scale
        self.proj = projection_heads(student_dim, teacher_dims, {"image": "image", "text": "text"},
                                     projection)

    def forward(self, batch: DistillBatch) -> Tensor:
        scale = student_scale(batch, self.max_logit_scale, self.temperature)
        u = F.normalize(self.proj["image"](batch.image_emb), dim=-1)
        v = F.normalize(self.proj["text"](batch.text_emb), dim=-1)
        labels = torch.arange(u.shape[0], device=u.device)
        i2t = F.cross_entropy(scale * u @ batch.teacher_text_emb.T, labels)
        t2i = F.cross_entropy(scale * v @ batch.teacher_image_emb.T, labels)
        return (i2t + t2i) / 2


@LOSSES.register("icl")
def make_icl(student_dim: int, teacher_dims: Mapping[str, int], temperature: float | None = None,
             max_logit_scale: float = 100.0, projection: str = "auto") -> ICLLoss:
    """CLIP-KD interactive contrastive learning: student image vs teacher texts and vice versa
    (``projection``: auto | linear | identity)."""
    return ICLLoss(student_dim, teacher_dims, temperature, max_logit_scale, projection)


@LOSSES.register("crd")
def make_crd(teacher_temperature: float | None = None,
             max_logit_scale: float = 100.0) -> SimilarityKL:
    """CLIP-KD contrastive relational distillation (CRD): the ``similarity_kl`` loss.

    KL(teacher ‖ student) of the in-batch image→text and text→image softmax distributions.
    """
    return SimilarityKL(teacher_temperature, max_logit_scale)
