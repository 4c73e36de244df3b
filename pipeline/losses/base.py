"""What every loss shares: the batch, the registry, the weighted objective, requirement checks.

A loss is an ``nn.Module`` built by name from ``LOSSES``; ``forward(batch)`` returns a scalar. It
declares the cache fields it reads in ``requires`` (and, when it reads each anchor's cached
candidate captions, how many in ``candidates`` / ``itm_candidates``) so that a run missing one
fails before its first step. ``build_objective`` turns the ``train.losses`` list of params into
a ``CombinedLoss`` whose weights are set by a balancer (``fixed`` by default).
"""
from __future__ import annotations

import inspect
from dataclasses import KW_ONLY, dataclass, field, make_dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import setting
from pipeline.errors import CacheError
from pipeline.fields import ROLE_BATCH_FIELDS, made_by
from pipeline.losses.balancer import BALANCERS, LossBalancer
from pipeline.registry import Registry

# Stand-in for -inf in masked softmaxes: finite, so masked entries give 0 * finite in the
# backward pass instead of 0 * nan.
MASKED_LOGIT = -1e9


@dataclass
class _BatchFields:
    """One training batch as the losses see it: row ``j`` of every tensor is one (image, caption).

    The first eight fields are positional; the rest are keyword-only and optional, filled by the
    trainer only when a configured loss reads them. :class:`DistillBatch` adds one keyword field
    per role-teacher field of :data:`pipeline.fields.FIELDS` (``vision_teacher_emb [B, Dv]``,
    ``text_teacher_emb [B, Dl]``, ``single_image_emb``/``single_text_emb [B, Dq]``...: the
    batch's rows of that store, float32, no grad).
    """

    image_emb: Tensor                   # student image embeddings [B, Ds], L2-normalised
    text_emb: Tensor                    # student text embeddings [B, Ds]; caption j belongs to image j
    logit_scale: Tensor                 # student's exp(scale), a scalar
    teacher_image_emb: Tensor | None    # [B, Dt] float32 from the cache (no grad)
    teacher_text_emb: Tensor | None     # [B, Dt] float32 from the cache (no grad)
    teacher_logit_scale: float | None   # the teacher's own softmax scale, from the cache attrs
    image_rows: Tensor                  # cache image rows [B] (for losses using neighbours)
    text_rows: Tensor                   # cache text rows [B]
    _: KW_ONLY
    # Student intermediate features, one [B, d_l] tensor per level, pooled and NOT normalised,
    # shallow to deep, the final embedding excluded.
    image_levels: tuple[Tensor, ...] = ()
    text_levels: tuple[Tensor, ...] = ()
    # Each anchor image's K candidate captions = the cross-modal teacher's top-K image->text
    # neighbours, in the teacher's rank order:
    cand_text_emb: Tensor | None = None        # [B, K, Ds] STUDENT embeddings, L2-normalised
    cand_teacher_sim: Tensor | None = None     # [B, K] teacher cosine image_i . text_cand
    cand_is_positive: Tensor | None = None     # [B, K] bool: a caption of the anchor itself
    cand_valid: Tensor | None = None           # [B, K] bool
    cand_itm: Tensor | None = None             # [B, K_itm] single-stream ITM logits, K_itm <= K
    # A teacher ensemble (several cross-modal caches in train.caches): every member's rows,
    # the first member's being teacher_image_emb / teacher_text_emb / teacher_logit_scale.
    ensemble_image_emb: tuple[Tensor, ...] = ()  # [B, D_t] per teacher
    ensemble_text_emb: tuple[Tensor, ...] = ()
    ensemble_logit_scale: tuple[float, ...] = ()

    @property
    def teachers(self) -> int:
        """Cross-modal teachers in the batch (1 without an ensemble)."""
        return max(1, len(self.ensemble_image_emb))

    def member(self, i: int) -> Any:
        """This batch as seen with ensemble member ``i`` as the only cross-modal teacher."""
        if not self.ensemble_image_emb:
            return self
        return replace(self, teacher_image_emb=self.ensemble_image_emb[i],
                       teacher_text_emb=self.ensemble_text_emb[i],
                       teacher_logit_scale=self.ensemble_logit_scale[i],
                       ensemble_image_emb=(), ensemble_text_emb=(), ensemble_logit_scale=())


# The batch with one attribute per role-teacher field of the field table (see _BatchFields).
DistillBatch = make_dataclass(
    "DistillBatch", [(f.batch, "Tensor | None", field(default=None, kw_only=True))
                     for f in ROLE_BATCH_FIELDS],
    bases=(_BatchFields,), namespace={"__doc__": _BatchFields.__doc__, "__module__": __name__})


