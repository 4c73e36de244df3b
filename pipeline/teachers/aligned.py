"""The teacher ``align`` builds: a vision-only and a text-only teacher joined by learned heads.

``distill align`` writes this teacher's stores straight from the source teachers' caches, without
running an encoder. This class is the same teacher end to end (image -> vision encoder -> head,
caption -> text encoder -> head), rebuilt from the heads folder ``align`` saved (the heads and
the source teachers' params entries), so evaluation can time it like any other teacher and a new
split can be taught with ``distill teach``; its fingerprint equals the one ``align`` records.

>>> teacher = create_teacher("aligned", heads="models/align/aligned")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import CacheError
from pipeline.fingerprint import fingerprint
from pipeline.teachers.base import TEACHERS, Teacher


class AlignedTeacher(Teacher):
    """Frozen source teachers + the aligned heads (see module doc)."""

    def __init__(self, heads: str, amp: bool = True) -> None:
        from pipeline.align import aligned_fingerprint, heads_sha256, load_heads
        from pipeline.teachers import create_teacher

        self._heads_dir = Path(heads)
        aligned_heads, spec = load_heads(self._heads_dir)
        towers = {}
        for role in ("vision", "text"):
            entry = spec[role]["entry"]
            if entry is None:
                raise CacheError(f"{self._heads_dir}: the heads do not record the {role} teacher's params "
                                 "entry (align was run without it); rerun `distill align`")
            towers[role] = create_teacher(entry["teacher"], **entry["kwargs"])
            found = fingerprint(towers[role].fingerprint())
            if found != spec[role]["teacher_fingerprint"]:
                raise CacheError(
                    f"{self._heads_dir}: the {role} teacher {spec[role]['name']!r} built from its entry "
                    f"has fingerprint {found}, but the heads were trained on the cache of "
                    f"{spec[role]['teacher_fingerprint']}: rerun `distill teach` and `distill align`")
        vision, text = towers["vision"], towers["text"]
        super().__init__(name="aligned", modalities=frozenset({"image", "text"}),
                         embed_dim=aligned_heads.args["embed_dim"], logit_scale=spec["logit_scale"],
                         transform=vision.transform, amp=amp)
        self.vision, self.text, self.heads = vision, text, aligned_heads
        self._fields = aligned_fingerprint(vision.fingerprint(), spec["text"]["teacher_fingerprint"],
                                           spec["vision"]["teacher_fingerprint"], heads_sha256(aligned_heads),
                                           aligned_heads.args, self.embed_dim, self.logit_scale)
        self.freeze()

    def _embed_images(self, pixels: Tensor) -> Tensor:
        # the heads learned on the cached (L2-normalised) features of the vision teacher
        feat = F.normalize(self.vision._embed_images(pixels).float(), dim=-1)
        return self.heads.vision(feat)

    def _embed_texts(self, texts: list[str]) -> Tensor:
        feat = F.normalize(self.text._embed_texts(texts).float(), dim=-1)
        return self.heads.text(feat.to(self.device))

    def preprocess_repr(self) -> str:
        return self.vision.preprocess_repr()

    def _compute_weights_digest(self) -> str | None:
        return self._fields["weights_sha256"]

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self._fields.items()
                if k in ("vision_teacher", "text_teacher", "head")}


@TEACHERS.register("aligned")
def make_aligned(**kw: Any) -> AlignedTeacher:
    """A teacher written by `distill align`, run end to end. kwargs: heads (the heads folder,
    <align.heads_dir>/<align.name>), amp."""
    return AlignedTeacher(**kw)
