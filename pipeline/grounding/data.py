"""Grounding data: annotation readers for ``distill prepare`` and the reader of prepared shards.

A grounding sample is an image with one or more referring expressions and the box each one
refers to. Prepared shards (``distill prepare`` with ``source: refcoco`` or ``grounding_wds``)
are ordinary dataset directories whose ``json`` holds ``captions`` (the expressions, so the
``teach`` stage caches them as captions: text row j is expression j), ``boxes`` (one pixel
``[x, y, w, h]`` per expression) and ``types`` (one expression type each, used to break the
evaluation down).

Sources:

* ``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg annotations as distributed (``refs(unc).p``,
  ``refs(google).p``, ``refs(umd).p`` in ``prepare.split_file``, the matching ``instances.json``
  in ``prepare.annotations_file``, COCO train2014 images under ``prepare.src``). One sample per
  referred object (``ref``): its sentences, the box of its ``ann_id``; the ref's split decides
  the split (``testA``/``testB`` go to ``test`` and become the expressions' type). The pickle is
  read with an unpickler that refuses every class, so a refs file can hold only plain data.
* ``grounding_wds``: WebDataset shards under ``prepare.src`` whose ``json`` has ``expressions``
  (list) and either ``box`` (one pixel ``xywh`` box for all of them) or ``boxes`` (one per
  expression), optionally ``types``. The hash rule splits.

A box must have positive width and height and lie inside the image (``BOX_TOLERANCE`` px of
slack for rounded annotations); otherwise the sample is refused naming file and key.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from pipeline.data.manifest import load_manifest
from pipeline.data.samples import RawSample, SourceSettings, coco_image, load_json
from pipeline.data.shards import IMAGE_EXTS, decode_image, iter_raw
from pipeline.errors import PipelineError, ShardError
from pipeline.grounding.boxes import xywh_to_xyxy, xyxy_to_cxcywh

BOX_TOLERANCE = 1.0  # px a box may pass the image border by (rounded float annotations)


def check_box(box: Any, width: int, height: int, where: str) -> list[float]:
    """A valid pixel ``[x, y, w, h]`` box inside a ``width`` x ``height`` image, else an error
    naming ``where`` (file and key); boxes within the tolerance are clipped to the image."""
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise PipelineError(f"{where}: box {box!r} is not four numbers [x, y, w, h] in pixels")
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise PipelineError(f"{where}: box {list(box)} has zero or negative area; fix or drop the annotation")
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise PipelineError(f"{where}: box {list(box)} lies outside the {width}x{height} image; "
                            "boxes are pixel [x, y, w, h] (left, top, width, height)")
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    return [x0, y0, x1 - x0, y1 - y0]


# ----------------------------------------------------------------------------- RefCOCO


class _PlainUnpickler(pickle.Unpickler):
    """Loads lists, dicts, strings and numbers only: a refs file naming a class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs file refers to {module}.{name}; only plain data is accepted")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """The list of refs of a ``refs(*).p`` pickle (Python 2 or 3 pickles)."""
    try:
        with path.open("rb") as f:
            refs = _PlainUnpickler(f, encoding="utf-8").load()
    except FileNotFoundError:
        raise PipelineError(f"{path}: refs file not found (prepare.split_file)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a refs pickle ({exc})") from None
    if not isinstance(refs, list):
        raise PipelineError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """(images by id, annotations by id, category names by id) of an ``instances.json``."""
    data = load_json(path)
    try:
        images = {img["id"]: img for img in data["images"]}
        anns = {ann["id"]: ann for ann in data["annotations"]}
        cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a COCO instances file (missing {exc})") from None
    return images, anns, cats


REF_SPLITS = {"train": "train", "val": "val", "test": "test", "testA": "test", "testB": "test",
              "testC": "test"}


def _ref_sample(ref: dict[str, Any], images: dict, anns: dict, cats: dict, src: Path,
                subdirs: list[Path], where: str) -> RawSample:
    try:
        ref_id, ann_id, split = ref["ref_id"], ref["ann_id"], ref["split"]
        sentences = [s.get("sent") or s.get("raw") or "" for s in ref["sentences"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise PipelineError(f"{where}: malformed ref (missing {exc})") from None
    key = f"{where} ref_id {ref_id} (ann_id {ann_id})"
    if split not in REF_SPLITS:
        raise PipelineError(f"{key}: unknown split {split!r}; known: {sorted(REF_SPLITS)}")
    if ann_id not in anns:
        raise PipelineError(f"{key}: ann_id not in the instances file (prepare.annotations_file)")
    ann = anns[ann_id]
    image = images.get(ann["image_id"])
    if image is None:
        raise PipelineError(f"{key}: image_id {ann['image_id']} not in the instances file")
    box = check_box(ann.get("bbox"), image["width"], image["height"], key)
    expressions = tuple(s.strip() for s in sentences if s.strip())
    if not expressions:
        raise PipelineError(f"{key}: ref has no sentence")
    meta = {"boxes": [box] * len(expressions), "types": [split] * len(expressions),
            "ref_id": ref_id, "ann_id": ann_id, "image_id": ann["image_id"],
            "category": cats.get(ann.get("category_id"), "")}
    path = coco_image(src, subdirs, image["file_name"], None, key)
    return RawSample(f"ref{ref_id}", path, None, expressions, meta, REF_SPLITS[split])


def read_refcoco(cfg: SourceSettings) -> list[RawSample]:
    """One sample per ref of ``cfg.split_file`` (refs pickle) with boxes from ``cfg.annotations_file``."""
    if not cfg.split_file or not cfg.annotations_file:
        raise PipelineError("prepare: source 'refcoco' needs split_file (refs(*).p) and "
                            "annotations_file (instances.json)")
    refs_path = Path(cfg.split_file)
    refs = load_refs(refs_path)
    images, anns, cats = _load_instances(Path(cfg.annotations_file))
    src = Path(cfg.src)
    if not src.is_dir():
        raise PipelineError(f"prepare.src: image folder {src} not found")
    subdirs = sorted(d for d in src.iterdir() if d.is_dir())
    return [_ref_sample(ref, images, anns, cats, src, subdirs, f"{refs_path}: refs[{i}]")
            for i, ref in enumerate(refs)]


# ----------------------------------------------------------------------------- WebDataset form


def _wds_boxes(meta: dict[str, Any], n: int, where: str) -> list[Any]:
    if "boxes" in meta:
        boxes = meta["boxes"]
        if not isinstance(boxes, list) or len(boxes) != n:
            raise PipelineError(f"{where}: 'boxes' must list one box per expression ({n})")
        return boxes
    if "box" in meta:
        return [meta["box"]] * n
    raise PipelineError(f"{where}: json has no 'box' (one pixel [x, y, w, h]) or 'boxes'")


def _wds_sample(shard: str, key: str, files: dict[str, bytes]) -> RawSample:
    where = f"shard {shard}, key {key!r}"
    meta = json.loads(files["json"]) if "json" in files else {}
    expressions = meta.get("expressions")
    if not isinstance(expressions, list) or not all(isinstance(e, str) and e.strip() for e in expressions) \
            or not expressions:
        raise PipelineError(f"{where}: json 'expressions' must be a non-empty list of non-empty strings")
    ext = next(e for e in IMAGE_EXTS if e in files)
    try:
        width, height = Image.open(io.BytesIO(files[ext])).size
    except Exception as exc:  # PIL raises many kinds on bad bytes
        raise PipelineError(f"{where}: image cannot be read ({exc})") from None
    boxes = [check_box(b, width, height, f"{where}, expression {i}")
             for i, b in enumerate(_wds_boxes(meta, len(expressions), where))]
    types = meta.get("types", ["expression"] * len(expressions))
    if not isinstance(types, list) or len(types) != len(expressions):
        raise PipelineError(f"{where}: 'types' must list one type per expression")
    out_meta = {"boxes": boxes, "types": [str(t) for t in types]}
    return RawSample(key, None, (ext, files[ext]), tuple(e.strip() for e in expressions), out_meta)


def read_grounding_wds(cfg: SourceSettings) -> list[RawSample]:
    """Every sample of the ``*.tar`` shards in ``cfg.src`` (keys are the source ids)."""
    src = Path(cfg.src)
    shards = sorted(src.glob("*.tar"))
    if not shards:
        raise PipelineError(f"prepare.src: no *.tar shards in {src}")
    return [_wds_sample(path.name, key, files) for path in shards for key, files in iter_raw(path)]


# ----------------------------------------------------------------------------- prepared shards


@dataclass
class GroundingSplit:
    """One prepared split in memory: images, and one row per expression.

    ``boxes`` are normalised ``cxcywh`` (by the image's width and height), the box head's
    format; ``pixel_boxes`` the original ``xywh``.
    """

    image_ids: list[str]  # "<shard>/<key>", as in the teacher cache's image_id
    images: list[Image.Image]
    text_ids: list[str]  # "<shard>/<key>#<c>", as in the teacher cache's text_id
    expressions: list[str]
    image_index: Tensor  # [T] image row of each expression
    boxes: Tensor  # [T, 4] normalised cxcywh
    pixel_boxes: Tensor  # [T, 4] pixel xywh
    types: list[str]

    def __len__(self) -> int:
        return len(self.expressions)


def _normalised(box: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = box
    return [x / width, y / height, w / width, h / height]


def load_split(root: str | Path) -> GroundingSplit:
    """Read a prepared grounding split; a missing or bad box is refused naming shard and key."""
    manifest = load_manifest(root, verify=True)
    split = GroundingSplit([], [], [], [], torch.empty(0), torch.empty(0), torch.empty(0), [])
    index, norm, pixel = [], [], []
    for info in manifest.shards:
        for key, files in iter_raw(manifest.root / info.name):
            where = f"{manifest.root / info.name}, key {key!r}"
            meta = json.loads(files["json"])
            ext = next(e for e in IMAGE_EXTS if e in files)
            try:
                image = decode_image(files[ext])
            except Exception as exc:
                raise ShardError(f"{where}: image cannot be decoded ({exc})") from None
            captions, boxes = meta.get("captions", []), meta.get("boxes")
            if not isinstance(boxes, list) or len(boxes) != len(captions):
                raise PipelineError(f"{where}: json needs 'boxes', one per caption ({len(captions)}); "
                                    "prepare the dataset with source refcoco or grounding_wds")
            types = meta.get("types") or ["expression"] * len(captions)
            row = len(split.images)
            split.image_ids.append(f"{info.name}/{key}")
            split.images.append(image)
            for c, (text, box) in enumerate(zip(captions, boxes)):
                box = check_box(box, image.width, image.height, f"{where}, expression {c}")
                split.text_ids.append(f"{info.name}/{key}#{c}")
                split.expressions.append(text)
                split.types.append(str(types[c]))
                index.append(row)
                pixel.append(box)
                norm.append(_normalised(box, image.width, image.height))
    split.image_index = torch.tensor(index, dtype=torch.long)
    split.pixel_boxes = torch.tensor(pixel, dtype=torch.float32).reshape(-1, 4)
    split.boxes = xyxy_to_cxcywh(xywh_to_xyxy(torch.tensor(norm, dtype=torch.float32).reshape(-1, 4)))
    return split
