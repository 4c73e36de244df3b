"""Grounding losses, built by name from ``GROUNDING_LOSSES`` (params ``grounding.train.losses``).

* ``box_l1``: L1 between predicted and true normalised ``(cx, cy, w, h)``, summed over the four
  coordinates, mean over the batch (TransVG / DETR);
* ``box_giou``: mean of ``1 − GIoU`` of the two boxes;
* ``epmvg_grounding`` (EpmVG, arXiv 2312.17648): the paper's cosine distillation at the output of
  the fusion transformer: the first visual token against the teacher's image embedding and the
  first linguistic token against the teacher's text embedding of the expression, each through
  a learnable linear head, weighted 1.5 (image) and 2 (text).

A loss lists the teacher cache fields it reads in ``requires``; a run whose losses need none
does not open a teacher cache at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.grounding.boxes import cxcywh_to_xyxy, generalized_iou
from pipeline.grounding.model import GroundOutput
from pipeline.losses.base import DistillBatch
from pipeline.losses.epmvg import EpmVGLoss
from pipeline.registry import Registry

GROUNDING_LOSSES: Registry = Registry("grounding loss")


@dataclass
class GroundTargets:
    """What the losses compare a forward pass with (one row per expression)."""

    boxes: Tensor  # [B, 4] true normalised cxcywh
    teacher_image_emb: Tensor | None = None  # [B, Dt] the scene's cached teacher embedding
    teacher_text_emb: Tensor | None = None  # [B, Dt] the expression's cached teacher embedding


class GroundingLoss(nn.Module):
    """Base class: ``forward(out, targets)`` is a scalar; ``requires`` names cache fields."""

    requires: frozenset[str] = frozenset()

    def forward(self, out: GroundOutput, targets: GroundTargets) -> Tensor:
        raise NotImplementedError


class BoxL1(GroundingLoss):
    def forward(self, out: GroundOutput, targets: GroundTargets) -> Tensor:
        return F.l1_loss(out.box, targets.boxes, reduction="none").sum(-1).mean()


class BoxGIoU(GroundingLoss):
    def forward(self, out: GroundOutput, targets: GroundTargets) -> Tensor:
        return (1 - generalized_iou(cxcywh_to_xyxy(out.box), cxcywh_to_xyxy(targets.boxes))).mean()


class EpmVGGrounding(GroundingLoss):
    """EpmVG's retrieval loss (:class:`pipeline.losses.epmvg.EpmVGLoss`) applied to the fusion
    transformer's first visual and first linguistic outputs."""

    requires = EpmVGLoss.requires

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int], image_weight: float,
                 text_weight: float) -> None:
        super().__init__()
        self.inner = EpmVGLoss(student_dim, teacher_dims, image_weight, text_weight)

    def forward(self, out: GroundOutput, targets: GroundTargets) -> Tensor:
        batch = DistillBatch(out.visual_first, out.text_first, out.box.new_ones(()),
                             targets.teacher_image_emb, targets.teacher_text_emb, None,
                             out.box.new_zeros(0), out.box.new_zeros(0))
        return self.inner(batch)


@GROUNDING_LOSSES.register("box_l1")
def make_box_l1(student_dim: int, teacher_dims: Mapping[str, int]) -> BoxL1:
    """L1 on normalised (cx, cy, w, h), summed over coordinates."""
    return BoxL1()


@GROUNDING_LOSSES.register("box_giou")
def make_box_giou(student_dim: int, teacher_dims: Mapping[str, int]) -> BoxGIoU:
    """1 − generalised IoU of predicted and true boxes."""
    return BoxGIoU()


@GROUNDING_LOSSES.register("epmvg_grounding")
def make_epmvg_grounding(student_dim: int, teacher_dims: Mapping[str, int], image_weight: float = 1.5,
                         text_weight: float = 2.0) -> EpmVGGrounding:
    """EpmVG cosine distillation at the fusion output (weights 1.5 image, 2 text)."""
    return EpmVGGrounding(student_dim, teacher_dims, image_weight, text_weight)
