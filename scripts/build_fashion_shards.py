"""Build a second real image-text dataset from Fashion-MNIST, as img2dataset-style shards.

    apt-get install dataset-fashion-mnist          # Debian: /usr/share/datasets/fashion-mnist
    python scripts/build_fashion_shards.py --out data/fashion-raw --n 2000
    distill prepare -p benchmarks/fashion.yaml     # source: webdataset, split: hash

Fashion-MNIST has no captions, only a class per 28 px greyscale picture. Each sample gets three
captions built from its class name and attributes measured on its own pixels (so two pictures of
one class are told apart by their captions, as web captions tell products apart):

* tone: the mean intensity of the garment's pixels (light, mid-grey, dark);
* size: the share of the frame the garment covers (slim, full);
* shape: the height ÷ width of its bounding box (tall, square, wide);
* texture: the mean absolute difference between neighbouring garment pixels (plain, patterned).

The thresholds are the terciles (or medians) of each attribute over the chosen pictures, so
every word is used about equally. Pictures are upscaled to 64 px RGB PNGs (the demo student's
resolution); the class name is the sample's ``label`` (image→image NDCG). Samples are the first
``n`` of the file in order; shards are img2dataset's layout (``.png``, ``.txt`` one caption a
line, ``.json`` with ``label``), written deterministically (byte-identical on a rerun).
"""
from __future__ import annotations

import argparse
import gzip
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pipeline.data.writing import write_shards  # noqa: E402

SRC = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array: images [N, 28, 28] uint8 or labels [N] uint8."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per picture: tone, coverage, aspect and texture of the garment (pixels above 10)."""
    x = images.astype(np.float64)
    mask = x > 10
    count = np.maximum(mask.sum(axis=(1, 2)), 1)
    tone = (x * mask).sum(axis=(1, 2)) / count
    coverage = count / mask[0].size
    rows, cols = mask.any(axis=2), mask.any(axis=1)

    def extent(m: np.ndarray) -> np.ndarray:
        first = m.argmax(axis=1)
        last = m.shape[1] - 1 - m[:, ::-1].argmax(axis=1)
        return np.maximum(last - first + 1, 1)

    aspect = extent(rows) / extent(cols)
    both = mask[:, :, 1:] & mask[:, :, :-1]
    texture = (np.abs(np.diff(x, axis=2)) * both).sum(axis=(1, 2)) / np.maximum(both.sum(axis=(1, 2)), 1)
    return {"tone": tone, "coverage": coverage, "aspect": aspect, "texture": texture}


def _bucket(values: np.ndarray, words: list[str]) -> list[str]:
    """Each value's word: equal-count buckets over ``values``."""
    edges = np.quantile(values, np.linspace(0, 1, len(words) + 1)[1:-1])
    return [words[i] for i in np.searchsorted(edges, values, side="right")]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def captions(images: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    """Three captions per picture (see module docstring)."""
    a = attributes(images)
    tone = _bucket(a["tone"], ["dark", "mid-grey", "light"])
    size = _bucket(a["coverage"], ["slim", "full"])
    shape = _bucket(a["aspect"], ["wide", "square", "tall"])
    texture = _bucket(a["texture"], ["plain", "patterned"])
    out = []
    for i, label in enumerate(labels):
        name = CLASSES[int(label)]
        out.append([
            f"{_article(tone[i])} {tone[i]} {name}",
            f"{_article(texture[i])} {texture[i]} {size[i]} {name}",
            f"{name}, {tone[i]} and {texture[i]}, {shape[i]} shape",
        ])
    return out


def png_64(image: np.ndarray) -> bytes:
    """A 28 px greyscale picture as a 64 px RGB PNG (bicubic), fixed encoder settings."""
    pic = PIL.Image.fromarray(image, mode="L").resize((64, 64), PIL.Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def fashion_samples(src: Path, n: int, part: str) -> list[dict[str, Any]]:
    """The first ``n`` pictures of the ``part`` file (``train`` or ``t10k``) as shard samples."""
    images = read_idx(src / f"{part}-images-idx3-ubyte.gz")[:n]
    labels = read_idx(src / f"{part}-labels-idx1-ubyte.gz")[:n]
    caps = captions(images, labels)
    return [{"__key__": f"{part}{i:05d}", "png": png_64(images[i]),
             "txt": "\n".join(caps[i]) + "\n",
             "json": {"label": CLASSES[int(labels[i])], "caption": caps[i][0], "index": i, "part": part}}
            for i in range(len(images))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SRC, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=Path("data/fashion-raw"))
    parser.add_argument("--n", type=int, default=2000, help="pictures to take (first n of the file)")
    parser.add_argument("--part", default="t10k", choices=["train", "t10k"])
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()
    if not (args.src / f"{args.part}-images-idx3-ubyte.gz").exists():
        sys.exit(f"{args.src}: no Fashion-MNIST files; install Debian's dataset-fashion-mnist or "
                 "pass --src")
    samples = fashion_samples(args.src, args.n, args.part)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.tar"):
        old.unlink()
    paths = write_shards(iter(samples), args.out, "fashion", args.shard_size)
    print(f"{len(samples)} samples in {len(paths)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
