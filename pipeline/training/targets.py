"""Teacher targets of one dataset split, merged from every store a training run reads.

A run distils from a cross-modal teacher's cache(s) (``train.caches``) and, for some losses, from
more stores of the same split: a vision-only and a text-only teacher (structure-aware
distillation), a single-stream teacher's unimodal features and its image-text-matching scores
(MCAD), and the cross-modal teacher's top-k neighbours (hard negatives, candidates). Every store
is checked against the split's dataset fingerprint and the others' row ids before a step runs.

Nothing large is loaded: embeddings, neighbour lists and ITM scores are
:class:`~pipeline.stores.rows.RowReader` views that read a batch's rows on demand (float16 embeddings
stay float16 on the host), and sample ids are matched to rows one tar shard at a time
(:class:`RowIndex`). What stays in memory is 1 byte per row of validity and 4 of
``text_to_image``, so a run's memory grows with the batch and the chunks in flight, not with
the store.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.data.manifest import Manifest
from pipeline.errors import CacheError
from pipeline.fields import BY_NAME, ROLE_STORES
from pipeline.stores.rows import (DEFAULT_CACHE_BYTES, RowReader, ViewRows, array_equal_blocks,
                                  paired_blocks)
from pipeline.stores.teacher import TeacherCache

log = logging.getLogger(__name__)

RowArray = Any  # numpy array or RowReader: both answer ``a[rows]``, ``a.shape``, ``a.dtype``

class RowIndex:
    """Stable ids → cache rows, resolved one tar shard at a time.

    ``teach`` numbers rows in manifest order, so the rows of shard ``s`` are the contiguous
    slice ``[offset_s, offset_s + n_s)`` (images; captions likewise). The ids of that slice are
    read from the store and matched by id, never by position, so a reordered stream still meets
    the right rows; only the last ``max_shards`` shards' lookups are kept.
    """

    def __init__(self, manifest: Manifest, image_ids: RowArray, text_ids: RowArray,
                 max_shards: int = 8) -> None:
        names = [s.name for s in manifest.shards]
        img_off, txt_off = manifest.image_offsets(), manifest.text_offsets()
        self.image_slices = {n: (img_off[i], img_off[i] + s.n_samples)
                             for i, (n, s) in enumerate(zip(names, manifest.shards))}
        self.text_slices = {n: (txt_off[i], txt_off[i] + s.n_texts)
                            for i, (n, s) in enumerate(zip(names, manifest.shards))}
        self.image_ids, self.text_ids, self.max_shards = image_ids, text_ids, max_shards
        self._maps: OrderedDict[tuple[str, str], dict[str, int]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict()}

    def shard_of(self, sample_or_text_id: str) -> str | None:
        """The manifest shard an id belongs to (ids are ``<shard>/<key>[#c]``; keys may hold ``/``)."""
        cut = sample_or_text_id.find("/")
        while cut > 0:
            if sample_or_text_id[:cut] in self.image_slices:
                return sample_or_text_id[:cut]
            cut = sample_or_text_id.find("/", cut + 1)
        return None

    def _map(self, kind: str, shard: str) -> dict[str, int]:
        key = (kind, shard)
        found = self._maps.get(key)
        if found is None:
            start, stop = (self.image_slices if kind == "image" else self.text_slices)[shard]
            ids = (self.image_ids if kind == "image" else self.text_ids)[start:stop]
            found = {str(i): start + j for j, i in enumerate(np.asarray(ids).tolist())}
            self._maps[key] = found
            while len(self._maps) > 2 * self.max_shards:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(key)
        return found

    def row(self, kind: str, ident: str) -> int | None:
        """Row of image id ``shard/key`` (kind ``image``) or caption id ``shard/key#c`` (``text``)."""
        shard = self.shard_of(ident)
        return None if shard is None else self._map(kind, shard).get(ident)

    def image_id(self, row: int) -> str:
        """Sample id of image row ``row``."""
        return str(self.image_ids[int(row)])


class IdRows:
    """A read-only mapping view ``id -> row`` of one kind of a :class:`RowIndex`."""

    def __init__(self, index: RowIndex, kind: str) -> None:
        self.index, self.kind = index, kind

    def get(self, ident: str, default: int | None = None) -> int | None:
        row = self.index.row(self.kind, ident)
        return default if row is None else row

    def __getitem__(self, ident: str) -> int:
        row = self.index.row(self.kind, ident)
        if row is None:
            raise KeyError(ident)
        return row

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, str) and self.index.row(self.kind, ident) is not None

    def __len__(self) -> int:
        return len(self.index.image_ids if self.kind == "image" else self.index.text_ids)

    def __iter__(self) -> Iterator[str]:
        ids = self.index.image_ids if self.kind == "image" else self.index.text_ids
        for start in range(0, len(ids), 1 << 16):
            yield from (str(i) for i in np.asarray(ids[start:start + (1 << 16)]).tolist())


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
class Member:
    """One cross-modal teacher of an ensemble (a cache with both modalities in ``train.caches``)."""

    path: str
    image_emb: RowArray                    # [N_images, D] view 0 (the plain image)
    text_emb: RowArray
    logit_scale: float
    image_views: RowArray | None = None    # [N_images, V, D] when the store holds views

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])


