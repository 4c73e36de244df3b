"""Scoring for ``evaluate``: encode a split with the student, join its rows to the teacher's
cache by stable id, and compute retrieval metrics and retrieved lists for both models."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import PIL.Image
import torch

from pipeline import metrics as M
from pipeline.data.manifest import Manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import RandomAccess, iter_samples
from pipeline.progress import progress_task
from pipeline.stores.teacher import TeacherCache
from pipeline.students import Student

if TYPE_CHECKING:  # the config lives with the stage runner, which imports this module
    from pipeline.evaluation.config import EvalConfig


@dataclass
class EncodedSplit:
    """The student's embeddings of a split, in manifest row order, with the ids to join on."""

    image_ids: list[str]
    text_ids: list[str]
    text_to_image: np.ndarray      # int64 [N_txt]
    labels: list[str | None]       # per image
    captions: list[str]            # per text row
    image_emb: np.ndarray          # float32 [N_img, D]; zero rows where the image did not decode
    text_emb: np.ndarray           # float32 [N_txt, D]
    image_ok: np.ndarray           # bool [N_img]: the image decoded
    sample_images: list[PIL.Image.Image] = field(default_factory=list)  # first decoded images (for timing)


def _encode_images(student: Student, images: list[PIL.Image.Image], device: str) -> np.ndarray:
    pixels = torch.stack([student.preprocess(im) for im in images]).to(device)
    return student.encode_image(pixels).float().cpu().numpy()


def _encode_texts(student: Student, texts: list[str], device: str) -> np.ndarray:
    return student.encode_text(student.tokenize(texts).to(device)).float().cpu().numpy()


def _encode_captions(student: Student, captions: list[str], batch_size: int, device: str,
                     advance: Callable[[int], None]) -> np.ndarray:
    text_emb = np.zeros((len(captions), student.embed_dim), dtype=np.float32)
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        text_emb[start:stop] = _encode_texts(student, captions[start:stop], device)
        advance(stop - start)
    return text_emb


def encode_split(student: Student, manifest: Manifest, batch_size: int, device: str,
                 progress: bool | None = None, keep_images: int = 0) -> EncodedSplit:
    """Encode every image and caption of a split; undecodable images are kept as zero rows.

    The first ``keep_images`` decoded images are kept for latency measurement.
    """
    ids, labels, captions, t2i, image_ok = [], [], [], [], []
    kept: list[PIL.Image.Image] = []
    emb_parts: list[tuple[list[int], np.ndarray]] = []
    pending: list[tuple[int, PIL.Image.Image]] = []
    total = manifest.n_images + manifest.n_texts

    def flush() -> None:
        rows, images = [i for i, _ in pending], [im for _, im in pending]
        emb_parts.append((rows, _encode_images(student, images, device)))
        pending.clear()

    with torch.inference_mode(), progress_task("evaluate: encode", total, progress) as advance:
        for row, sample in enumerate(iter_samples(manifest, handler=SkipCounter())):
            ids.append(sample.sample_id)
            labels.append(sample.label)
            image_ok.append(sample.image is not None)
            captions.extend(sample.captions)
            t2i.extend([row] * len(sample.captions))
            if sample.image is not None:
                pending.append((row, sample.image))
                if len(kept) < keep_images:
                    kept.append(sample.image)
            if len(pending) == batch_size:
                flush()
            advance(1)
        if pending:
            flush()
        text_emb = _encode_captions(student, captions, batch_size, device, advance)
    image_emb = np.zeros((len(ids), student.embed_dim), dtype=np.float32)
    for rows, emb in emb_parts:
        image_emb[rows] = emb
    text_ids = [f"{sid}#{c}" for sid, n in _caption_counts(ids, t2i) for c in range(n)]
    return EncodedSplit(ids, text_ids, np.asarray(t2i, dtype=np.int64), labels, captions,
                        image_emb, text_emb, np.asarray(image_ok, dtype=bool), kept)


