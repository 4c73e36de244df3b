"""EpmVG (Wang et al., arXiv 2312.17648): cross-modal distillation of a frozen CLIP teacher's
image and text embeddings into the student's towers, with separate weights per modality."""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import LOSSES, DistillBatch, DistillLoss, projection_heads


class EpmVGLoss(DistillLoss):
    """Cosine distillation to the CLIP teacher, image and text weighted separately.

        L = w_I · mean_b (1 − cos(P_I x_b, t^I_b)) + w_T · mean_b (1 − cos(P_T y_b, t^T_b))
    with P_I, P_T learnable Linear(student_dim, teacher_dim); the paper uses w_I = 1.5, w_T = 2.
    """

    requires = frozenset({"image_emb", "text_emb"})

    def __init__(self, student_dim: int, teacher_dims: Mapping[str, int],
                 image_weight: float = 1.5, text_weight: float = 2.0, projection: str = "auto") -> None:
        super().__init__()
        self.image_weight, self.text_weight = image_weight, text_weight
        self.proj = projection_heads(student_dim, teacher_dims, {"image": "image", "text": "text"},
                                     projection)

    def forward(self, batch: DistillBatch) -> Tensor:
        image = 1 - F.cosine_similarity(self.proj["image"](batch.image_emb),
                                        batch.teacher_image_emb, dim=-1)
        text = 1 - F.cosine_similarity(self.proj["text"](batch.text_emb),
                                       batch.teacher_text_emb, dim=-1)
        return self.image_weight * image.mean() + self.text_weight * text.mean()


@LOSSES.register("epmvg")
def make_epmvg(student_dim: int, teacher_dims: Mapping[str, int], image_weight: float = 1.5,
               text_weight: float = 2.0, projection: str = "auto") -> EpmVGLoss:
    """EpmVG cosine distillation of both towers to the CLIP teacher (weights 1.5 and 2;
    ``projection``: auto | linear | identity)."""
    return EpmVGLoss(student_dim, teacher_dims, image_weight, text_weight, projection)
