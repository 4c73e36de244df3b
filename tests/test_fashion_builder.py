"""scripts/build_fashion_shards.py: IDX files to img2dataset-style shards with attribute captions."""
from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import iter_samples
from stages.prepare.run import PrepareConfig, prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_fashion_shards as fashion  # noqa: E402


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it (magic 0x0000 08 ndim, big-endian sizes), gzipped."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def _pictures() -> tuple[np.ndarray, np.ndarray]:
    """Six 28 px pictures of known tone, extent and texture, and their classes."""
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    images[0, 2:26, 10:17] = 250          # light, tall, slim, plain
    images[1, 10:18, 2:26] = 60           # dark, wide, plain
    images[2, 4:24, 4:24] = 150           # mid-grey, square, full
    images[2, 4:24, 4:24:2] = 30          # ... striped: patterned
    images[3, 2:26, 11:17] = 240          # light, tall, slim, plain
    images[4, 11:17, 2:26] = 50           # dark, wide
    images[4, 11:17, 2:26:2] = 15         # ... faintly striped
    images[5, 3:25, 3:25] = 140           # mid-grey, square, full
    images[5, 3:25, 3:25:2] = 20          # ... striped
    return images, np.array([1, 8, 2, 3, 5, 4])


def test_idx_round_trip_and_attribute_captions(tmp_path):
    images, labels = _pictures()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(fashion.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    assert np.array_equal(fashion.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), labels)
    caps = fashion.captions(images, labels)
    assert caps[0] == ["a light trouser", "a plain slim trouser", "trouser, light and plain, tall shape"]
    assert caps[1][0] == "a dark bag" and caps[1][2].endswith("wide shape")
    assert caps[2] == ["a mid-grey pullover", "a patterned full pullover",
                       "pullover, mid-grey and patterned, square shape"]
    samples = fashion.fashion_samples(tmp_path, 6, "t10k")
    assert [s["json"]["label"] for s in samples] == ["trouser", "bag", "pullover", "dress", "sandal", "coat"]
    assert all(s["txt"].splitlines() == c for s, c in zip(samples, caps))
    # the same files give the same bytes
    assert [s["png"] for s in fashion.fashion_samples(tmp_path, 6, "t10k")] == [s["png"] for s in samples]


def test_built_shards_go_through_prepare_webdataset(tmp_path, monkeypatch):
    images, labels = _pictures()
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(sys, "argv", ["build", "--src", str(tmp_path), "--out", str(tmp_path / "raw"),
                                      "--n", "6", "--shard-size", "4"])
    assert fashion.main() == 0
    digests = {p.name: hashlib.sha256(p.read_bytes()).digest() for p in (tmp_path / "raw").glob("*.tar")}
    assert len(digests) == 2
    assert fashion.main() == 0  # a rerun writes the same shards
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).digest() for p in (tmp_path / "raw").glob("*.tar")}
    prepare(PrepareConfig(source="webdataset", src=str(tmp_path / "raw"), out=str(tmp_path / "data"),
                          split="hash", test_percent=0, val_percent=0))
    got = {s.sample_id.split("/")[1]: (s.captions, s.label)
           for s in iter_samples(load_manifest(tmp_path / "data" / "train"), decode_images=False)}
    caps = fashion.captions(images, labels)
    assert got == {f"t10k{i:05d}": (tuple(caps[i]), fashion.CLASSES[labels[i]]) for i in range(6)}


def test_fashion_params_hold_the_same_recipes_as_params_yaml():
    """benchmarks/fashion.yaml runs the same methods as the demo: a recipe edited in one file and
    not the other would put another method's figures in the recipe table."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    demo = yaml.safe_load((root / "params.yaml").read_text())["recipes"]
    fashion = yaml.safe_load((root / "benchmarks" / "fashion.yaml").read_text())["recipes"]
    strip = lambda recipes: {k: {f: v for f, v in r.items() if f != "description"}  # noqa: E731
                             for k, r in recipes.items()}
    assert strip(fashion) == strip(demo)