def _caption_counts(image_ids: list[str], t2i: list[int]) -> list[tuple[str, int]]:
    counts = np.bincount(np.asarray(t2i, dtype=np.int64), minlength=len(image_ids))
    return list(zip(image_ids, counts.tolist()))


# ----------------------------------------------------------------------------- joining


@dataclass
class EvalRows:
    """The rows both models are scored on: indices into the student's split and the cache."""

    image_rows: np.ndarray          # student (manifest) image rows kept
    text_rows: np.ndarray           # student (manifest) text rows kept
    text_to_image: np.ndarray       # kept captions -> position in image_rows
    cache_image_rows: np.ndarray | None
    cache_text_rows: np.ndarray | None
    n_images_excluded: int
    n_texts_excluded: int


def join_rows(split: EncodedSplit, cache: TeacherCache | None) -> EvalRows:
    """Rows valid for both models; cache rows are matched by stable id, not position."""
    image_keep = split.image_ok.copy()
    text_keep = np.ones(len(split.text_ids), dtype=bool)
    cache_img = cache_txt = None
    if cache is not None:
        img_row, txt_row = cache.image_row(), cache.text_row()
        cache_img = np.array([img_row.get(s, -1) for s in split.image_ids], dtype=np.int64)
        cache_txt = np.array([txt_row.get(t, -1) for t in split.text_ids], dtype=np.int64)
        image_keep &= (cache_img >= 0) & cache.image_valid[np.maximum(cache_img, 0)]
        text_keep &= (cache_txt >= 0) & cache.text_valid[np.maximum(cache_txt, 0)]
    # A caption whose image is gone has no positive left: drop it in both directions.
    text_keep &= image_keep[split.text_to_image]
    image_rows = np.flatnonzero(image_keep)
    text_rows = np.flatnonzero(text_keep)
    new_index = np.full(len(image_keep), -1, dtype=np.int64)
    new_index[image_rows] = np.arange(len(image_rows))
    return EvalRows(
        image_rows, text_rows, new_index[split.text_to_image[text_rows]],
        None if cache_img is None else cache_img[image_rows],
        None if cache_txt is None else cache_txt[text_rows],
        int((~image_keep).sum()), int((~text_keep).sum()),
    )


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """One model's metrics (flat) and Recall@K curves per direction."""

    metrics: dict[str, float]
    counts: dict[str, int]
    curves: dict[str, np.ndarray]
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value


# Why a single-modal NDCG has no value: no query has a relevant item (docs/evaluation.md).
NDCG_UNAVAILABLE = {
    "i2i": ("no test image has a relevant other image: image→image relevance comes from labels "
            "(two images are relevant when they share a label), and {why}. Give each sample a "
            "label (e.g. json[\"label\"]) to get it"),
    "t2t": ("no test caption has a relevant other caption: text→text relevance comes from captions "
            "of the same image or of images sharing a label, and {why}. Several captions per "
            "image, or labels, give it"),
}


def _ndcg_gap(direction: str, labels: list[str | None], text_to_image: np.ndarray) -> str:
    """The sentence saying why ``direction``'s NDCG has no query with a relevant item."""
    labelled = [lab for lab in labels if lab is not None]
    if not labelled:
        why = "the split has no labels"
    else:
        why = "no two scored images share a label"
    if direction == "t2t" and len(text_to_image) and np.bincount(text_to_image).max() <= 1:
        why += " and each image has one caption"
    return NDCG_UNAVAILABLE[direction].format(why=why)


