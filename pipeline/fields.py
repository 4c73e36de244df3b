"""The per-row distillation fields: one table, read by every part of training that handles them.

Each entry says what a field is, where it is stored and which stage makes it. Opening the stores
(:mod:`pipeline.training.targets`), assembling a batch (:mod:`pipeline.training.batch`), the
batch the losses see (:class:`pipeline.losses.DistillBatch`, one attribute per entry with a
``batch`` name) and the checks that a run's stores hold what its losses need
(:func:`pipeline.losses.check_requirements`) all read this table. A new per-row field is one
entry here, its producer (the stage that writes the array) and the loss that reads it; see
``docs/ARCHITECTURE.md``.

Field names are what a loss lists in ``requires``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RowKind = Literal["image", "text"]
StoreKind = Literal["teacher", "neighbors", "itm"]


@dataclass(frozen=True)
class RowField:
    """One per-row field of a training split's stores."""

    name: str               # the field's name (a loss's ``requires``)
    store: StoreKind        # the store format holding it (pipeline.stores.<store>)
    array: str              # the array read in that store
    rows: RowKind           # which rows of a batch index it: the batch's images or its captions
    dtype: str              # as stored (readers hand float16 embeddings over as float32 tensors)
    config_key: str         # the `train` setting naming the store
    made_by: str            # the stage (and teacher) that writes it, for error messages
    batch: str | None = None  # the DistillBatch attribute filled with the batch's rows; None: read
                              # by batch assembly itself (neighbour lists, candidate scores)

    @property
    def embedding(self) -> bool:
        """Whether the field is a teacher embedding (its width sizes a loss's projection head)."""
        return self.store == "teacher"


FIELDS: tuple[RowField, ...] = (
    # The cross-modal teacher (train.caches: the first listed cache with the modality; every
    # cache with both is a member of the teacher ensemble).
    RowField("image_emb", "teacher", "image_emb", "image", "float16", "caches",
             "stage `teach` with a teacher that has the image modality", "teacher_image_emb"),
    RowField("text_emb", "teacher", "text_emb", "text", "float16", "caches",
             "stage `teach` with a teacher that has the text modality", "teacher_text_emb"),
    # Role teachers: one store each, named by its own setting.
    RowField("vision_teacher_emb", "teacher", "image_emb", "image", "float16", "vision_teacher",
             "stage `teach` with a vision-only teacher, listed as train.vision_teacher",
             "vision_teacher_emb"),
    RowField("text_teacher_emb", "teacher", "text_emb", "text", "float16", "text_teacher",
             "stage `teach` with a text-only teacher, listed as train.text_teacher",
             "text_teacher_emb"),
    RowField("single_image_emb", "teacher", "image_emb", "image", "float16", "single_stream_teacher",
             "stage `teach` with the single-stream teacher, train.single_stream_teacher",
             "single_image_emb"),
    RowField("single_text_emb", "teacher", "text_emb", "text", "float16", "single_stream_teacher",
             "stage `teach` with the single-stream teacher, train.single_stream_teacher",
             "single_text_emb"),
    # The cross-modal teacher's top-k neighbours (hard-negative batches, candidate captions).
    RowField("i2t_topk_idx", "neighbors", "i2t_topk_idx", "image", "int32", "neighbors",
             "stage `neighbors`, train.neighbors"),
    RowField("t2i_topk_idx", "neighbors", "t2i_topk_idx", "text", "int32", "neighbors",
             "stage `neighbors`, train.neighbors"),
    RowField("i2i_topk_idx", "neighbors", "i2i_topk_idx", "image", "int32", "neighbors",
             "stage `neighbors`, train.neighbors"),
    RowField("t2t_topk_idx", "neighbors", "t2t_topk_idx", "text", "int32", "neighbors",
             "stage `neighbors`, train.neighbors"),
    # Single-stream (ITM) scores of each image's first candidates (MCAD).
    RowField("i2t_cand_itm", "itm", "i2t_cand_itm", "image", "float32", "itm_scores",
             "stage `itm`, train.itm_scores"),
)

BY_NAME: dict[str, RowField] = {f.name: f for f in FIELDS}

# Stores read for one role each (not the cross-modal caches): config key -> its fields.
ROLE_STORES: dict[str, tuple[RowField, ...]] = {}
for _f in FIELDS:
    if _f.store == "teacher" and _f.config_key != "caches":
        ROLE_STORES[_f.config_key] = ROLE_STORES.get(_f.config_key, ()) + (_f,)

# DistillBatch attributes filled from role stores (the cross-modal ones are its core fields).
ROLE_BATCH_FIELDS: tuple[RowField, ...] = tuple(f for fields in ROLE_STORES.values() for f in fields
                                                if f.batch is not None)


def made_by(name: str) -> str:
    """The stage that writes field ``name``, in words (for error messages)."""
    found = BY_NAME.get(name)
    return found.made_by if found is not None else "an earlier stage"
