"""Assemble what the losses see (a ``DistillBatch``) from a collated batch and the stores.

The student runs here (towers, intermediate levels, candidate captions); teacher values are
only gathered from cached arrays, never computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.losses import DistillBatch
from pipeline.students import Student
from pipeline.fields import BY_NAME
from pipeline.training.targets import TeacherTargets


@dataclass
class BatchPlan:
    """What a run's objective reads beyond the student's final embeddings."""

    targets: TeacherTargets
    candidates: int = 0            # K: candidate captions per image (cached i2t neighbours)
    itm_candidates: int = 0        # K_itm: of those, how many carry single-stream ITM scores
    levels: bool = False           # intermediate features of both towers
    captions: list[str] | None = None   # caption by text row (needed when candidates > 0)
    views: bool = False            # targets of each sample's replayed view (train.views: sample)
    _tokens: dict[int, Tensor] = field(default_factory=dict)

    def tokens(self, student: Student, rows: np.ndarray) -> Tensor:
        """Token ids of captions ``rows`` (memoised: candidates recur across steps)."""
        assert self.captions is not None
        missing = sorted({int(r) for r in rows} - self._tokens.keys())
        if missing:
            for row, ids in zip(missing, student.tokenize([self.captions[r] for r in missing])):
                self._tokens[row] = ids
        return torch.stack([self._tokens[int(r)] for r in rows])


def _rows(emb: Any, rows: np.ndarray, device: torch.device) -> Tensor | None:
    """Gather cached rows (plain data: no grad ever reaches them) as float32 on ``device``.

    Rows travel in the store's dtype (float16 embeddings: half the host memory and transfer)
    and are converted on the device.
    """
    if emb is None:
        return None
    values = torch.from_numpy(np.ascontiguousarray(emb[rows])).to(device, non_blocking=True)
    return values.float() if values.is_floating_point() else values


def _view_rows(views: Any, rows: np.ndarray, view: np.ndarray, device: torch.device) -> Tensor:
    """Row ``rows[j]``'s embedding of view ``view[j]`` from a ``[N, V, D]`` store, as ``_rows``."""
    values = np.asarray(views[rows])[np.arange(len(rows)), view]
    return torch.from_numpy(np.ascontiguousarray(values)).to(device, non_blocking=True).float()


def image_targets(t: TeacherTargets, image_rows: np.ndarray, view: np.ndarray | None,
                  device: torch.device) -> dict[str, Tensor | None]:
    """Per-image teacher rows of a batch: ``image_emb`` and the role image fields, of each
    sample's replayed view where its store holds views (``view`` is None: view 0)."""
    replay = view is not None and t.image_views is not None
    out = {"image_emb": (_view_rows(t.image_views, image_rows, view, device) if replay
                         else _rows(t.image_emb, image_rows, device))}
    for name, emb in t.role_emb.items():
        if BY_NAME[name].rows == "image":
            views = t.role_views.get(name) if replay else None
            out[name] = (_view_rows(views, image_rows, view, device) if views is not None
                         else _rows(emb, image_rows, device))
    return out


def ensemble_fields(t: TeacherTargets, first: tuple[Tensor, Tensor], image_rows: np.ndarray,
                    text_rows: np.ndarray, view: np.ndarray | None, device: torch.device) -> dict[str, Any]:
    """Every ensemble member's rows of the batch (one read per teacher: ``first`` holds the
    first member's, already read as the batch's own teacher fields), or nothing."""
    if not t.ensemble:
        return {}
    lead = t.members[0]  # the image_emb source (open_targets checks); text_emb too unless a
    # text-only cache is listed before it
    text = first[1] if t.sources.get("text_emb") == lead.path else _rows(lead.text_emb, text_rows, device)
    images, texts = [first[0]], [text]
    for m in t.members[1:]:
        replay = view is not None and m.image_views is not None
        images.append(_view_rows(m.image_views, image_rows, view, device) if replay
                      else _rows(m.image_emb, image_rows, device))
        texts.append(_rows(m.text_emb, text_rows, device))
    return {"ensemble_image_emb": tuple(images), "ensemble_text_emb": tuple(texts),
            "ensemble_logit_scale": tuple(float(m.logit_scale) for m in t.members)}


def _encode(student: Student, pixels: Tensor, tokens: Tensor, levels: bool
            ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    if not levels:
        return student.encode_image(pixels), student.encode_text(tokens), (), ()
    image_emb, image_levels = student.encode_image_levels(pixels)
    text_emb, text_levels = student.encode_text_levels(tokens)
    return image_emb, text_emb, tuple(image_levels), tuple(text_levels)


def candidate_fields(plan: BatchPlan, student: Student, image_rows: np.ndarray,
                     device: torch.device) -> dict[str, Tensor]:
    """Student embeddings of each image's K candidate captions and the teachers' view of them."""
    t = plan.targets
    cand = t.topk["i2t_topk_idx"][image_rows][:, :plan.candidates]         # [B, K], -1 = none
    valid = (cand >= 0) & t.text_valid[np.maximum(cand, 0)]
    safe = np.where(valid, cand, 0)
    tokens = plan.tokens(student, safe.reshape(-1)).to(device)
    cand_emb = student.encode_text(tokens).float().reshape(*cand.shape, -1)
    sim = np.einsum("bd,bkd->bk", t.image_emb[image_rows].astype(np.float32),
                    t.text_emb[safe].astype(np.float32))
    out = {"cand_text_emb": cand_emb,
           "cand_teacher_sim": torch.from_numpy(sim.astype(np.float32)).to(device),
           "cand_is_positive": torch.from_numpy(t.text_to_image[safe] == image_rows[:, None]).to(device),
           "cand_valid": torch.from_numpy(valid).to(device)}
    if plan.itm_candidates:
        out["cand_itm"] = _rows(t.cand_itm, image_rows, device)[:, :plan.itm_candidates]
    return out


def assemble(plan: BatchPlan, student: Student, batch: dict[str, Any], device: torch.device,
             amp: bool) -> DistillBatch:
    """Run the student on a collated batch and pair its outputs with the cached targets."""
    t = plan.targets
    pixels = batch["pixels"].to(device, non_blocking=True)
    tokens = student.tokenize(batch["captions"]).to(device)
    image_rows, text_rows = batch["image_rows"].numpy(), batch["text_rows"].numpy()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        image_emb, text_emb, image_levels, text_levels = _encode(student, pixels, tokens, plan.levels)
        extra = candidate_fields(plan, student, image_rows, device) if plan.candidates else {}
    view = batch["views"].numpy() if plan.views else None
    images = image_targets(t, image_rows, view, device)
    roles = {BY_NAME[name].batch: images[name] if name in images else _rows(emb, text_rows, device)
             for name, emb in t.role_emb.items() if BY_NAME[name].batch is not None}
    teacher_image, teacher_text = images["image_emb"], _rows(t.text_emb, text_rows, device)
    members = ensemble_fields(t, (teacher_image, teacher_text), image_rows, text_rows, view, device)
    return DistillBatch(
        image_emb.float(), text_emb.float(), student.logit_scale.exp(),
        teacher_image, teacher_text,
        t.logit_scale, batch["image_rows"].to(device), batch["text_rows"].to(device),
        image_levels=tuple(x.float() for x in image_levels),
        text_levels=tuple(x.float() for x in text_levels),
        **roles, **members, **{k: (v.float() if v.is_floating_point() else v) for k, v in extra.items()})
