"""MCAD (Lei et al., arXiv 2310.19654): multi-teacher distillation from a dual-stream teacher
(CLIP-like, cached embeddings and top-K neighbours) and a single-stream image-text matching
teacher (cached ITM logits on each image's top-K candidates, and unimodal features)."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import (LOSSES, MASKED_LOGIT, DistillBatch, DistillLoss, info_nce, need,
                                  row_kl, student_scale, teacher_scale)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the ``mask`` entries of each row; masked entries get probability 0."""
    return F.softmax(logits.masked_fill(~mask, MASKED_LOGIT), dim=-1) * mask


class MCADCandidates(DistillLoss):
    """Distribution distillation over each image's top-K candidate captions (image→text).

    Over the first K cached candidates c_1..c_K of image i (the dual-stream teacher's top-K):
        p_d = softmax(sim_T(i, c) / τ_d)        dual-stream teacher (cosine similarities)
        p_s = softmax(itm(i, c) / τ_s)          single-stream teacher (ITM logits)
        p   = w · p_s + (1 − w) · p_d           fused target
        q   = softmax(s · u_i · v_c)            student (its own embeddings of image and captions)
        L   = mean_i KL(p ‖ q), invalid candidates left out.
    τ_d defaults to the dual-stream cache's 1/logit_scale; s is the student's logit scale.
    """

    requires = frozenset({"i2t_topk_idx", "i2t_cand_itm"})

    def __init__(self, candidates: int = 11, itm_weight: float = 0.5,
                 dual_temperature: float | None = None, itm_temperature: float = 1.0,
                 student_temperature: float | None = None, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if candidates < 2:
            raise ValueError(f"mcad_candidates: candidates must be >= 2, got {candidates}")
        if not 0.0 <= itm_weight <= 1.0:
            raise ValueError(f"mcad_candidates: itm_weight must be in [0, 1], got {itm_weight}")
        self.candidates = self.itm_candidates = candidates
        self.itm_weight, self.itm_temperature = itm_weight, itm_temperature
        self.dual_temperature, self.student_temperature = dual_temperature, student_temperature
        self.max_logit_scale = max_logit_scale

    def target(self, batch: DistillBatch) -> tuple[Tensor, Tensor]:
        """The fused teacher distribution over the candidates [B, K], and the validity mask."""
        k = self.candidates
        mask = need(batch, "cand_valid", "mcad_candidates")[:, :k]
        dual = teacher_scale(batch, self.dual_temperature, "mcad_candidates") * need(
            batch, "cand_teacher_sim", "mcad_candidates")[:, :k]
        itm = need(batch, "cand_itm", "mcad_candidates")[:, :k] / self.itm_temperature
        fused = (self.itm_weight * _masked_softmax(itm, mask)
                 + (1 - self.itm_weight) * _masked_softmax(dual, mask))
        return fused, mask

    def forward(self, batch: DistillBatch) -> Tensor:
        fused, mask = self.target(batch)
        cand = need(batch, "cand_text_emb", "mcad_candidates")[:, :self.candidates]
        scale = student_scale(batch, self.max_logit_scale, self.student_temperature)
        student = scale * torch.einsum("bd,bkd->bk", batch.image_emb, cand)
        # log of a distribution is its own log-softmax, so row_kl takes it as teacher logits.
        return row_kl(fused.clamp(min=1e-30).log(), student, mask)


@LOSSES.register("mcad_candidates")
def make_mcad_candidates(candidates: int = 11, itm_weight: float = 0.5,
                         dual_temperature: float | None = None, itm_temperature: float = 1.0,
                         student_temperature: float | None = None,
                         max_logit_scale: float = 100.0) -> MCADCandidates:
    """KL from the fused dual-/single-stream teacher distribution over top-K candidates."""
    return MCADCandidates(candidates, itm_weight, dual_temperature, itm_temperature,
                          student_temperature, max_logit_scale)


class Integration(nn.Module):
    """Fuses a dual-stream feature t and a single-stream feature q: z = g⊙A t + (1−g)⊙B q,
    g = sigmoid(G [t; q]); decoders reconstruct t and q from z (its training signal)."""

    def __init__(self, dual_dim: int, single_dim: int, fused_dim: int) -> None:
        super().__init__()
        self.dual = nn.Linear(dual_dim, fused_dim)
        self.single = nn.Linear(single_dim, fused_dim)
        self.gate = nn.Linear(dual_dim + single_dim, fused_dim)
        self.decode_dual = nn.Linear(fused_dim, dual_dim)
        self.decode_single = nn.Linear(fused_dim, single_dim)

    def forward(self, dual: Tensor, single: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gate(torch.cat([dual, single], dim=-1)))
        return gate * self.dual(dual) + (1 - gate) * self.single(single)

    def reconstruction(self, fused: Tensor, dual: Tensor, single: Tensor) -> Tensor:
        """mean_b (‖D_t z − t‖² + ‖D_q z − q‖²)."""
        return (((self.decode_dual(fused) - dual) ** 2).sum(-1)
                + ((self.decode_single(fused) - single) ** 2).sum(-1)).mean()


class MCADFeature(DistillLoss):
    """Feature distillation towards the fused features of both teachers.

    Per modality m, z_m = Integration_m(t_m, q_m) (t: dual-stream teacher, q: single-stream
    teacher's unimodal feature) and H_m a learnable student head:
        L_align  = mean_m mean_b (1 − cos(H_m x_m,b, sg(z_m,b)))
        L_module = mean_m reconstruction_m + InfoNCE_sym(ẑ_image, ẑ_text; 1/τ_f)
        L        = L_align + module_weight · L_module
    sg (stop-gradient) keeps the student from dragging the learnable target towards itself (a
    collapse); the integration module learns only from L_module: reconstruct both teachers'
    features (so z keeps both) and align fused image and text features of the same pair.
    """

    requires = frozenset({"image_emb", "text_emb", "single_image_emb", "single_text_emb"})
    cross_modal_teacher = True

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 fused_dim: int | None = None, module_weight: float = 1.0,
                 fusion_temperature: float = 0.07) -> None:
        super().__init__()
        self.module_weight, self.fusion_temperature = module_weight, fusion_temperature
        self.fusion, self.heads = nn.ModuleDict(), nn.ModuleDict()
        for m in ("image", "text"):
            if m not in teacher_dims or f"single_{m}" not in teacher_dims:
                continue  # a missing cache: check_requirements refuses the run
            dim = fused_dim or teacher_dims[m]
            self.fusion[m] = Integration(teacher_dims[m], teacher_dims[f"single_{m}"], dim)
            self.heads[m] = nn.Linear(student_dim, dim)

    def forward(self, batch: DistillBatch) -> Tensor:
        student = {"image": batch.image_emb, "text": batch.text_emb}
        dual = {"image": batch.teacher_image_emb, "text": batch.teacher_text_emb}
        single = {m: need(batch, f"single_{m}_emb", "mcad_feature") for m in ("image", "text")}
        fused = {m: self.fusion[m](dual[m], single[m]) for m in ("image", "text")}
        align = torch.stack([
            (1 - F.cosine_similarity(self.heads[m](student[m]), fused[m].detach(), dim=-1)).mean()
            for m in ("image", "text")]).mean()
        recon = torch.stack([self.fusion[m].reconstruction(fused[m], dual[m], single[m])
                             for m in ("image", "text")]).mean()
        contrast = info_nce(F.normalize(fused["image"], dim=-1), F.normalize(fused["text"], dim=-1),
                            1.0 / self.fusion_temperature)
        return align + self.module_weight * (recon + contrast)


@LOSSES.register("mcad_feature")
def make_mcad_feature(student_dim: int, teacher_dims: Mapping[str, int],
                      fused_dim: int | None = None, module_weight: float = 1.0,
                      fusion_temperature: float = 0.07) -> MCADFeature:
    """Align projected student features to both teachers' features fused by a gated module."""
    return MCADFeature(student_dim, teacher_dims, fused_dim, module_weight, fusion_temperature)
