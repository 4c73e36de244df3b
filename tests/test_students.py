"""Student registry, API, augmentation and safetensors round trips."""
from __future__ import annotations

import json
import random

import numpy as np
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



def test_timm_hf_training_cuts_trailing_padding_without_changing_embeddings():
    """In training the text tower sees the batch's columns up to its longest caption only; with
    dropout off its embeddings (final and per layer) equal the full-length ones of eval mode."""
    kwargs = {"embed_dim": 16, "image_size": 32, "text_model": "minilm", "context_length": 24,
              "timm_kwargs": TINY["timm_hf"]["timm_kwargs"]}
    student = create_student("timm_hf", **kwargs)
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokens = student.tokenize(CAPTIONS)
    longest = int((tokens != 0).sum(1).max())
    assert longest < 24 and student.train()._trim(tokens).shape == (2, longest)
    with torch.no_grad():
        trained = student.train().encode_text(tokens), student.encode_text_levels(tokens)
        full = student.eval().encode_text(tokens), student.encode_text_levels(tokens)
    torch.testing.assert_close(trained[0], full[0], atol=1e-5, rtol=0)
    for a, b in zip(trained[1][1], full[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

# Multi-scale levels need at least two blocks per tower: three image blocks, two text blocks.
LEVELS = {
    "open_clip_tiny": {**TINY["open_clip_tiny"], "vision_layers": 3, "text_layers": 2},
    "timm_hf": {**TINY["timm_hf"], "text_layers": 2,
                "timm_kwargs": {**TINY["timm_hf"]["timm_kwargs"], "depth": 3}},
}
LEVEL_CAPTIONS = ["a red square", "two dogs on a beach", "x", "a very long caption about a cat"]


@pytest.fixture(params=sorted(LEVELS))
def level_student(request):
    torch.manual_seed(0)
    return create_student(request.param, **LEVELS[request.param]).eval()


def _blocks(student) -> dict[str, list[torch.nn.Module]]:
    """The transformer blocks of each tower, shallow to deep."""
    if student.registry_name == "open_clip_tiny":
        return {"image": list(student.model.visual.transformer.resblocks),
                "text": list(student.model.transformer.resblocks)}
    return {"image": list(student.vision.blocks), "text": list(student.text.encoder.layer)}


def _pool_by_hand(student, kind: str, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pool one block's token output row by row in float64, as documented for each tower."""
    rows = []
    for b in range(hidden.shape[0]):
        h = hidden[b].double()
        if kind == "image":  # both image towers are class-token ViTs: token 0
            rows.append(h[0])
        elif student.registry_name == "open_clip_tiny":  # EOT = the highest token id
            rows.append(h[int(np.argmax(tokens[b].numpy()))])
        else:  # mean over the real (non-pad) tokens
            real = [i for i in range(tokens.shape[1]) if tokens[b, i].item() != student._pad_id]
            rows.append(sum(h[i] for i in real) / len(real))
    return torch.stack(rows)


def _encode_levels(student, kind: str, normalize: bool = True):
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = student.tokenize(LEVEL_CAPTIONS)
    if kind == "image":
        return (pixels, tokens, student.encode_image_levels(pixels, normalize),
                student.encode_image(pixels, normalize))
    return (pixels, tokens, student.encode_text_levels(tokens, normalize),
            student.encode_text(tokens, normalize))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_levels_final_shapes_and_dims(level_student, kind):
    dims = level_student.level_dims()
    assert len(dims["image"]) == 2 and len(dims["text"]) == 1  # every block but the last
    for normalize in (True, False):
        with torch.no_grad():
            _, _, (final, levels), plain = _encode_levels(level_student, kind, normalize)
        assert torch.equal(final, plain)  # same ops as encode_*: bit for bit
        assert [tuple(level.shape) for level in levels] == [(4, d) for d in dims[kind]]
    assert all(torch.isfinite(level).all() for level in levels)
    for i in range(len(levels)):  # the levels are distinct features, not copies
        for j in range(i + 1, len(levels)):
            assert not torch.allclose(levels[i], levels[j], atol=1e-3)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_levels_match_block_outputs_in_one_pass(level_student, kind):
    """Each level is its block's output pooled by hand; every block runs exactly once."""
    blocks = _blocks(level_student)[kind]
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    hooks = [block.register_forward_hook(
        lambda _m, _i, out, i=i: captured[i].append(out[0] if isinstance(out, tuple) else out))
        for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            _, tokens, (_, levels), _ = _encode_levels(level_student, kind)
    finally:
        for hook in hooks:
            hook.remove()
    # one call of encode_*_levels plus one of the plain encode_* in _encode_levels
    assert all(len(outs) == 2 for outs in captured.values())
    for i, level in enumerate(levels):
        expected = _pool_by_hand(level_student, kind, captured[i][0], tokens)
        torch.testing.assert_close(level.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_gradient_reaches_first_block_through_a_level(level_student, kind):
    blocks = _blocks(level_student)[kind]
    _, _, (_, levels), _ = _encode_levels(level_student, kind)
    levels[0].pow(2).sum().backward()
    first = [p.grad for p in blocks[0].parameters()]
    assert all(g is not None for g in first) and any(g.abs().sum() > 0 for g in first)
    # the deepest block lies after level 0: no gradient can come from it
    assert all(p.grad is None or not p.grad.any() for p in blocks[-1].parameters())


def test_single_block_towers_have_no_levels(student):
    assert student.level_dims() == {"image": [], "text": []}
    pixels = torch.randn(2, 3, 32, 32)
    tokens = student.tokenize(CAPTIONS)
    with torch.no_grad():
        image, image_levels = student.encode_image_levels(pixels)
        text, text_levels = student.encode_text_levels(tokens)
        assert torch.equal(image, student.encode_image(pixels))
        assert torch.equal(text, student.encode_text(tokens))
    assert image_levels == [] and text_levels == []
