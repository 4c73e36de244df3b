"""Box formats and overlap measures.

Formats: ``xywh`` (left, top, width, height; the annotation format, in pixels), ``xyxy`` (left,
top, right, bottom) and ``cxcywh`` (centre and size; what the box head predicts, normalised to
``[0, 1]`` by the image's width and height). IoU is invariant under scaling x and y separately,
so IoU of normalised boxes equals IoU of the pixel boxes of the same image.
"""
from __future__ import annotations

import torch
from torch import Tensor

ACC_IOU = 0.5  # Acc@0.5: a prediction is correct when its IoU with the true box is >= 0.5


def xywh_to_xyxy(b: Tensor) -> Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter, _area(a) + _area(b) - inter


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two ``[..., 4]`` xyxy tensors (not all pairs)."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=1e-12)


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU (Rezatofighi et al. 2019) of matching rows: IoU − |C \\ (A ∪ B)| / |C|,
    C the smallest box enclosing both; in [-1, 1], and unlike IoU it has a gradient for
    disjoint boxes."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-12)
    hull = _area(torch.cat([torch.minimum(a[..., :2], b[..., :2]),
                            torch.maximum(a[..., 2:], b[..., 2:])], dim=-1))
    return iou - (hull - union) / hull.clamp(min=1e-12)


def accuracy_at(iou: Tensor, threshold: float = ACC_IOU) -> float:
    """Share of predictions whose IoU reaches ``threshold`` (Acc@0.5 by default)."""
    return float((iou >= threshold).float().mean()) if iou.numel() else float("nan")
