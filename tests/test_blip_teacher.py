"""The single-stream BLIP ITM teacher on a tiny random-initialised config (and the `model=` path
through a local directory holding the same weights, the way a downloaded checkpoint is loaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.fingerprint import fingerprint, sha256_file
from pipeline.teachers import TEACHERS, create_teacher
from pipeline.teachers.blip import BlipItmTeacher

CAPTIONS = ["a red circle", "square number 7 in blue", "", "ünïcödé text, with punctuation!"]


def make_images(n: int) -> list[Image.Image]:
    """Non-square RGB images of random content (exercises the processor's resize)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def pixels(teacher: BlipItmTeacher, n: int = len(CAPTIONS)) -> torch.Tensor:
    return torch.stack([teacher.preprocess(im) for im in make_images(n)])


@pytest.fixture(scope="module")
def blip() -> BlipItmTeacher:
    return create_teacher("blip_itm", config="tiny", seed=0)


def hf_forward(teacher: BlipItmTeacher, px: torch.Tensor, texts: list[str], itm: bool) -> torch.Tensor:
    """transformers' own BlipForImageTextRetrieval.forward on the processor's tokens."""
    tok = teacher.tokenizer(texts, padding=True, truncation=True, max_length=teacher.max_length,
                            return_token_type_ids=False, return_tensors="pt")
    with torch.no_grad():
        return teacher.net(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           pixel_values=px, use_itm_head=itm).itm_score


def test_registered_frozen_and_both_modalities(blip):
    assert "blip_itm" in TEACHERS.names()
    blip.train()
    assert not blip.training and not any(m.training for m in blip.modules())
    assert not any(p.requires_grad for p in blip.parameters())
    assert blip.modalities == frozenset({"image", "text"}) and blip.embed_dim == 16


def test_score_pairs_is_the_itm_log_odds_of_transformers_forward(blip):
    px = pixels(blip)
    scores = blip.score_pairs(px, CAPTIONS)
    assert scores.shape == (len(CAPTIONS),) and scores.dtype == torch.float32
    logits = hf_forward(blip, px, CAPTIONS, itm=True).double()
    torch.testing.assert_close(scores.double(), logits[:, 1] - logits[:, 0], atol=1e-5, rtol=0)
    assert scores.std() > 1e-3  # distinct pairs get distinct scores


def test_itc_features_are_normalised_and_match_transformers(blip):
    px = pixels(blip)
    img, txt = blip.encode_images(px), blip.encode_texts(CAPTIONS)
    assert img.shape == txt.shape == (len(CAPTIONS), 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)
    # use_itm_head=False returns normalised image features @ normalised text features.T
    torch.testing.assert_close(img @ txt.T, hf_forward(blip, px, CAPTIONS, itm=False), atol=1e-5, rtol=0)
    assert torch.cdist(img, img).add(torch.eye(len(img)) * 9).min() > 1e-3


def test_score_candidates_equals_pairwise_scores(blip):
    px = pixels(blip, 3)
    groups = [CAPTIONS[:2], [], CAPTIONS[1:]]
    flat = blip.score_candidates(px, groups)
    loop = [float(blip.score_pairs(px[b:b + 1], [t])[0]) for b, g in enumerate(groups) for t in g]
    np.testing.assert_allclose(flat.numpy(), np.array(loop), atol=1e-5)


def test_forward_calls_counted_and_empty_batches_free(blip):
    before = blip.forward_calls
    px = pixels(blip, 2)
    blip.score_pairs(px, CAPTIONS[:2])
    blip.score_candidates(px, [CAPTIONS[:3], CAPTIONS[:1]])
    assert blip.score_pairs(px[:0], []).shape == (0,)
    assert blip.score_candidates(px, [[], []]).shape == (0,)
    assert blip.forward_calls - before == 2
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        blip.score_pairs(px, ["one"])


def test_deterministic_from_seed_and_fingerprint_follows_seed(blip):
    again = create_teacher("blip_itm", config="tiny", seed=0)
    other = create_teacher("blip_itm", config="tiny", seed=1)
    px = pixels(blip)
    torch.testing.assert_close(again.score_pairs(px, CAPTIONS), blip.score_pairs(px, CAPTIONS), atol=0, rtol=0)
    assert fingerprint(again.fingerprint()) == fingerprint(blip.fingerprint())
    assert fingerprint(other.fingerprint()) != fingerprint(blip.fingerprint())
    assert other.fingerprint()["weights_sha256"] != blip.fingerprint()["weights_sha256"]
    assert not torch.allclose(other.score_pairs(px, CAPTIONS), blip.score_pairs(px, CAPTIONS))


def test_fingerprint_covers_preprocessing_and_tokenizer_not_tokenizer_state(blip):
    fp = blip.fingerprint()
    assert "BlipImageProcessor" in fp["preprocess"] and '"height":32' in fp["preprocess"]
    assert "max_length=35" in fp["preprocess"] and len(fp["tokenizer_sha256"]) == 64
    longer = create_teacher("blip_itm", config="tiny", seed=0, max_length=20)
    assert fingerprint(longer.fingerprint()) != fingerprint(fp)
    fresh = create_teacher("blip_itm", config="tiny", seed=0)
    first = fresh._tokenizer_digest
    fresh.score_pairs(pixels(fresh, 1), ["a long caption that gets truncated " * 5])
    del fresh.__dict__["_tokenizer_digest"]  # recompute after tokenizing set padding/truncation
    assert fresh._tokenizer_digest == first


def test_enc_first_token_follows_blip_code(blip):
    enc = create_teacher("blip_itm", config="tiny", seed=0, itm_first_token="[ENC]")
    px = pixels(blip)
    tok = blip.tokenizer(CAPTIONS, padding=True, return_token_type_ids=False, return_tensors="pt")
    ids = tok["input_ids"].clone()
    ids[:, 0] = blip.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        logits = blip.net(input_ids=ids, attention_mask=tok["attention_mask"], pixel_values=px).itm_score
    torch.testing.assert_close(enc.score_pairs(px, CAPTIONS), logits[:, 1] - logits[:, 0], atol=1e-5, rtol=0)
    assert fingerprint(enc.fingerprint()) != fingerprint(blip.fingerprint())
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        create_teacher("blip_itm", config="tiny", itm_first_token="[NOPE]")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one of `model`"):
        create_teacher("blip_itm")
    with pytest.raises(ValueError, match="exactly one of `model`"):
        create_teacher("blip_itm", model="x", config="tiny")
    with pytest.raises(ValueError, match=r"unknown config 'huge'; known: \['tiny'\]"):
        create_teacher("blip_itm", config="huge")


def test_model_path_loads_a_saved_checkpoint_directory(blip, tmp_path):
    """The `model=` path (BlipForImageTextRetrieval/BlipProcessor.from_pretrained) on a local
    directory written by save_pretrained, as a downloaded hub checkpoint is laid out."""
    from transformers import BlipProcessor

    blip.net.save_pretrained(tmp_path / "ckpt")
    BlipProcessor(blip.transform.processor, blip.tokenizer).save_pretrained(tmp_path / "ckpt")
    loaded = create_teacher("blip_itm", model=str(tmp_path / "ckpt"))
    px = pixels(blip)
    torch.testing.assert_close(loaded.score_pairs(px, CAPTIONS), blip.score_pairs(px, CAPTIONS),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.preprocess(make_images(1)[0]), px[0], atol=1e-6, rtol=0)
    fp = loaded.fingerprint()
    assert fp["weights_sha256"] == sha256_file(tmp_path / "ckpt/model.safetensors")
    assert fp["pretrained"] == str(tmp_path / "ckpt") and fp["seed"] is None
    assert fp["tokenizer_sha256"] == blip.fingerprint()["tokenizer_sha256"]


def test_teach_caches_its_itc_features(make_dataset, blip, tmp_path):
    from pipeline.stores.teacher import TeacherCache
    from stages.teach.run import TeachConfig, run_teach

    root = make_dataset(n_train=6, n_test=2)
    run_teach(TeachConfig(dataset=str(root), splits=("train",), out_root=str(tmp_path / "caches"),
                          rows_per_shard=8, rows_per_chunk=4, summary_dir=str(tmp_path / "reports")),
              "blip", blip, progress=False)
    cache = TeacherCache.open(tmp_path / "caches/blip/train.zarr")
    assert cache.image_emb.shape == (6, 16) and cache.text_emb.shape == (12, 16)
    assert cache.attrs["teacher"]["teacher"] == "blip_itm"
    np.testing.assert_allclose(np.linalg.norm(cache.text_emb, axis=1), 1, atol=2e-3)
