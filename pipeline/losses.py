"""Distillation objectives computed from student embeddings and cached teacher embeddings.

Each loss is an ``nn.Module`` built by name from ``LOSSES``; ``forward(batch)`` returns a scalar.
A loss declares the cache fields it reads in ``requires`` so a run missing one fails before its
first step. ``build_objective`` turns the ``train.losses`` list of params into a weighted sum.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import CacheError
from pipeline.registry import Registry

# Which stage writes each cache field: named in the error when a loss needs a missing one.
FIELD_SOURCES: dict[str, str] = {
    "image_emb": "stage `teach` with a teacher that has the image modality",
    "text_emb": "stage `teach` with a teacher that has the text modality",
}
NEIGHBOR_SOURCE = "stage `neighbors` (top-k neighbours of the teacher cache)"


@dataclass
class DistillBatch:
    """One training batch as the losses see it: row ``j`` of every tensor is one (image, caption)."""

    image_emb: Tensor                   # student image embeddings [B, Ds], L2-normalised
    text_emb: Tensor                    # student text embeddings [B, Ds]; caption j belongs to image j
    logit_scale: Tensor                 # student's exp(scale), a scalar
    teacher_image_emb: Tensor | None    # [B, Dt] float32 from the cache (no grad)
    teacher_text_emb: Tensor | None     # [B, Dt] float32 from the cache (no grad)
    teacher_logit_scale: float | None   # the teacher's own softmax scale, from the cache attrs
    image_rows: Tensor                  # cache image rows [B] (for losses using neighbours)
    text_rows: Tensor                   # cache text rows [B]


@dataclass(frozen=True)
class LossTerm:
    """One entry of ``train.losses`` in params.yaml."""

    name: str                                               # registry name, e.g. "contrastive"
    weight: float = 1.0                                     # multiplier in the summed objective
    kwargs: dict[str, Any] = field(default_factory=dict)    # passed to the loss factory


class DistillLoss(nn.Module):
    """Base class: ``requires`` names the cache fields ``forward`` reads."""

    requires: frozenset[str] = frozenset()
    # True when the loss compares teacher image and text embeddings with each other, so both
    # must come from one teacher (one embedding space).
    cross_modal_teacher: bool = False

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


LOSSES: Registry[DistillLoss] = Registry("loss")


def _student_logits(batch: DistillBatch, max_logit_scale: float) -> Tensor:
    """Image->text logits of the student, scale clamped as in CLIP training."""
    scale = batch.logit_scale.clamp(max=max_logit_scale)
    return scale * batch.image_emb @ batch.text_emb.T


class ContrastiveLoss(DistillLoss):
    """Symmetric InfoNCE on the student's own in-batch pairs (needs no teacher)."""

    requires = frozenset()

    def __init__(self, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, batch: DistillBatch) -> Tensor:
        logits = _student_logits(batch, self.max_logit_scale)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


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
                 modalities: Sequence[str] = ("image", "text")) -> None:
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
        self.proj = nn.ModuleDict({m: nn.Linear(student_dim, teacher_dims[m])
                                   for m in self.modalities if m in teacher_dims})

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
                 modalities: Sequence[str] = ("image", "text")) -> FeatureLoss:
    """Embedding regression through a learnable Linear(student_dim, teacher_dim)."""
    return FeatureLoss(student_dim, teacher_dims, metric, modalities)