@dataclass(frozen=True)
class LossTerm:
    """One entry of ``train.losses`` in params.yaml."""

    name: str                                               # registry name, e.g. "contrastive"
    weight: float = setting(1.0, minimum=0)                 # multiplier in the summed objective
    kwargs: dict[str, Any] = field(default_factory=dict)    # passed to the loss factory


class DistillLoss(nn.Module):
    """Base class: ``requires`` names the cache fields ``forward`` reads."""

    requires: frozenset[str] = frozenset()
    # True when the loss compares teacher image and text embeddings with each other, so both
    # must come from one teacher (one embedding space).
    cross_modal_teacher: bool = False
    # How an ensemble of cross-modal teachers is combined: "softmax" losses read every
    # member's similarity distribution themselves (teacher_similarity_logits); "terms" losses
    # get one copy (own projection heads) per teacher, their values averaged (EnsembleTerm).
    ensemble: str = "terms"
    candidates: int = 0        # candidate captions per anchor read from the batch (K)
    itm_candidates: int = 0    # single-stream ITM scores per anchor read (K_itm)
    uses_levels: bool = False  # reads the student's intermediate features

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logged(self) -> dict[str, float]:
        """Learned scalars worth a column in the training log (e.g. ``{"lambda": 0.4}``)."""
        return {}


LOSSES: Registry[DistillLoss] = Registry("loss")

# Cache fields of the cross-modal teacher: a loss reading one is combined over an ensemble.
CROSS_MODAL_FIELDS = frozenset({"image_emb", "text_emb"})