@dataclass
class TeacherTargets:
    """Teacher embeddings and row lookups merged from the stores of one dataset split.

    Each cross-modal field comes from the first listed cache holding it; a row is usable only if
    every teacher cache marks it valid. Every listed cache with both modalities is a member of
    the teacher ensemble (``members``; one member: no ensemble). With views (schema v2 stores),
    ``image_views``/``image_view`` hold every view's embedding and parameters.
    """

    paths: tuple[str, ...]
    image_emb: RowArray | None             # [N_images, D] float16 rows read on demand
    text_emb: RowArray | None
    logit_scale: float | None
    image_rows: IdRows                     # sample id -> image row (one tar shard at a time)
    text_rows: IdRows                      # caption id -> text row
    text_to_image: np.ndarray
    image_valid: np.ndarray
    text_valid: np.ndarray
    sources: dict[str, str]                # cache field -> path of the store providing it
    teacher_fingerprints: dict[str, str]   # path -> teacher (or store) fingerprint
    role_emb: dict[str, RowArray] = field(default_factory=dict)  # e.g. vision_teacher_emb
    topk: dict[str, RowArray] = field(default_factory=dict)      # i2t_topk_idx, i2i_topk_idx
    cand_itm: RowArray | None = None       # [N_images, k_itm] single-stream ITM log-odds
    row_index: RowIndex | None = None
    members: list[Member] = field(default_factory=list)  # the cross-modal teachers, first = image_emb's
    views: int = 1                         # views per image of the image_emb store
    image_views: RowArray | None = None    # [N_images, V, D] every view's teacher embedding
    image_view: RowArray | None = None     # [N_images, V, 5] every view's box and flags
    view_spec: Any = None                  # the ViewSpec that drew them
    role_views: dict[str, RowArray] = field(default_factory=dict)  # role image fields with the same views

    @property
    def ensemble(self) -> bool:
        """Whether several cross-modal teachers are distilled from at once."""
        return len(self.members) > 1

    def member_dims(self) -> list[dict[str, int]]:
        """Teacher dims as each ensemble member's losses see them (its own cross-modal width)."""
        return [self.dims | {"image": m.dim, "text": m.dim} for m in self.members]

    def row_arrays(self) -> list[tuple[str, str, RowArray]]:
        """``(field, row kind, array)`` of every per-row array: kind ``image`` arrays are indexed
        by a batch's image rows, ``text`` ones by its text rows."""
        out = [("image_emb", "image", self.image_emb), ("text_emb", "text", self.text_emb)]
        out += [(name, BY_NAME[name].rows, a) for name, a in (*self.role_emb.items(), *self.topk.items())]
        out.append(("i2t_cand_itm", "image", self.cand_itm))
        out += [(f"member{i}_{kind}", kind, getattr(m, f"{kind}_emb"))
                for i, m in enumerate(self.members[1:], 1) for kind in ("image", "text")]
        return [(name, kind, a) for name, kind, a in out if a is not None]

    def prefetch(self, image_rows: np.ndarray, text_rows: np.ndarray) -> None:
        """Start decoding the chunks of a coming batch's rows (background threads)."""
        for _, kind, arr in self.row_arrays():
            if isinstance(arr, (RowReader, ViewRows)):
                arr.prefetch(image_rows if kind == "image" else text_rows)

    @property
    def available(self) -> set[str]:
        """Cache fields present (what ``DistillLoss.requires`` is checked against)."""
        return set(self.sources)

    @property
    def dims(self) -> dict[str, int]:
        """Teacher embedding width per field family (``image``, ``text``, ``vision_teacher``...)."""
        arrays = {"image": self.image_emb, "text": self.text_emb}
        arrays.update({name.removesuffix("_emb"): a for name, a in self.role_emb.items()
                       if BY_NAME[name].embedding})
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


