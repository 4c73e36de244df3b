"""Helpers for data-layer tests: tiny real images and hand-built tar shards."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def image_array(seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """Random uint8 pixels, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def png_bytes(seed: int, size: int = 8, mode: str = "RGB") -> bytes:
    """PNG of random pixels in ``mode`` ("RGB" or "RGBA")."""
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size, len(mode)), mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8  # PNG signature, broken body


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write members exactly as given (bad names and duplicates included)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cut_points(path: Path) -> list[int]:
    """Truncation points: inside data, at a member boundary, inside a header, right after the data."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    end_of_data = members[-1].offset_data + 512 * ((members[-1].size + 511) // 512)
    return [members[0].offset_data + 10, members[2].offset, members[2].offset + 100, end_of_data]


def caption_json(captions: list[str] | None = None, **extra: Any) -> bytes:
    obj = dict(extra)
    if captions is not None:
        obj["captions"] = captions
    return json.dumps(obj).encode()


def simple_members(keys: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    """One png + json(captions, label) per key; captions count = 1 + index % 3."""
    members = []
    for i, key in enumerate(keys):
        caps = [f"caption {key} {c}" for c in range(1 + i % 3)]
        members.append((f"{key}.png", png_bytes(seed + i)))
        members.append((f"{key}.json", caption_json(caps, label=f"L{i % 2}")))
    return members


def hash_split(source_id: str, salt: str, test_percent: int, val_percent: int) -> str:
    """Independent re-statement of the documented split rule."""
    digest = hashlib.sha1((salt + ":" + source_id).encode("utf-8")).digest()
    h = int.from_bytes(digest, "big") % 100
    return "test" if h < test_percent else ("val" if h < test_percent + val_percent else "train")
