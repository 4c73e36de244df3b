"""Teacher targets of one dataset split, merged from every store a training run reads.

A run distils from a cross-modal teacher's cache(s) (``train.caches``) and, for some losses, from
more stores of the same split: a vision-only and a text-only teacher (structure-aware
distillation), a single-stream teacher's unimodal features and its image-text-matching scores
(MCAD), and the cross-modal teacher's top-k neighbours (hard negatives, candidates). Every store
is checked against the split's dataset fingerprint and the others' row ids before a step runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.cache import TeacherCache
from pipeline.data.shards import Manifest
from pipeline.errors import CacheError

# Role stores: train config key -> (cache field -> modality of the role teacher read for it).
ROLE_FIELDS: dict[str, dict[str, str]] = {
    "vision_teacher": {"vision_teacher_emb": "image"},
    "text_teacher": {"text_teacher_emb": "text"},
    "single_stream_teacher": {"single_image_emb": "image", "single_text_emb": "text"},
}


@dataclass(frozen=True)
class TargetSources:
    """Paths of the stores a run reads (the ``train`` params of the same names)."""

    caches: tuple[str, ...]
    vision_teacher: str | None = None
    text_teacher: str | None = None
    single_stream_teacher: str | None = None
    neighbors: str | None = None
    itm_scores: str | None = None


@dataclass
class TeacherTargets:
    """Teacher embeddings and row lookups merged from the stores of one dataset split.

    Each cross-modal field comes from the first listed cache holding it; a row is usable only if
    every teacher cache marks it valid.
    """

    paths: tuple[str, ...]
    image_emb: np.ndarray | None
    text_emb: np.ndarray | None
    logit_scale: float | None
    image_rows: dict[str, int]
    text_rows: dict[str, int]
    text_to_image: np.ndarray
    image_valid: np.ndarray
    text_valid: np.ndarray
    sources: dict[str, str]                # cache field -> path of the store providing it
    teacher_fingerprints: dict[str, str]   # path -> teacher (or store) fingerprint
    role_emb: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. vision_teacher_emb
    topk: dict[str, np.ndarray] = field(default_factory=dict)      # i2t_topk_idx, i2i_topk_idx
    cand_itm: np.ndarray | None = None     # [N_images, k_itm] single-stream ITM log-odds

    @property
    def available(self) -> set[str]:
        """Cache fields present (what ``DistillLoss.requires`` is checked against)."""
        return set(self.sources)

    @property
    def dims(self) -> dict[str, int]:
        """Teacher embedding width per field family (``image``, ``text``, ``vision_teacher``...)."""
        arrays = {"image": self.image_emb, "text": self.text_emb}
        arrays.update({name.removesuffix("_emb"): a for name, a in self.role_emb.items()})
        return {m: a.shape[1] for m, a in arrays.items() if a is not None}

    @property
    def paired(self) -> bool:
        """Whether image and text embeddings come from one teacher (one embedding space)."""
        return self.sources.get("image_emb") is not None and \
            self.sources.get("image_emb") == self.sources.get("text_emb")

    def usable_image_rows(self) -> np.ndarray:
        """Rows of images that are valid and keep at least one valid caption."""
        with_caption = np.bincount(self.text_to_image[self.text_valid],
                                   minlength=len(self.image_valid)) > 0
        return np.flatnonzero(with_caption & self.image_valid)

    def usable_images(self) -> int:
        """Number of images that are valid and keep at least one valid caption."""
        return len(self.usable_image_rows())


def _open_caches(paths: Sequence[str], manifest: Manifest) -> list[TeacherCache]:
    caches = [TeacherCache.open(p, expect_dataset=manifest.fingerprint) for p in paths]
    first = caches[0]
    for cache in caches:
        if not (np.array_equal(cache.image_ids, first.image_ids)
                and np.array_equal(cache.text_ids, first.text_ids)):
            raise CacheError(f"{cache.path}: row ids differ from {first.path} although both "
                             "claim the same dataset; rebuild them with `distill teach`")
    return caches


def open_targets(paths: Sequence[str], manifest: Manifest,
                 sources: TargetSources | None = None) -> TeacherTargets:
    """Open the caches of ``paths`` (and the role stores of ``sources``) for ``manifest``."""
    if not paths:
        raise CacheError("train.caches is empty: list at least one teacher cache (a .zarr store)")
    caches = _open_caches(list(paths), manifest)
    first = caches[0]
    found: dict[str, str] = {}
    for cache in caches:
        for name, arr in (("image_emb", cache.image_emb), ("text_emb", cache.text_emb)):
            if arr is not None and name not in found:
                found[name] = str(cache.path)
    by_path = {str(c.path): c for c in caches}
    image_emb, text_emb = (getattr(by_path[found[f]], f) if f in found else None
                           for f in ("image_emb", "text_emb"))
    both = [c for c in caches if c.image_emb is not None and c.text_emb is not None]
    targets = TeacherTargets(
        paths=tuple(str(p) for p in paths), image_emb=image_emb, text_emb=text_emb,
        logit_scale=(both[0] if both else first).logit_scale,
        image_rows=first.image_row(), text_rows=first.text_row(),
        text_to_image=first.text_to_image,
        image_valid=np.logical_and.reduce([c.image_valid for c in caches]),
        text_valid=np.logical_and.reduce([c.text_valid for c in caches]),
        sources=found, teacher_fingerprints={str(c.path): c.teacher_fingerprint for c in caches})
    if sources is not None:
        _add_roles(targets, sources, manifest, first)
        _add_neighbors(targets, sources, manifest)
        _add_itm(targets, sources, manifest)
    return targets


def _add_roles(targets: TeacherTargets, sources: TargetSources, manifest: Manifest,
               reference: TeacherCache) -> None:
    """Attach the single-modal and single-stream teachers' embeddings."""
    for role, fields in ROLE_FIELDS.items():
        path = getattr(sources, role)
        if path is None:
            continue
        cache = _open_caches([str(reference.path), path], manifest)[1]
        for name, modality in fields.items():
            emb = getattr(cache, f"{modality}_emb")
            if emb is None:
                raise CacheError(f"train.{role} = {path}: this teacher has no {modality} "
                                 f"embeddings (modalities: {sorted(cache.modalities)}); point it "
                                 f"to a cache of a teacher with the {modality} modality")
            targets.role_emb[name] = emb
            targets.sources[name] = path
        targets.teacher_fingerprints[path] = cache.teacher_fingerprint
        targets.image_valid &= cache.image_valid
        targets.text_valid &= cache.text_valid