def score_embeddings(image_emb: np.ndarray | None, text_emb: np.ndarray | None,
                     text_to_image: np.ndarray, labels: list[str | None], cfg: EvalConfig) -> Scores:
    """Recall@K/RSUM/MedR (both towers present) and single-modal NDCG for each tower present."""
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    curves: dict[str, np.ndarray] = {}
    if image_emb is not None and text_emb is not None:
        i2t, t2i = M.retrieval_ranks(image_emb, text_emb, text_to_image, block_rows=cfg.block_rows)
        summary = M.summarize_ranks(i2t, t2i, cfg.ks)
        for name in ("n_images", "n_texts", "n_images_without_caption"):
            counts[name] = int(summary.pop(name))
        out.update(summary)
        curves = {"i2t": M.recall_curve(i2t, cfg.curve_max_k),
                  "t2i": M.recall_curve(t2i, cfg.curve_max_k)}
    k = cfg.ndcg_k
    if image_emb is not None:
        nd = M.ndcg_image_to_image(image_emb, labels, k=k, block_rows=cfg.block_rows)
        out[f"i2i_ndcg@{k}"] = nd[f"ndcg@{k}"]
        counts.update(i2i_ndcg_queries=nd["n_queries"], i2i_ndcg_excluded=nd["n_excluded"])
    if text_emb is not None:
        nd = M.ndcg_text_to_text(text_emb, text_to_image, labels, k=k, block_rows=cfg.block_rows)
        out[f"t2t_ndcg@{k}"] = nd[f"ndcg@{k}"]
        counts.update(t2t_ndcg_queries=nd["n_queries"], t2t_ndcg_excluded=nd["n_excluded"])
    unavailable = {f"{d}_ndcg@{k}": _ndcg_gap(d, labels, np.asarray(text_to_image))
                   for d in ("i2i", "t2t") if f"{d}_ndcg@{k}" in out and counts[f"{d}_ndcg_queries"] == 0}
    return Scores(out, counts, curves, unavailable)


def lower_is_better(key: str) -> bool:
    """Metrics where a smaller value is better (median ranks)."""
    return key.endswith("_MedR")


def pct_of_teacher(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """100 * student / teacher for every higher-is-better metric both have (MedR is left to
    :func:`times_teacher`: a percentage above 100 would read as better)."""
    return {k: 100.0 * v / teacher[k] for k, v in student.items()
            if not lower_is_better(k) and _comparable(v, teacher.get(k))}


def times_teacher(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """student / teacher for the lower-is-better metrics (MedR): 1 = as good, 9.5 = a median
    rank 9.5 times the teacher's."""
    return {k: v / teacher[k] for k, v in student.items()
            if lower_is_better(k) and _comparable(v, teacher.get(k))}


def _comparable(student: Any, teacher: Any) -> bool:
    return _finite(student) and _finite(teacher) and teacher != 0


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)



def qualitative_examples(split: EncodedSplit, rows: EvalRows, n: int, top: int = 3) -> list[dict]:
    """The student's top captions for ``n`` evenly spaced scored test images."""
    if n <= 0 or len(rows.image_rows) == 0 or len(rows.text_rows) == 0:
        return []
    text_emb = split.text_emb[rows.text_rows]
    picks = np.unique(np.linspace(0, len(rows.image_rows) - 1, n).round().astype(int))
    examples = []
    for p in picks:
        image_row = int(rows.image_rows[p])
        sims = text_emb @ split.image_emb[image_row]
        order = np.argsort(-sims, kind="stable")[:top]  # stable: ties go to the lower row
        examples.append({
            "image_id": split.image_ids[image_row], "label": split.labels[image_row],
            "truth": [split.captions[j] for j in rows.text_rows[rows.text_to_image == p]],
            "top": [(split.captions[rows.text_rows[j]], float(sims[j]), bool(rows.text_to_image[j] == p))
                    for j in order],
        })
    return examples


def score_teacher(cache: TeacherCache, rows: EvalRows, labels: list[str | None],
                   cfg: EvalConfig) -> Scores:
    """The teacher's scores from its cached embeddings on the joined rows."""
    # Only the scored rows are read (a lazily opened cache reads them from the store), as float32.
    image_emb = (cache.image_emb[rows.cache_image_rows].astype(np.float32)
                 if cache.image_emb is not None else None)
    text_emb = (cache.text_emb[rows.cache_text_rows].astype(np.float32)
                if cache.text_emb is not None else None)
    return score_embeddings(image_emb, text_emb, rows.text_to_image, labels, cfg)


@dataclass
class Gallery:
    """Sample retrievals for the HTML report.

    ``caption_queries``: ``{"caption", "image_id", "student": [(image_id, sim, is_true)], "teacher":
    [...]}``; ``image_queries``: ``{"image_id", "student": [(caption, sim, is_true)], "teacher":
    [...]}``. The teacher's lists are present when its cache has both modalities.
    """

    caption_queries: list[dict[str, Any]]
    image_queries: list[dict[str, Any]]

    def image_ids(self) -> list[str]:
        """Every sample id the gallery shows, each once, in first-use order."""
        ids = [q["image_id"] for q in self.image_queries]
        for q in self.caption_queries:
            ids += [i for model in ("student", "teacher") for i, _, _ in q.get(model, [])]
        return list(dict.fromkeys(ids))


def _evenly_spaced(n_items: int, n: int) -> np.ndarray:
    if n <= 0 or n_items == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_items - 1, n).round().astype(np.int64))