def _row_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    teacher_logp = F.log_softmax(teacher_logits, dim=-1)
    student_logp = F.log_softmax(student_logits, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


class SimilarityKL(DistillLoss):
    """Match the student's in-batch image->text and text->image softmax to the teacher's."""

    requires = frozenset({"image_emb", "text_emb"})
    cross_modal_teacher = True

    def __init__(self, teacher_temperature: float | None = None,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.teacher_temperature, self.max_logit_scale = teacher_temperature, max_logit_scale

    def _teacher_scale(self, batch: DistillBatch) -> float:
        if self.teacher_temperature is not None:
            return 1.0 / self.teacher_temperature
        if batch.teacher_logit_scale is None:
            raise CacheError("similarity_kl: the cache has no logit_scale; "
                             "set kwargs.teacher_temperature")
        return float(batch.teacher_logit_scale)

    def forward(self, batch: DistillBatch) -> Tensor:
        teacher_sim = batch.teacher_image_emb @ batch.teacher_text_emb.T
        teacher_logits = self._teacher_scale(batch) * teacher_sim
        student_logits = _student_logits(batch, self.max_logit_scale)
        i2t = _row_kl(teacher_logits, student_logits)
        t2i = _row_kl(teacher_logits.T, student_logits.T)
        return (i2t + t2i) / 2


@LOSSES.register("similarity_kl")
def make_similarity_kl(teacher_temperature: float | None = None,
                       max_logit_scale: float = 100.0) -> SimilarityKL:
    """KL(teacher || student) of in-batch similarity distributions, both directions averaged.

    Teacher logits use the cache's ``logit_scale`` unless ``teacher_temperature`` is given.
    """
    return SimilarityKL(teacher_temperature, max_logit_scale)


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms; ``forward`` also returns each unweighted term."""

    def __init__(self, terms: Mapping[str, DistillLoss], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(t.requires for t in self.terms.values()))

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        values = {name: term(batch) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values


def _term_names(terms: Sequence[LossTerm]) -> list[str]:
    """Unique term names: the loss name, suffixed ``_2``, ``_3``... when it repeats."""
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        seen[term.name] = seen.get(term.name, 0) + 1
        names.append(term.name if seen[term.name] == 1 else f"{term.name}_{seen[term.name]}")
    return names


def _call_factory(name: str, kwargs: Mapping[str, Any], context: Mapping[str, Any]) -> DistillLoss:
    """Call a loss factory, adding the dims it asks for (``student_dim``, ``teacher_dims``)."""
    factory = LOSSES.get(name)
    accepted = inspect.signature(factory).parameters
    injected = {k: v for k, v in context.items() if k in accepted and k not in kwargs}
    try:
        return factory(**kwargs, **injected)
    except TypeError as exc:
        raise TypeError(f"loss {name!r}: {exc}; accepted kwargs: {sorted(accepted)}") from None


def build_objective(terms: Iterable[LossTerm | Mapping[str, Any]], student_dim: int,
                    teacher_dims: Mapping[str, int] | None = None) -> CombinedLoss:
    """Build the weighted objective from ``train.losses`` entries (``{name, weight, kwargs}``).

    Unknown names raise ``UnknownNameError`` listing the registered losses.
    """
    terms = [t if isinstance(t, LossTerm) else LossTerm(**t) for t in terms]
    if not terms:
        raise ValueError("train.losses is empty: list at least one loss, e.g. {name: contrastive}")
    context = {"student_dim": student_dim, "teacher_dims": dict(teacher_dims or {})}
    names = _term_names(terms)
    modules = {n: _call_factory(t.name, t.kwargs, context) for n, t in zip(names, terms)}
    return CombinedLoss(modules, {n: float(t.weight) for n, t in zip(names, terms)})


def field_source(name: str) -> str:
    """The stage that writes cache field ``name``."""
    if "topk" in name:
        return NEIGHBOR_SOURCE
    return FIELD_SOURCES.get(name, "an earlier stage")


def check_requirements(objective: CombinedLoss, available: Iterable[str],
                       caches: Sequence[str] = ()) -> None:
    """Fail before training if a loss needs a cache field no configured cache provides."""
    available = set(available)
    for name, term in objective.terms.items():
        for needed in sorted(term.requires - available):
            raise CacheError(
                f"loss {name!r} needs cache field {needed!r}, which the configured cache(s) "
                f"{list(caches)} do not provide (available: {sorted(available)}); it is made by "
                f"{field_source(needed)}: run it and add its output to train.caches")

