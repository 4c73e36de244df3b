"""Weight inheritance: a student built from its teacher with chosen layers holds the teacher's
tensors bit for bit (open_clip ViT and text blocks, BERT-family layers, timm EfficientNet /
MobileNet blocks, the aligned teacher's encoders and heads); with every layer kept it computes
the teacher's own embeddings; a layer list that does not fit is an error naming it; training
from an inherited start runs no teacher forward and records what it inherited."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import TeacherEntry
from pipeline.errors import ConfigError, PipelineError
from pipeline.losses import LossTerm
from pipeline.fingerprint import fingerprint
from pipeline.students import load_student
from pipeline.students.inherit import inherit
from pipeline.teachers import Teacher, create_teacher
from pipeline.teachers.aligned import AlignHeads, aligned_fingerprint, heads_sha256, save_heads
from stages.train.run import StudentInit, load_train_config, train
from tests.test_teachers import TINY_CLIP
from tests.test_train import _cfg, toy  # noqa: F401  (the toy dataset and caches)

TINY_CLIP3 = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 3},
              "text_cfg": {**TINY_CLIP["text_cfg"], "layers": 2}}
CAPTIONS = ["a red apple on a table", "two dogs", "a smiling face with sunglasses"]


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60 + 9 * i, 72, 3), dtype=np.uint8)) for i in range(n)]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_open_clip_vit_and_text_blocks_are_the_teachers():
    teacher = create_teacher("open_clip", model_cfg=TINY_CLIP3, seed=3)
    student = inherit(teacher, "clip", [0, 2], [1], {})
    assert student.registry_name == "open_clip"
    t, s = teacher.net, student.model
    assert len(s.visual.transformer.resblocks) == 2 and len(s.transformer.resblocks) == 1
    _same(s.visual.transformer.resblocks[0], t.visual.transformer.resblocks[0])
    _same(s.visual.transformer.resblocks[1], t.visual.transformer.resblocks[2])
    _same(s.transformer.resblocks[0], t.transformer.resblocks[1])
    for name in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                 "ln_post.bias", "proj"):
        assert torch.equal(s.visual.state_dict()[name], t.visual.state_dict()[name]), name
    for name in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                 "text_projection", "logit_scale"):
        assert torch.equal(s.state_dict()[name], t.state_dict()[name]), name
    init = student.spec()["init"]
    assert init["from_teacher"] == "clip" and init["image_layers"] == [0, 2] and init["text_layers"] == [1]
    assert init["teacher_fingerprint"] == fingerprint(teacher.fingerprint())


def test_open_clip_with_every_block_is_the_teacher():
    teacher = create_teacher("open_clip", model_cfg=TINY_CLIP3, seed=4)
    student = inherit(teacher, "clip", None, None, {}).eval()
    pixels = torch.stack([teacher.preprocess(im) for im in _images()])
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(pixels), teacher.encode_images(pixels))
        torch.testing.assert_close(student.encode_text(student.tokenize(CAPTIONS)),
                                   teacher.encode_texts(CAPTIONS))


def test_layer_lists_that_do_not_fit_are_named():
    teacher = create_teacher("open_clip", model_cfg=TINY_CLIP3, seed=3)
    with pytest.raises(PipelineError, match=r"init.image_layers \[0, 3\] do not fit: .*\[0, 3\)"):
        inherit(teacher, "clip", [0, 3], None, {})
    with pytest.raises(PipelineError, match=r"init.text_layers \[1, 0\] do not fit"):
        inherit(teacher, "clip", None, [1, 0], {})
    with pytest.raises(PipelineError, match="train.student is 'timm_hf', but a student inheriting "
                                            "from 'clip' .* is built as open_clip"):
        inherit(teacher, "clip", None, None, {}, student_name="timm_hf")


def test_bert_family_text_layers_0_and_5_of_minilm():
    teacher = create_teacher("hf_text", model="minilm")
    student = inherit(teacher, "minilm", None, [0, 5], {"embed_dim": 16, "image_size": 32})
    s, t = student.text, teacher.encoder
    assert len(s.encoder.layer) == 2
    _same(s.embeddings, t.embeddings)
    _same(s.encoder.layer[0], t.encoder.layer[0])
    _same(s.encoder.layer[1], t.encoder.layer[5])
    assert student.spec()["init"]["inherited"] == ["text tower"]


def test_timm_mobilenet_blocks_are_the_teachers():
    torch.manual_seed(0)
    teacher = create_teacher("timm_vision", model="mobilenetv3_small_050")
    blocks = [b for stage in teacher.net.blocks for b in stage]
    keep = [0, 1, 3, 6]
    student = inherit(teacher, "mnv3", keep, None, {"embed_dim": 16, "image_size": 64})
    kept = [b for stage in student.vision.blocks for b in stage]
    assert len(kept) == len(keep)
    for mine, index in zip(kept, keep):
        _same(mine, blocks[index])
    _same(student.vision.conv_stem, teacher.net.conv_stem)
    with torch.no_grad():  # the cut-down tower runs and feeds the projection
        assert student.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_efficientnet_lite_is_timms_tf_port_with_the_same_weights():
    teacher = create_teacher("efficientnet_lite")
    student = inherit(teacher, "effnet", None, None, {"embed_dim": 16}).eval()
    assert student.spec()["kwargs"]["timm_model"] == "tf_efficientnet_lite0"
    torch.testing.assert_close(student.vision.conv_stem.weight, teacher.net._conv_stem.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.vision.blocks[6][0].conv_pwl.weight,
                               teacher.net._blocks[15]._project_conv.weight, rtol=0, atol=0)
    pixels = torch.stack([teacher.preprocess(im) for im in _images(2)])
    assert torch.equal(pixels, torch.stack([student.preprocess(im) for im in _images(2)]))
    with torch.no_grad():  # the same function: the pooled features before the projection
        reference = teacher.net.extract_features(pixels).mean((2, 3))  # contiguous NCHW
        torch.testing.assert_close(student.vision(pixels), reference, atol=1e-5, rtol=1e-5)
        # the teacher's own path lays pixels out channels-last: the same values
        torch.testing.assert_close(teacher._embed_images(pixels), reference, atol=1e-5, rtol=1e-5)


def write_aligned_heads(folder: Path, vision: TeacherEntry, text: TeacherEntry, embed_dim: int = 32,
                        seed: int = 0) -> Path:
    """A heads folder as `distill align` writes it, with random heads over two real teachers."""
    v, t = (create_teacher(e.teacher, **e.kwargs) for e in (vision, text))
    torch.manual_seed(seed)
    heads = AlignHeads(v.embed_dim, t.embed_dim, embed_dim, init_logit_scale=20.0)
    weights = heads_sha256(heads)
    fields = aligned_fingerprint(v.fingerprint(), fingerprint(t.fingerprint()), fingerprint(v.fingerprint()),
                                 weights, heads.args, embed_dim, 20.0)
    spec = {"heads_args": heads.args, "weights_sha256": weights, "logit_scale": 20.0,
            "teacher": fields, "teacher_fingerprint": fingerprint(fields),
            "vision": {"name": "effnet", "teacher_fingerprint": fingerprint(v.fingerprint()),
                       "entry": dataclasses.asdict(vision)},
            "text": {"name": "minilm", "teacher_fingerprint": fingerprint(t.fingerprint()),
                     "entry": dataclasses.asdict(text)}}
    save_heads(folder, heads, spec)
    return folder


EFFNET, MINILM = TeacherEntry("efficientnet_lite"), TeacherEntry("hf_text", {"model": "minilm"})


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> Teacher:
    folder = write_aligned_heads(tmp_path_factory.mktemp("heads") / "aligned", EFFNET, MINILM)
    return create_teacher("aligned", heads=str(folder))


def test_aligned_encoders_and_heads_are_inherited(aligned):
    student = inherit(aligned, "aligned", [0, 1, 3, 5, 8, 11, 15], [0, 5], {})
    assert student.registry_name == "timm_hf"
    _same(student.image_proj, aligned.heads.vision)
    _same(student.text_proj, aligned.heads.text)
    _same(student.text.encoder.layer[1], aligned.text.encoder.encoder.layer[5])
    assert torch.equal(student.vision.blocks[6][0].conv_dw.weight,
                       aligned.vision.net._blocks[15]._depthwise_conv.weight)
    assert student.logit_scale.exp().item() == pytest.approx(aligned.logit_scale, rel=1e-6)
    init = student.spec()["init"]
    assert init["inherited"] == ["image tower", "text tower", "logit_scale", "image head", "text head"]
    assert init["teacher_fingerprint"] == fingerprint(aligned.fingerprint())


def test_aligned_with_every_layer_computes_the_teachers_embeddings(aligned):
    student = inherit(aligned, "aligned", None, None, {}).eval()
    images = _images(2)
    with torch.no_grad():
        mine = student.encode_image(torch.stack([student.preprocess(im) for im in images]))
        theirs = aligned.encode_images(torch.stack([aligned.preprocess(im) for im in images]))
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(student.encode_text(student.tokenize(CAPTIONS)),
                                   aligned.encode_texts(CAPTIONS), atol=1e-5, rtol=1e-4)


def test_a_saved_inherited_student_reloads_without_its_teacher(aligned, tmp_path):
    from pipeline.students import save_checkpoint

    student = inherit(aligned, "aligned", [0, 1, 3, 5, 8, 11, 15], [0, 5], {"image_size": 96}).eval()
    save_checkpoint(tmp_path / "student.safetensors", student, {}, student.spec())
    loaded = load_student(tmp_path)
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), student.encode_image(pixels))
    spec = json.loads((tmp_path / "student.json").read_text())
    assert spec["init"]["image_layers"] == [0, 1, 3, 5, 8, 11, 15]
    # the reloaded student still says where it started, and so does its model card
    from pipeline.export.card import card_title, model_card

    assert loaded.spec()["init"] == spec["init"] == student.spec()["init"]
    card = model_card("s", loaded.spec(), None, None, {})
    assert f"teacher `aligned` (aligned, fingerprint `{spec['init']['teacher_fingerprint']}`)" in card
    assert card_title(loaded.spec(), {"recipe": "best"}) == f"{spec['student']} student, inherited from aligned, recipe best"



def test_training_from_an_inherited_start_runs_no_teacher_forward(toy, tmp_path):  # noqa: F811
    """`train.init.from_teacher`: the teacher is built once to read its weights, the run counts no
    teacher forward pass, the saved spec records the inheritance, and the run's fingerprint
    differs from training the same student from random weights."""
    entry = TeacherEntry("open_clip", {"model_cfg": TINY_CLIP3, "seed": 3})
    init = StudentInit(from_teacher="clip", image_layers=(0, 2), text_layers=(1,), teacher=entry)
    forwards = Teacher.total_forward_calls
    cfg = _cfg(toy, tmp_path / "inherited", student="open_clip", student_kwargs={}, init=init,
               steps=2, losses=(LossTerm("contrastive"), LossTerm("feature")))
    summary = train(cfg, progress=False)
    assert summary["teacher_forward_calls"] == 0 and Teacher.total_forward_calls == forwards
    spec = json.loads((tmp_path / "inherited" / "student.json").read_text())
    assert spec["init"]["image_layers"] == [0, 2] and spec["init"]["from_teacher"] == "clip"
    random = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "random"),
                                       init=dataclasses.replace(init, weights="random")), progress=False)
    assert random["run_fingerprint"] != summary["run_fingerprint"]
    assert random["spec"]["init"]["inherited"] == []
    # from params.yaml: from_teacher names a `teachers` entry, or the entry is given inline
    params = {"teachers": {"clip": dataclasses.asdict(entry)},
              "train": {"student": "open_clip", "init": {"from_teacher": "clip", "text_layers": [1]}}}
    assert load_train_config(params).init.teacher == entry
    with pytest.raises(ConfigError, match="'nope' is not a `teachers` entry"):
        load_train_config({"train": {"init": {"from_teacher": "nope"}}})