class EnsembleTerm(DistillLoss):
    """A "terms" loss over a teacher ensemble: copy ``i`` (its own heads) distils from member
    ``i``; the value is the mean of the copies' values."""

    def __init__(self, copies: Sequence[DistillLoss]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        first = copies[0]
        self.requires, self.cross_modal_teacher = first.requires, first.cross_modal_teacher
        self.candidates, self.itm_candidates = first.candidates, first.itm_candidates
        self.uses_levels = first.uses_levels

    def forward(self, batch: DistillBatch) -> Tensor:
        if batch.teachers != len(self.copies):
            raise CacheError(f"the batch holds {batch.teachers} cross-modal teacher(s), the loss "
                             f"was built for {len(self.copies)}")
        return torch.stack([c(batch.member(i)) for i, c in enumerate(self.copies)]).mean()

    def logged(self) -> dict[str, float]:
        return self.copies[0].logged()


def need(batch: DistillBatch, name: str, loss: str) -> Any:
    """Batch field ``name``, or a CacheError naming it and the stage that makes it."""
    value = getattr(batch, name)
    if value is None or (isinstance(value, tuple) and not value):
        cache_field = {"cand_text_emb": "i2t_topk_idx", "cand_teacher_sim": "i2t_topk_idx",
                       "cand_valid": "i2t_topk_idx", "cand_is_positive": "i2t_topk_idx",
                       "cand_itm": "i2t_cand_itm"}.get(name, name)
        raise CacheError(f"loss {loss!r}: the batch has no {name!r}; it comes from "
                         f"{made_by(cache_field)}")
    return value


def student_scale(batch: DistillBatch, max_logit_scale: float,
                  temperature: float | None = None) -> Tensor | float:
    """The student's softmax scale: ``1/temperature`` when fixed, else its clamped logit scale."""
    if temperature is not None:
        return 1.0 / temperature
    return batch.logit_scale.clamp(max=max_logit_scale)


def teacher_scale(batch: DistillBatch, temperature: float | None, loss: str) -> float:
    """The teacher's softmax scale: ``1/temperature`` when given, else the cache's logit_scale."""
    if temperature is not None:
        return 1.0 / temperature
    if batch.teacher_logit_scale is None:
        raise CacheError(f"{loss}: the cache has no logit_scale; set kwargs.teacher_temperature")
    return float(batch.teacher_logit_scale)


def teacher_similarity_logits(batch: DistillBatch, temperature: float | None,
                              loss: str) -> tuple[Tensor, Tensor]:
    """The teacher's in-batch ``(image->text, text->image)`` logits.

    One teacher: ``scale * t_I t_T^T`` and its transpose. An ensemble: the log of the average of
    the teachers' softmax distributions, each teacher at its own ``logit_scale`` (or
    ``1/temperature`` when given), as DataCompDR averages its teachers after the softmax; a
    softmax of these logits gives back that average.
    """
    if not batch.ensemble_image_emb:
        logits = teacher_scale(batch, temperature, loss) * batch.teacher_image_emb @ batch.teacher_text_emb.T
        return logits, logits.T
    i2t = t2i = None
    for image, text, own in zip(batch.ensemble_image_emb, batch.ensemble_text_emb,
                                batch.ensemble_logit_scale):
        logits = (1.0 / temperature if temperature is not None else own) * image @ text.T
        p, q = F.softmax(logits, dim=-1), F.softmax(logits.T, dim=-1)
        i2t, t2i = (p, q) if i2t is None else (i2t + p, t2i + q)
    n = len(batch.ensemble_image_emb)
    # clamped: an underflowed 0 gives a finite, masked-like logit instead of -inf
    return ((i2t / n).log().clamp(min=MASKED_LOGIT), (t2i / n).log().clamp(min=MASKED_LOGIT))


def info_nce(anchor: Tensor, other: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: row i of ``anchor`` matches row i of ``other`` among the batch."""
    logits = scale * anchor @ other.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def row_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)), each over its ``mask`` entries.

    Rows whose mask is all False are left out of the mean; with none left the loss is 0.
    """
    if mask is None:
        mask = torch.ones_like(teacher_logits, dtype=torch.bool)
    teacher_logp = F.log_softmax(teacher_logits.masked_fill(~mask, MASKED_LOGIT), dim=-1)
    student_logp = F.log_softmax(student_logits.masked_fill(~mask, MASKED_LOGIT), dim=-1)
    per_entry = teacher_logp.exp() * (teacher_logp - student_logp)
    per_row = torch.where(mask, per_entry, torch.zeros_like(per_entry)).sum(-1)
    rows = mask.any(-1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms; ``forward`` also returns each unweighted term.

    The weights come from ``balancer`` (the configured ones under ``fixed``); its state is part
    of ``state_dict`` so a resumed run continues with the same weights.
    """

    def __init__(self, terms: Mapping[str, DistillLoss], weights: Mapping[str, float],
                 balancer: LossBalancer | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self.balancer = balancer or BALANCERS.create("fixed", names=list(self.terms),
                                                     weights=self.weights)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(t.requires for t in self.terms.values()))

    @property
    def candidates(self) -> int:
        """Candidate captions per anchor the terms need (0 when none reads candidates)."""
        return max((t.candidates for t in self.terms.values()), default=0)

    @property
    def itm_candidates(self) -> int:
        """Single-stream ITM scores per anchor the terms need."""
        return max((t.itm_candidates for t in self.terms.values()), default=0)

    @property
    def uses_levels(self) -> bool:
        """True when a term reads the student's intermediate features."""
        return any(t.uses_levels for t in self.terms.values())

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        values = {name: term(batch) for name, term in self.terms.items()}
        weights = self.balancer(values)
        total = sum(weights[name] * value for name, value in values.items())
        return total, values

    def logged(self) -> dict[str, float]:
        """Current weights (``w_<term>``) and the terms' learned scalars (``<key>_<term>``)."""
        out = {f"w_{name}": float(w) for name, w in self.balancer.current().items()}
        for name, term in self.terms.items():
            out.update({f"{key}_{name}": float(v) for key, v in term.logged().items()})
        return out


def _term_names(terms: Sequence[LossTerm]) -> list[str]:
    """Unique term names: the loss name, suffixed ``_2``, ``_3``... when it repeats."""
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        seen[term.name] = seen.get(term.name, 0) + 1
        names.append(term.name if seen[term.name] == 1 else f"{term.name}_{seen[term.name]}")
    return names


def _call_factory(name: str, kwargs: Mapping[str, Any], context: Mapping[str, Any]) -> DistillLoss:
    """Call a loss factory, adding the context it asks for (``student_dim``, ``teacher_dims``,
    ``level_dims``)."""
    factory = LOSSES.get(name)
    accepted = inspect.signature(factory).parameters
    injected = {k: v for k, v in context.items() if k in accepted and k not in kwargs}
    try:
        return factory(**kwargs, **injected)
    except TypeError as exc:
        raise TypeError(f"loss {name!r}: {exc}; accepted kwargs: {sorted(accepted)}") from None


def build_objective(terms: Iterable[LossTerm | Mapping[str, Any]], student_dim: int,
                    teacher_dims: Mapping[str, int] | None = None, *,
                    level_dims: Mapping[str, Sequence[int]] | None = None,
                    balancer: str | None = None,
                    balancer_kwargs: Mapping[str, Any] | None = None,
                    ensemble_dims: Sequence[Mapping[str, int]] = ()) -> CombinedLoss:
    """Build the weighted objective from ``train.losses`` entries (``{name, weight, kwargs}``).

    teacher_dims: embedding size per teacher field (``image``, ``text`` of the cross-modal
        teacher; ``vision_teacher``, ``text_teacher``, ``single_image``, ``single_text``).
    level_dims: the student's intermediate feature sizes, ``{"image": [...], "text": [...]}``.
    balancer: ``BALANCERS`` name setting the weights during training (None = ``fixed``).
    ensemble_dims: with two or more entries (a teacher ensemble), each member's teacher dims; a
        "terms" loss reading the cross-modal teacher is built once per member (``EnsembleTerm``).
    Unknown loss or balancer names raise ``UnknownNameError`` listing the registered ones.
    """
    terms = [t if isinstance(t, LossTerm) else LossTerm(**t) for t in terms]
    if not terms:
        raise ValueError("train.losses is empty: list at least one loss, e.g. {name: contrastive}")
    context = {"student_dim": student_dim, "teacher_dims": dict(teacher_dims or {}),
               "level_dims": {k: list(v) for k, v in (level_dims or {}).items()}}
    names = _term_names(terms)
    modules = {n: _call_factory(t.name, t.kwargs, context) for n, t in zip(names, terms)}
    if len(ensemble_dims) > 1:
        for n, t in zip(names, terms):
            first = modules[n]
            if first.ensemble == "terms" and first.requires & CROSS_MODAL_FIELDS:
                rest = [_call_factory(t.name, t.kwargs, context | {"teacher_dims": dict(d)})
                        for d in ensemble_dims[1:]]
                modules[n] = EnsembleTerm([first, *rest])
    weights = {n: float(t.weight) for n, t in zip(names, terms)}
    factory = BALANCERS.get(balancer or "fixed")
    made = factory(names=names, weights=weights, **dict(balancer_kwargs or {}))
    return CombinedLoss(modules, weights, made)


def check_requirements(objective: CombinedLoss, available: Iterable[str],
                       caches: Sequence[str] = (), *, neighbor_k: int | None = None,
                       itm_k: int | None = None) -> None:
    """Fail before training if a loss needs a cache field no configured cache provides.

    neighbor_k / itm_k: candidates per image the neighbour / ITM caches hold, when known; a loss
    asking for more is refused too.
    """
    available = set(available)
    for name, term in objective.terms.items():
        for needed in sorted(term.requires - available):
            raise CacheError(
                f"loss {name!r} needs cache field {needed!r}, which the configured cache(s) "
                f"{list(caches)} do not provide (available: {sorted(available)}); it is made by "
                f"{made_by(needed)}: run it and point the training config at its output")
        for count, have, cache_field in ((term.candidates, neighbor_k, "i2t_topk_idx"),
                                         (term.itm_candidates, itm_k, "i2t_cand_itm")):
            if have is not None and count > have:
                raise CacheError(
                    f"loss {name!r} reads {count} candidates per image from {cache_field!r}, but "
                    f"the cache holds {have}; rerun {made_by(cache_field)} with k >= {count} "
                    "or lower the loss's kwargs")


PROJECTIONS = ("auto", "linear", "identity")


def projection_heads(in_dim: int, teacher_dims: Mapping[str, int], targets: Mapping[str, str],
                     projection: str = "auto") -> nn.ModuleDict:
    """One head per ``{head name: teacher key}`` mapping student embeddings to the teacher's dim:
    ``linear`` a learnable ``Linear(in_dim, teacher_dims[key])``; ``identity`` none (the student's
    embedding is compared as it is: the dims must agree); ``auto`` (the default) identity where
    the dims agree, else linear. Where the student shares its teacher's space (a student that
    inherited the teacher's heads), a learned head would let the student's own space drift away
    from the teacher's; where the dims differ, a head is needed.

    A teacher key without a dim (its cache is not configured) gets no head: the loss's
    ``requires`` makes ``check_requirements`` refuse the run before any forward.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection {projection!r} is not one of {list(PROJECTIONS)}")
    heads = {}
    for name, key in targets.items():
        if key not in teacher_dims:
            continue
        same = teacher_dims[key] == in_dim
        if projection == "identity" and not same:
            raise ValueError(f"projection identity: the student's {in_dim}-d embedding cannot be "
                             f"compared with the {teacher_dims[key]}-d teacher {key!r}; use linear")
        heads[name] = nn.Identity() if same and projection != "linear" else nn.Linear(in_dim, teacher_dims[key])
    return nn.ModuleDict(heads)


def check_modalities(loss: str, modalities: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` as a tuple, refusing anything but a non-empty subset of image, text."""
    unknown = sorted(set(modalities) - {"image", "text"})
    if unknown or not modalities:
        raise ValueError(f"{loss}: modalities must be a non-empty subset of image, text; "
                         f"got {list(modalities)}")
    return tuple(modalities)
