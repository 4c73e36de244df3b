"""Augmented views of an image: drawn once by ``teach``, stored with their teacher embeddings,
replayed by ``train`` (the reinforced-dataset recipe of DataCompDR / MobileCLIP).

A teacher store with ``V`` views holds, for every image, the teacher embeddings of ``V`` views
and the parameters of each view (``image_view [N, V, 5]`` int32: ``x0, y0, x1, y1, flags``).
View 0 is the plain image (box = the whole image, no flip); views ``1..V-1`` are a random resized
crop (scale and ratio as torchvision's ``RandomResizedCrop`` samples them) and, with
``flip``, a horizontal flip with probability 1/2. Their randomness comes from a seed derived from
(dataset fingerprint, sample id, view) alone, so the views of a sample are the same in every run,
on every worker, after every resume.

The box is in the original image's pixel coordinates (``x1``/``y1`` exclusive), so any model can
replay the view at its own resolution: ``apply_view`` cuts the box (and flips), then the model's
own resize and normalisation follow (the teacher's ``preprocess`` in ``teach``, the student's in
``train``): image and target always see the same pixels.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

VIEW_FIELDS = ("x0", "y0", "x1", "y1", "flags")  # columns of ``image_view``
FLAG_FLIP = 1                                     # flags bit: horizontally flipped after the crop


@dataclass(frozen=True)
class ViewSpec:
    """How the views of one store are drawn (the ``teach.views*`` settings)."""

    views: int = 1                                  # views per image, view 0 = the plain image
    scale: tuple[float, float] = (0.6, 1.0)         # crop area as a share of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)     # crop aspect ratio (w / h)
    flip: bool = True                               # flip views 1.. with probability 1/2

    def attrs(self) -> dict[str, Any]:
        """The store attributes (and fingerprint fields) of these settings."""
        return {"views": self.views, "scale": [float(s) for s in self.scale],
                "ratio": [float(r) for r in self.ratio], "flip": bool(self.flip),
                "seed": "sha256(dataset_fingerprint, sample_id, view)"}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "ViewSpec":
        """The spec a store records (a store without views: one view)."""
        params = attrs.get("view_params")
        if not params:
            return cls(views=int(attrs.get("views", 1)))
        return cls(int(params["views"]), tuple(params["scale"]), tuple(params["ratio"]),
                   bool(params["flip"]))


def view_seed(dataset_fingerprint: str, sample_id: str, view: int) -> int:
    """The 64-bit seed of one view: a function of the dataset, the sample and the view only."""
    digest = hashlib.sha256(json.dumps(["view", dataset_fingerprint, sample_id, int(view)]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, as torchvision's ``RandomResizedCrop``
    samples it (10 tries, then the centre square)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def view_params(spec: ViewSpec, dataset_fingerprint: str, sample_id: str, width: int,
                height: int) -> np.ndarray:
    """``[V, 5]`` int32 rows ``(x0, y0, x1, y1, flags)`` of every view of one image."""
    rows = np.zeros((spec.views, len(VIEW_FIELDS)), dtype=np.int32)
    rows[0] = (0, 0, width, height, 0)
    for v in range(1, spec.views):
        rng = random.Random(view_seed(dataset_fingerprint, sample_id, v))
        top, left, h, w = crop_box(width, height, spec.scale, spec.ratio, rng)
        flags = FLAG_FLIP if spec.flip and rng.random() < 0.5 else 0
        rows[v] = (left, top, left + w, top + h, flags)
    return rows


def apply_view(image: PIL.Image.Image, row: np.ndarray | tuple[int, ...]) -> PIL.Image.Image:
    """The pixels of one view: the box cut from the RGB image, flipped when the flag says so
    (before any model's own resize and normalisation)."""
    x0, y0, x1, y1, flags = (int(v) for v in row)
    image = image.convert("RGB")
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"view box ({x0}, {y0}, {x1}, {y1}) lies outside the "
                         f"{image.width}x{image.height} image: the store's image_view row is damaged "
                         "or belongs to other images; run `distill cache verify`")
    if (x0, y0, x1, y1) != (0, 0, image.width, image.height):
        image = image.crop((x0, y0, x1, y1))
    if flags & FLAG_FLIP:
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def view_row_faults(view: np.ndarray, valid: np.ndarray, start: int = 0) -> list[str]:
    """Rows of ``image_view`` (``[n, V, 5]``) that cannot be views of a valid image: view 0 not
    a whole image at the origin without flags, a box outside view 0's or empty, unknown flags."""
    if not valid.any():
        return []
    v = view[valid]
    width, height = v[:, 0, 2:3], v[:, 0, 3:4]
    bad = (v[:, 0, 0] != 0) | (v[:, 0, 1] != 0) | (v[:, 0, 4] != 0) | (width[:, 0] < 1) | (height[:, 0] < 1)
    bad |= ((v[..., 0] < 0) | (v[..., 1] < 0) | (v[..., 0] >= v[..., 2]) | (v[..., 1] >= v[..., 3])
            | (v[..., 2] > width) | (v[..., 3] > height) | ((v[..., 4] & ~FLAG_FLIP) != 0)).any(axis=1)
    rows = start + np.flatnonzero(valid)[bad]
    if not rows.size:
        return []
    return [f"image_view: {rows.size} valid rows hold impossible view boxes (first rows "
            f"{rows[:5].tolist()})"]


def pick_view(seed: int, epoch: int, sample_id: str, views: int) -> int:
    """The view ``train.views: sample`` uses for a sample in an epoch."""
    if views <= 1:
        return 0
    digest = hashlib.sha256(json.dumps(["train-view", seed, epoch, sample_id]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % views