def _top(sims: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` largest, ties to the lower index (as every metric here ranks)."""
    return np.argsort(-sims, kind="stable")[:top]


def retrieval_gallery(split: EncodedSplit, rows: EvalRows, teacher: tuple[np.ndarray, np.ndarray] | None,
                      n_captions: int, n_images: int, top: int = 5) -> Gallery:
    """Top-``top`` retrievals of evenly spaced scored captions and images, for each model.

    ``teacher`` holds the teacher's (image, text) embeddings on the same scored rows as
    ``rows`` (None: student only).
    """
    models = {"student": (split.image_emb[rows.image_rows], split.text_emb[rows.text_rows])}
    if teacher is not None:
        models["teacher"] = teacher
    image_ids = [split.image_ids[i] for i in rows.image_rows]
    captions = [split.captions[j] for j in rows.text_rows]
    caption_queries = []
    for j in _evenly_spaced(len(captions), n_captions):
        truth = int(rows.text_to_image[j])
        q: dict[str, Any] = {"caption": captions[j], "image_id": image_ids[truth]}
        for name, (img, txt) in models.items():
            sims = img.astype(np.float32) @ txt[j].astype(np.float32)
            q[name] = [(image_ids[i], float(sims[i]), int(i) == truth) for i in _top(sims, top)]
        caption_queries.append(q)
    image_queries = []
    for i in _evenly_spaced(len(image_ids), n_images):
        q = {"image_id": image_ids[i]}
        for name, (img, txt) in models.items():
            sims = txt.astype(np.float32) @ img[i].astype(np.float32)
            q[name] = [(captions[j], float(sims[j]), int(rows.text_to_image[j]) == i)
                       for j in _top(sims, top)]
        image_queries.append(q)
    return Gallery(caption_queries, image_queries)


def teacher_rows(cache: TeacherCache | None, rows: EvalRows):
    """The teacher's (image, text) embeddings on the scored rows, when it has both towers."""
    if cache is None or cache.image_emb is None or cache.text_emb is None:
        return None
    return (cache.image_emb[rows.cache_image_rows].astype(np.float32),  # rows only, as float32
            cache.text_emb[rows.cache_text_rows].astype(np.float32))


def gallery_images(manifest: Manifest, gallery: Gallery) -> dict[str, PIL.Image.Image]:
    """The images the gallery shows, read by id from the shards (only those, not the split)."""
    reader = RandomAccess(manifest, handler=SkipCounter())
    try:
        images = {sid: reader.read(sid).image for sid in gallery.image_ids()}
    finally:
        reader.close()
    gray = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    return {sid: im if im is not None else gray for sid, im in images.items()}
