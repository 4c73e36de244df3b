"""Shared fixtures: tiny real WebDataset shards and a tiny real (random-weight) open_clip teacher."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.data.writing import write_manifest, write_shards

# Reproducible store bytes (the creation-time attribute honours this).
os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")

# A custom open_clip architecture small enough for a test to build and run in well under a second.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def shape_png(colour: str, shape: str, size: int = 32, seed: int = 0) -> bytes:
    """A PNG of a coloured shape on a noisy background (so every image is distinct)."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(200, 255, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, 4), (4, size - 4), (size - 4, size - 4)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiny_samples(n: int, start: int = 0, corrupt: set[int] = frozenset()) -> list[dict]:
    """``n`` samples with two captions each and a label; indices in ``corrupt`` get broken bytes."""
    samples = []
    for i in range(start, start + n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        png = shape_png(colour, shape, seed=i)
        if i in corrupt:
            png = png[:40] + b"\x00" * 64  # PNG header survives, data does not
        samples.append({
            "__key__": f"s{i:05d}",
            "png": png,
            "json": {"captions": [f"a {colour} {shape}", f"{shape} number {i} in {colour}"],
                     "label": shape},
        })
    return samples


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a dataset root with ``train``/``test`` splits of tiny shards and manifests."""

    def make(n_train: int = 24, n_test: int = 12, per_shard: int = 7,
             corrupt: set[int] = frozenset(), root: Path | None = None) -> Path:
        root = root or tmp_path / "data"
        for split, n, start in (("train", n_train, 0), ("test", n_test, 10_000)):
            write_shards(tiny_samples(n, start, corrupt), root / split, split, per_shard)
            write_manifest(root / split)
        return root

    return make


@pytest.fixture(scope="session")
def tiny_teacher():
    """A real open_clip CLIP with random weights (seeded by the teacher), tiny enough for tests."""
    from pipeline.teachers import create_teacher

    return create_teacher("open_clip", model_cfg=TINY_CLIP_CFG, pretrained=None)


@pytest.fixture(scope="session")
def emoji_pool():
    """The scene builder's emoji images, read from the shipped demo/emoji shards."""
    from pipeline.grounding.scenes import load_pool

    return load_pool(str(Path(__file__).resolve().parent.parent / "demo" / "emoji"))


def write_scene_shards(out: Path, pool: dict, n: int, seed: int = 0, shard_size: int = 16) -> Path:
    """``n`` emoji scenes as grounding WebDataset shards (``expressions`` + ``boxes``) in ``out``."""
    from pipeline.grounding.scenes import build_scene

    write_shards((build_scene(pool, i, seed).sample(f"scene{i:06d}") for i in range(n)), out, "scenes",
                 shard_size)
    write_manifest(out)
    return out