@dataclass(frozen=True)
class ReadOptions:
    """How a run reads its stores (``train.target_cache_mb``, ``train.verify_stores``)."""

    cache_bytes: int = DEFAULT_CACHE_BYTES  # decoded chunks kept per array
    verify: bool = True                     # read every chunk once at open (checksums, fill values)


def _open_cache(path: str, manifest: Manifest, read: ReadOptions) -> TeacherCache:
    return TeacherCache.open(path, expect_dataset=manifest.fingerprint, lazy=True,
                             verify=read.verify, cache_bytes=read.cache_bytes)


def _check_same_rows(cache: TeacherCache, first: TeacherCache) -> None:
    """Refuse a cache whose row ids differ from ``first``'s (compared block by block: bounded
    memory at any size)."""
    if not (array_equal_blocks(cache.image_ids, first.image_ids)
            and array_equal_blocks(cache.text_ids, first.text_ids)):
        raise CacheError(f"{cache.path}: row ids differ from {first.path} although both "
                         "claim the same dataset; rebuild them with `distill teach`")


def _open_caches(paths: Sequence[str], manifest: Manifest,
                 read: ReadOptions = ReadOptions()) -> list[TeacherCache]:
    caches = [_open_cache(p, manifest, read) for p in paths]
    for cache in caches[1:]:
        _check_same_rows(cache, caches[0])
    return caches


def open_targets(paths: Sequence[str], manifest: Manifest,
                 sources: TargetSources | None = None,
                 read: ReadOptions = ReadOptions()) -> TeacherTargets:
    """Open the caches of ``paths`` (and the role stores of ``sources``) for ``manifest``.

    Arrays are read lazily (:class:`~pipeline.stores.rows.RowReader`, ``read.cache_bytes`` of decoded
    chunks kept per array); see the module docstring.
    """
    if not paths:
        raise CacheError("train.caches is empty: list at least one teacher cache (a .zarr store)")
    caches = _open_caches(list(paths), manifest, read)
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
    index = RowIndex(manifest, first.image_ids, first.text_ids)
    image_src = by_path[found["image_emb"]] if "image_emb" in found else None
    if len(both) > 1 and image_src is not both[0]:
        raise CacheError(f"train.caches: {image_src.path if image_src else 'no cache'} provides the "
                         f"image embeddings, but the ensemble's first teacher is {both[0].path}: "
                         "list the cross-modal teachers (caches with both modalities) first")
    targets = TeacherTargets(
        paths=tuple(str(p) for p in paths), image_emb=image_emb, text_emb=text_emb,
        logit_scale=(both[0] if both else first).logit_scale,
        image_rows=IdRows(index, "image"), text_rows=IdRows(index, "text"),
        text_to_image=first.text_to_image,
        image_valid=np.logical_and.reduce([c.image_valid for c in caches]),
        text_valid=np.logical_and.reduce([c.text_valid for c in caches]),
        sources=found, teacher_fingerprints={str(c.path): c.teacher_fingerprint for c in caches},
        row_index=index,
        members=[Member(str(c.path), c.image_emb, c.text_emb, c.logit_scale, c.image_views) for c in both],
        views=image_src.views if image_src else 1,
        image_views=image_src.image_views if image_src else None,
        image_view=image_src.image_view if image_src else None,
        view_spec=image_src.view_spec if image_src else None)
    if sources is not None:
        _add_roles(targets, sources, manifest, first, read)
        _add_neighbors(targets, sources, manifest, read.cache_bytes)
        _add_itm(targets, sources, manifest, read.cache_bytes)
    return targets


def _add_roles(targets: TeacherTargets, sources: TargetSources, manifest: Manifest,
               reference: TeacherCache, read: ReadOptions) -> None:
    """Attach the role teachers' fields (the field table's role stores: single-modal and
    single-stream teachers)."""
    for role, fields in ROLE_STORES.items():
        path = getattr(sources, role)
        if path is None:
            continue
        cache = _open_cache(path, manifest, read)  # the reference is open (and verified) already
        _check_same_rows(cache, reference)
        for f in fields:
            values = cache.row_array(f.array)
            if values is None:
                what = f"{f.rows} embeddings" if f.embedding else f"array {f.array}"
                raise CacheError(f"train.{role} = {path}: this teacher has no {what} (modalities: "
                                 f"{sorted(cache.modalities)}); point it to a cache of a teacher "
                                 f"with the {f.rows} modality")
            targets.role_emb[f.name] = values
            targets.sources[f.name] = path
            if f.array == "image_emb" and cache.views > 1 and cache.view_spec == targets.view_spec:
                targets.role_views[f.name] = cache.image_views  # the same views: replayed alike
        targets.teacher_fingerprints[path] = cache.teacher_fingerprint
        targets.image_valid &= cache.image_valid
        targets.text_valid &= cache.text_valid