def _add_neighbors(targets: TeacherTargets, sources: TargetSources, manifest: Manifest) -> None:
    """Attach the cross-modal teacher's top-k neighbours (candidates, sampler)."""
    if sources.neighbors is None:
        return
    from pipeline.formats.neighbors import open_neighbors

    cross = targets.sources.get("image_emb")
    store = open_neighbors(sources.neighbors, expect_dataset=manifest.fingerprint,
                           expect_teacher=None if cross is None else targets.teacher_fingerprints[cross])
    attrs = store["attrs"]
    for name in ("i2t_topk_idx", "i2i_topk_idx", "t2i_topk_idx", "t2t_topk_idx"):
        if name in store:
            targets.topk[name] = store[name]
            targets.sources[name] = sources.neighbors
    targets.teacher_fingerprints[sources.neighbors] = attrs["source_teacher_fingerprint"]


def _add_itm(targets: TeacherTargets, sources: TargetSources, manifest: Manifest) -> None:
    """Attach the single-stream teacher's scores of each image's first candidates (MCAD)."""
    if sources.itm_scores is None:
        return
    from pipeline.formats.itm import open_itm_scores

    scores = open_itm_scores(sources.itm_scores, expect_dataset=manifest.fingerprint)
    topk = targets.topk.get("i2t_topk_idx")
    if topk is None:
        raise CacheError(f"train.itm_scores = {sources.itm_scores} scores the candidates of a "
                         "neighbours store: set train.neighbors to that store too")
    k = scores.cand_idx.shape[1]
    if topk.shape[1] < k or not np.array_equal(scores.cand_idx, topk[:, :k]):
        raise CacheError(f"train.itm_scores = {sources.itm_scores}: its candidates are not the "
                         f"first {k} neighbours of train.neighbors = {sources.neighbors}; rerun "
                         "`distill itm` on those neighbours (or `dvc repro`)")
    targets.cand_itm = scores.cand_itm
    targets.image_valid &= scores.image_valid  # images the single-stream teacher could not read
    targets.sources["i2t_cand_itm"] = sources.itm_scores
