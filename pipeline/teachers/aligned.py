"""The teacher ``align`` builds: a vision-only and a text-only teacher joined by learned heads.

The heads (:class:`AlignHeads`: a projection per tower and a learned logit scale), how they are
saved and loaded (``<heads_dir>/<name>/heads.safetensors`` + ``heads.json``) and the aligned
teacher's fingerprint live here; the ``align`` stage trains them on cached features.

``distill align`` writes this teacher's stores straight from the source teachers' caches, without
running an encoder. This class is the same teacher end to end (image -> vision encoder -> head,
caption -> text encoder -> head), rebuilt from the heads folder ``align`` saved (the heads and
the source teachers' params entries), so evaluation can time it like any other teacher and a new
split can be taught with ``distill teach``; its fingerprint equals the one ``align`` records.

>>> teacher = create_teacher("aligned", heads="models/align/aligned")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import CacheError, ConfigError
from pipeline.fingerprint import fingerprint
from pipeline.scratch import write_durable
from pipeline.teachers.base import TEACHERS, Teacher, state_dict_sha256

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learned scale
HEADS_FILE, HEADS_SPEC = "heads.safetensors", "heads.json"


def _head(d_in: int, d_out: int, kind: str, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    raise ConfigError(f"align.head: unknown head {kind!r}; known: ['linear', 'mlp']")


class AlignHeads(nn.Module):
    """A projection head per tower and a learned logit scale (stored as its log)."""

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int, head: str = "linear",
                 hidden_dim: int = 1024, init_logit_scale: float = 1 / 0.07) -> None:
        super().__init__()
        self.args = dict(vision_dim=vision_dim, text_dim=text_dim, embed_dim=embed_dim, head=head,
                         hidden_dim=hidden_dim, init_logit_scale=init_logit_scale)
        self.vision = _head(vision_dim, embed_dim, head, hidden_dim)
        self.text = _head(text_dim, embed_dim, head, hidden_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def image(self, feat: Tensor) -> Tensor:
        """Vision features [B, Dv] -> L2-normalised aligned embeddings [B, D]."""
        return F.normalize(self.vision(feat), dim=-1)

    def caption(self, feat: Tensor) -> Tensor:
        """Text features [B, Dt] -> L2-normalised aligned embeddings [B, D]."""
        return F.normalize(self.text(feat), dim=-1)

    def logit_scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def heads_sha256(heads: AlignHeads) -> str:
    """sha256 of the heads' weights (names, dtypes, shapes, bytes)."""
    return state_dict_sha256(heads)


def aligned_fingerprint(vision: dict[str, Any], text_fp: str, vision_fp: str, weights: str,
                        head: dict[str, Any], embed_dim: int, logit_scale: float) -> dict[str, Any]:
    """The aligned teacher's fingerprint fields, the same whether written by ``align`` from the
    caches or computed by :class:`AlignedTeacher` from the encoders:
    both source teachers' fingerprints, the heads' weights and settings. ``vision``: the vision
    teacher's fingerprint fields (its input pipeline is the aligned teacher's)."""
    return {"teacher": "aligned", "model": None, "pretrained": None, "weights_sha256": weights,
            "preprocess": vision.get("preprocess"), "embed_dim": int(embed_dim),
            "logit_scale": float(logit_scale), "modalities": ["image", "text"],
            "vision_teacher": vision_fp, "text_teacher": text_fp,
            "head": {k: head[k] for k in ("head", "embed_dim", "hidden_dim")}}


def save_heads(out: Path, heads: AlignHeads, spec: dict[str, Any]) -> None:
    """``heads.safetensors`` then ``heads.json`` (each written atomically; the spec last, so a
    spec always describes the weights beside it)."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
    write_durable(out / HEADS_FILE, save(tensors))
    write_durable(out / HEADS_SPEC, json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load_heads(path: str | Path) -> tuple[AlignHeads, dict[str, Any]]:
    """Heads and spec from a ``<heads_dir>/<name>`` folder written by ``align``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / HEADS_SPEC).exists() or not (path / HEADS_FILE).exists():
        raise CacheError(f"{path}: no aligned heads here ({HEADS_SPEC} + {HEADS_FILE}); run "
                         "`distill align` first")
    spec = json.loads((path / HEADS_SPEC).read_text())
    heads = AlignHeads(**spec["heads_args"])
    heads.load_state_dict(load_file(str(path / HEADS_FILE)))
    if heads_sha256(heads) != spec["weights_sha256"]:
        raise CacheError(f"{path / HEADS_FILE}: weights do not match {HEADS_SPEC} (sha256); the "
                         "folder is damaged: rerun `distill align`")
    return heads.eval(), spec


# What a teacher store adds to its teacher's own fingerprint fields (`distill teach`): its views
# (more than one per image) and a store dtype other than float16.
STORE_FIELDS = ("views", "store_dtype")


def store_fields(store_teacher: dict[str, Any]) -> dict[str, Any]:
    """The fields a source store (its ``teacher`` attribute) added to its teacher's own."""
    return {k: store_teacher[k] for k in STORE_FIELDS if k in store_teacher}


def recorded_store_fields(source: dict[str, Any]) -> dict[str, Any]:
    """The store fields a heads spec records for one source (``align``); a spec written before
    they were recorded names only a dtype other than float16."""
    if "store_fields" in source:
        return source["store_fields"]
    dtype = source.get("store_dtype", "float16")
    return {} if dtype == "float16" else {"store_dtype": dtype}


def source_fingerprint(fields: dict[str, Any], added: dict[str, Any]) -> str:
    """The teacher fingerprint a source store of this teacher carries: the teacher's own fields
    and what the store added (:func:`store_fields`)."""
    return fingerprint(fields | added)


class AlignedTeacher(Teacher):
    """Frozen source teachers + the aligned heads (see module doc)."""

    def __init__(self, heads: str, amp: bool = True) -> None:
        self._heads_dir = Path(heads)
        aligned_heads, spec = load_heads(self._heads_dir)
        towers = {}
        for role in ("vision", "text"):
            entry = spec[role]["entry"]
            if entry is None:
                raise CacheError(f"{self._heads_dir}: the heads do not record the {role} teacher's params "
                                 "entry (align was run without it); rerun `distill align`")
            towers[role] = TEACHERS.create(entry["teacher"], **entry["kwargs"])
            found = source_fingerprint(towers[role].fingerprint(), recorded_store_fields(spec[role]))
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
        # as its store records them (aligned_fingerprint)
        vision_fields = vision.fingerprint() | recorded_store_fields(spec["vision"])
        self._fields = aligned_fingerprint(vision_fields, spec["text"]["teacher_fingerprint"],
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
