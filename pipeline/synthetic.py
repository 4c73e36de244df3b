"""Synthetic teacher stores of any size, for the scale tests and benchmarks.

The store is an ordinary teacher cache written with the project's own writer (whole Zarr shards,
checksummed chunks): random unit vectors, float16, for a synthetic manifest of ``n_rows``
samples with one caption each. No tar files exist behind the manifest: the stores stand in for
a dataset too large to build here, and training code that reads targets only (batch assembly,
the losses) runs on them as on a real one.

Row ``r`` holds ``base[r % len(base)]`` of a fixed random block (per modality), so values can be
checked after reading without keeping the store in memory; the block has a shard's rows, so no
two rows of a Zarr shard are equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.stores.base import ROW_VALID, Layout, row_units, write_unit
from pipeline.stores.teacher import create_teacher_store, teacher_store_attrs

SAMPLES_PER_TAR = 10_000  # the synthetic manifest's tar shards (their rows are contiguous slices)


def synthetic_manifest(n_rows: int, samples_per_tar: int = SAMPLES_PER_TAR,
                       root: str | Path = "synthetic") -> Manifest:
    """A manifest of ``n_rows`` samples with one caption each, in tar shards that do not exist."""
    shards = []
    for i, start in enumerate(range(0, n_rows, samples_per_tar)):
        n = min(samples_per_tar, n_rows - start)
        shards.append(ShardInfo(f"synthetic-{i:06d}.tar", n * 1024, f"{i:064x}", n, n))
    return Manifest(Path(root), tuple(shards))


def base_block(rows: int, dim: int, modality: str, seed: int = 0) -> np.ndarray:
    """The fixed block of random unit vectors that rows repeat (float16)."""
    rng = np.random.default_rng([seed, 0 if modality == "image" else 1])
    block = rng.standard_normal((rows, dim), dtype=np.float32)
    return (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float16)


def synthetic_rows(rows: np.ndarray, dim: int, modality: str, layout: Layout = Layout(),
                   seed: int = 0) -> np.ndarray:
    """The stored embeddings of ``rows`` (float16), computed without reading the store."""
    base = base_block(layout.rows_per_shard, dim, modality, seed)
    return base[np.asarray(rows) % layout.rows_per_shard]


def write_synthetic_store(path: str | Path, n_rows: int, dim: int = 512,
                          layout: Layout = Layout(zstd_level=1), seed: int = 0,
                          samples_per_tar: int = SAMPLES_PER_TAR) -> Manifest:
    """Write a complete image+text teacher cache of ``n_rows`` rows at ``path``; returns its
    manifest (:func:`synthetic_manifest`)."""
    manifest = synthetic_manifest(n_rows, samples_per_tar)
    modalities = frozenset({"image", "text"})
    teacher = {"teacher": "synthetic", "model": f"random unit vectors, seed {seed}",
               "embed_dim": dim, "logit_scale": 100.0, "modalities": sorted(modalities)}
    attrs = teacher_store_attrs(teacher, manifest.fingerprint, "train", modalities, dim, 100.0,
                                n_rows, n_rows, layout)
    group = create_teacher_store(Path(path), n_images=n_rows, n_texts=n_rows, embed_dim=dim,
                                 modalities=modalities, attrs=attrs, layout=layout)
    base = {m: base_block(layout.rows_per_shard, dim, m, seed) for m in ("image", "text")}
    ids = _ids(manifest)
    for start, stop in row_units(n_rows, layout.rows_per_shard):
        n = stop - start
        image_ids = ids[start:stop]
        write_unit(group, start, stop, {
            "image_emb": base["image"][:n], "text_emb": base["text"][:n],
            "image_id": image_ids, "text_id": np.char.add(image_ids, "#0"),
            "text_to_image": np.arange(start, stop, dtype=np.int32),
            "image_status": np.full(n, ROW_VALID, np.uint8),
            "text_status": np.full(n, ROW_VALID, np.uint8)})
    group.attrs.update({"complete": True})
    return manifest


def _ids(manifest: Manifest) -> np.ndarray:
    """Sample ids ``<shard>/<key>`` in row order."""
    parts = [np.char.add(f"{s.name}/", np.char.zfill(np.arange(s.n_samples).astype(str), 6))
             for s in manifest.shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=str)
