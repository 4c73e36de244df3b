"""Captions by text row: the strings behind a teacher cache's ``text_id`` rows.

Text row *j* is the *j*-th caption of the split in manifest order (shard order, then tar order,
then caption order inside a sample): the numbering ``distill teach`` gives ``text_id``,
``text_to_image`` and ``text_emb``, and so also the numbering of the neighbour stores' text
indices. Reading captions never decodes (or reads) an image.
"""
from __future__ import annotations

from pipeline.data.manifest import Manifest
from pipeline.data.shards import iter_samples
from pipeline.errors import ShardError


def load_captions(manifest: Manifest) -> list[str]:
    """Every caption of the split, indexed by text row (``captions[j]`` is text row ``j``)."""
    captions: list[str] = []
    for sample in iter_samples(manifest, decode_images=False):
        captions.extend(sample.captions)
    if len(captions) != manifest.n_texts:  # iter_samples checks each shard; this is the total
        raise ShardError(f"{manifest.root}: read {len(captions)} captions but the manifest says "
                         f"{manifest.n_texts}; re-run `distill prepare` to rebuild the dataset")
    return captions
