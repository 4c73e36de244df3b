"""Student registry, API, augmentation and safetensors round trips."""
from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from pipeline.registry import UnknownNameError
from pipeline.students import (STUDENTS, TrainAugment, create_student, load_student,
                               read_checkpoint, save_checkpoint)

TINY = {
    "open_clip_tiny": {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 32,
                       "vision_layers": 1, "vision_heads": 2, "context_length": 12,
                       "text_width": 32, "text_heads": 2, "text_layers": 1},
    "timm_hf": {"embed_dim": 16, "image_size": 32, "context_length": 12, "text_width": 32,
                "text_heads": 2, "text_layers": 1,
                "timm_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
                                "num_heads": 2}},
}
CAPTIONS = ["a red square", "two dogs on a beach"]


def _image(size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (200, 50, 10))


@pytest.fixture(params=sorted(TINY))
def student(request):
    torch.manual_seed(0)
    return create_student(request.param, **TINY[request.param]).eval()


def test_registry_lists_students():
    assert {"open_clip_tiny", "timm_hf"} <= set(STUDENTS.names())
    with pytest.raises(UnknownNameError, match="open_clip_tiny"):
        create_student("no_such_student")


def test_api_shapes_and_normalisation(student):
    pixels = torch.stack([student.preprocess(_image()), student.preprocess(_image((20, 50)))])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    tokens = student.tokenize(CAPTIONS)
    assert tokens.shape == (2, 12)
    with torch.no_grad():
        image_emb = student.encode_image(pixels)
        text_emb = student.encode_text(tokens)
        raw = student.encode_text(tokens, normalize=False)
    assert image_emb.shape == text_emb.shape == (2, student.embed_dim)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_emb, raw / raw.norm(dim=-1, keepdim=True))
    assert student.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_tower_parameters_cover_the_model(student):
    towers = student.tower_parameters()
    total = sum(p.numel() for p in student.parameters())
    assert towers["image"] > 0 and towers["text"] > 0
    assert towers["image"] + towers["text"] + 1 == total  # + the scalar logit_scale


def test_checkpoint_round_trip(student, tmp_path):
    extra = {"optim/0/exp_avg": torch.ones(3), "step": 7, "loader": {"epoch": 1, "position": 4}}
    save_checkpoint(tmp_path / "student.safetensors", student, extra, student.spec())
    spec = json.loads((tmp_path / "student.json").read_text())
    assert spec["student"] == student.registry_name and spec["kwargs"] == TINY[spec["student"]]
    loaded = load_student(tmp_path)
    for (k, a), (k2, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    tokens = student.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), student.encode_text(tokens))
    tensors, meta = read_checkpoint(tmp_path / "student.safetensors")
    assert torch.equal(tensors["optim/0/exp_avg"], torch.ones(3))
    assert meta["step"] == 7 and meta["loader"] == {"epoch": 1, "position": 4}
    with pytest.raises(ValueError, match="must contain"):
        save_checkpoint(tmp_path / "x.safetensors", student, {"exp_avg": torch.ones(1)}, {})


def test_train_augment_is_seeded_and_differs_from_eval():
    augment = TrainAugment(32)
    image = Image.linear_gradient("L").convert("RGB").resize((48, 40))
    a = augment(image, random.Random(1))
    b = augment(image, random.Random(1))
    c = augment(image, random.Random(2))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    plain = TrainAugment(32, enabled=False)(image, random.Random(1))
    student = create_student("open_clip_tiny", **TINY["open_clip_tiny"])
    assert torch.equal(plain, student.preprocess(image))
    for seed in range(50):  # every sampled crop lies inside the image
        top, left, h, w = augment.crop_box(48, 40, random.Random(seed))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48


def test_timm_hf_with_packaged_minilm_text_tower(tmp_path):
    kwargs = {"embed_dim": 16, "image_size": 32, "text_model": "minilm", "context_length": 12,
              "timm_kwargs": TINY["timm_hf"]["timm_kwargs"]}
    student = create_student("timm_hf", **kwargs).eval()
    tokens = student.tokenize(CAPTIONS)
    assert tokens.shape == (2, 12) and tokens[0, 0].item() == 101  # BERT's [CLS]
    save_checkpoint(tmp_path / "student.safetensors", student, {}, student.spec())
    loaded = load_student(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), student.encode_text(tokens))