def _add_neighbors(targets: TeacherTargets, sources: TargetSources, manifest: Manifest,
                   cache_bytes: int) -> None:
    """Attach the cross-modal teacher's top-k neighbours (candidates, sampler)."""
    if sources.neighbors is None:
        return
    from pipeline.stores.neighbors import open_neighbors

    cross = targets.sources.get("image_emb")
    store = open_neighbors(sources.neighbors, expect_dataset=manifest.fingerprint,
                           expect_teacher=None if cross is None else targets.teacher_fingerprints[cross],
                           lazy=True, cache_bytes=cache_bytes)
    attrs = store["attrs"]
    for name in ("i2t_topk_idx", "i2i_topk_idx", "t2i_topk_idx", "t2t_topk_idx"):
        if name in store:
            targets.topk[name] = store[name]
            targets.sources[name] = sources.neighbors
    targets.teacher_fingerprints[sources.neighbors] = attrs["source_teacher_fingerprint"]


def _add_itm(targets: TeacherTargets, sources: TargetSources, manifest: Manifest,
             cache_bytes: int) -> None:
    """Attach the single-stream teacher's scores of each image's first candidates (MCAD)."""
    if sources.itm_scores is None:
        return
    from pipeline.stores.itm import open_itm_scores

    scores = open_itm_scores(sources.itm_scores, expect_dataset=manifest.fingerprint, lazy=True,
                             cache_bytes=cache_bytes)
    topk = targets.topk.get("i2t_topk_idx")
    if topk is None:
        raise CacheError(f"train.itm_scores = {sources.itm_scores} scores the candidates of a "
                         "neighbours store: set train.neighbors to that store too")
    k = scores.cand_idx.shape[1]
    if topk.shape[1] < k or not _first_columns_equal(scores.cand_idx, topk, k):
        raise CacheError(f"train.itm_scores = {sources.itm_scores}: its candidates are not the "
                         f"first {k} neighbours of train.neighbors = {sources.neighbors}; rerun "
                         "`distill itm` on those neighbours (or `dvc repro`)")
    targets.cand_itm = scores.cand_itm
    targets.image_valid &= scores.image_valid  # images the single-stream teacher could not read
    targets.sources["i2t_cand_itm"] = sources.itm_scores


def _first_columns_equal(cand_idx: RowArray, topk: RowArray, k: int) -> bool:
    """Whether ``cand_idx == topk[:, :k]``, compared block by block (bounded memory)."""
    return cand_idx.shape[0] == topk.shape[0] and all(
        np.array_equal(cand, top[:, :k]) for _, (cand, top) in paired_blocks(cand_idx, topk))


def check_views(targets: TeacherTargets, mode: str) -> None:
    """Refuse ``train.views: sample`` without stored views, or with ensemble members whose views
    differ (a sample's view must mean the same pixels in every teacher it is distilled from)."""
    if mode != "sample":
        return
    if targets.views <= 1 or targets.image_view is None:
        raise CacheError(
            f"train.views: sample replays stored teacher views, but {targets.sources.get('image_emb')} "
            "holds one view per image; rebuild it with teach.views > 1 (and this split in "
            "teach.view_splits), or set train.views: plain")
    plain = [name for name in targets.role_emb
             if BY_NAME[name].array == "image_emb" and name not in targets.role_views]
    if plain:  # e.g. a vision-only teacher taught without views: its target is the plain image
        log.warning("train.views: sample: %s come from store(s) without the same views (%s); their "
                    "targets stay the plain image's while the student sees the replayed view",
                    ", ".join(plain), ", ".join(sorted({targets.sources[n] for n in plain})))
    for member in targets.members[1:]:
        views = None if member.image_views is None else member.image_views.shape[1]
        if views != targets.views:
            raise CacheError(
                f"train.caches: {member.path} holds {views or 1} view(s) per image and "
                f"{targets.members[0].path} {targets.views}: an ensemble replaying views needs "
                "every teacher taught with the same teach.views settings")
