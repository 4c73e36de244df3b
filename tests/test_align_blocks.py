"""``align`` past memory: the heads read both source stores a block of images at a time.

The blocks' pairs equal the pairing of the whole stores (computed here independently from the
eager caches); an epoch over several blocks uses every usable image once, with a caption of its
own; training on blocks still aligns; stores whose captions are not grouped by image are named.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import CacheError
from pipeline.metrics import retrieval_metrics
from pipeline.stores.base import ROW_INVALID
from pipeline.stores.teacher import TeacherCache, write_cache_from_arrays
from stages.align.run import _batches, epoch_batches, paired_features, run_align, source_pairs
from tests.test_align import DS, _cfg, _synthetic_sources


@pytest.fixture
def damaged(tmp_path):
    """The synthetic sources with some images and captions invalid (as `teach` marks them)."""
    root = tmp_path / "caches"
    for split, n, seed in (("train", 200, 0), ("val", 40, 1), ("test", 60, 2)):
        _synthetic_sources(root, split, n, seed, DS[split])
    for store, kind, rows in (("vis", "image", [3, 50, 51, 199]), ("txt", "text", [0, 1, 10, 77])):
        import zarr
        group = zarr.open_group(str(root / store / "train.zarr"), mode="r+")
        status = group[f"{kind}_status"][:]
        status[rows] = ROW_INVALID
        group[f"{kind}_status"][:] = status
    return root


def whole_pairing(root):
    """Usable images (valid, with a valid caption) and their valid captions, from eager caches."""
    vis, txt = (TeacherCache.open(root / s / "train.zarr") for s in ("vis", "txt"))
    images, captions = [], []
    for i in range(len(vis.image_ids)):
        caps = [j for j in np.flatnonzero(txt.text_to_image == i) if txt.text_valid[j]]
        if vis.image_valid[i] and caps:
            images.append(i)
            captions.append(caps)
    return vis, txt, images, captions


@pytest.mark.parametrize("block_rows", [37, 64, 1000])
def test_blocks_hold_the_pairs_of_the_whole_stores(damaged, tmp_path, block_rows):
    pair = source_pairs(_cfg(tmp_path))["train"]
    stream = paired_features(pair, block_rows)
    assert len(stream.blocks) == -(-200 // block_rows)
    vis, txt, images, captions = whole_pairing(damaged)
    assert stream.n_images == len(images) == 195  # 3, 50, 51, 199 invalid; 0 has no valid caption
    assert stream.n_captions == sum(map(len, captions))
    feats = [stream.read(b) for b in range(len(stream.blocks))]
    np.testing.assert_array_equal(torch.cat([f.image_feat for f in feats]).numpy(), vis.image_emb[images])
    np.testing.assert_array_equal(torch.cat([f.text_feat for f in feats]).numpy(),
                                  txt.text_emb[np.concatenate(captions)])
    assert torch.cat([f.n_captions for f in feats]).tolist() == list(map(len, captions))


def test_an_epoch_over_blocks_uses_every_image_once_with_its_own_caption(damaged, tmp_path):
    stream = paired_features(source_pairs(_cfg(tmp_path))["train"], 48)
    vis, txt, images, captions = whole_pairing(damaged)
    row_of_image = {vis.image_emb[i].tobytes(): i for i in images}
    row_of_text = {txt.text_emb[j].tobytes(): j for j in np.concatenate(captions)}
    batches = list(epoch_batches(stream, 32, torch.Generator().manual_seed(0)))
    assert [len(b[0]) for b in batches] == [s.stop - s.start for s in _batches(195, 32)]
    seen = [row_of_image[x.numpy().tobytes()] for img, _ in batches for x in img]
    assert sorted(seen) == images  # each usable image exactly once
    pairs = [(row_of_image[x.numpy().tobytes()], row_of_text[y.numpy().tobytes()])
             for img, cap in batches for x, y in zip(img, cap)]
    assert all(txt.text_to_image[j] == i for i, j in pairs)  # a caption of its own image
    assert seen != sorted(seen)  # shuffled, and the blocks in another order than the rows
    # validation: rows in order, first valid caption
    val = [row_of_image[x.numpy().tobytes()] for img, _ in epoch_batches(stream, 32, None) for x in img]
    assert val == images


def test_heads_trained_on_blocks_still_align(damaged, tmp_path):
    summary = run_align(_cfg(tmp_path, block_rows=48), progress=False)
    assert summary["train_pairs"] == {"images": 195, "captions": 388}
    test = TeacherCache.open(damaged / "al" / "test.zarr")
    assert retrieval_metrics(test.image_emb, test.text_emb, test.text_to_image)["t2i_R@1"] > 60


def test_captions_not_grouped_by_image_are_named(tmp_path):
    root = tmp_path / "caches"
    _synthetic_sources(root, "train", 20, 0, DS["train"])
    for store in ("vis", "txt"):  # the same shuffled caption order in both: they agree, but not grouped
        cache = TeacherCache.open(root / store / "train.zarr")
        order = np.random.default_rng(0).permutation(len(cache.text_ids))
        emb = {"image_emb": cache.image_emb} if store == "vis" else {"text_emb": cache.text_emb[order]}
        import shutil
        shutil.rmtree(root / store / "train.zarr")
        write_cache_from_arrays(root / store / "train.zarr", image_ids=cache.image_ids,
                                text_ids=cache.text_ids[order], text_to_image=cache.text_to_image[order],
                                teacher=cache.attrs["teacher"], dataset_fingerprint=DS["train"], split="train",
                                logit_scale=cache.logit_scale, **emb)
    with pytest.raises(CacheError, match="txt/train.zarr: captions are not grouped by image .*text row"):
        run_align(_cfg(tmp_path, val_split=None), progress=False)
