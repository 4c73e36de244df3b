"""Students by the names users know: open_clip architectures (with model_cfg overrides and local
checkpoints), timm + Hugging Face towers with local weights and chosen blocks, and the errors of
bad input (unknown names, missing or ill-fitting checkpoints)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.errors import PipelineError
from pipeline.registry import UnknownNameError
from pipeline.students import STUDENTS, create_student, load_student, save_checkpoint
from tests.test_students import TINY

REPO = Path(__file__).resolve().parent.parent
# A ViT-B-32 and a MobileCLIP2-S0 of open_clip, shrunk by model_cfg overrides (random init).
VIT_B32_TINY = {"model": "ViT-B-32", "model_cfg": {
    "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16,
                                    "head_width": 16},
    "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 2}}}
MOBILECLIP2_TINY = {"model": "MobileCLIP2-S0", "model_cfg": {
    "embed_dim": 16, "vision_cfg": {"image_size": 64},
    "text_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1}}}
FAMILIES = {**TINY, "open_clip": VIT_B32_TINY}


def _sizes(student) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, student.image_size, student.image_size, generator=gen)
    return pixels, student.tokenize(["a red apple", "a blue car", "a smiling face", "a dog"])


def test_every_registered_family_has_a_small_config_here():
    assert set(STUDENTS.names()) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_builds_trains_a_step_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    student = create_student(name, **FAMILIES[name]).train()
    pixels, tokens = _sizes(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    logits = student.logit_scale.exp() * student.encode_image(pixels) @ student.encode_text(tokens).T
    loss = F.cross_entropy(logits, torch.arange(4))
    loss.backward()
    opt.step()
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any("proj" in k or "visual" in k or "vision" in k for k in changed), changed
    save_checkpoint(tmp_path / "student.safetensors", student, {}, student.spec())
    loaded = load_student(tmp_path)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), student.encode_image(pixels))
        torch.testing.assert_close(loaded.encode_text(tokens), student.encode_text(tokens))


def test_open_clip_uses_the_models_own_preprocess_and_tokenizer():
    import open_clip

    student = create_student("open_clip", **VIT_B32_TINY)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **{
        k: v for k, v in student.model_cfg.items()})
    pre = open_clip.get_model_preprocess_cfg(model)
    assert student.image_size == pre["size"][0] == 32
    assert student.image_norm.mean == tuple(pre["mean"]) and student.image_norm.std == tuple(pre["std"])
    expected = open_clip.get_tokenizer("ViT-B-32", context_length=12)(["a red apple"])
    assert torch.equal(student.tokenize(["a red apple"]), expected)


def test_a_mobileclip2_s0_class_model_builds_offline_with_small_overrides():
    student = create_student("open_clip", **MOBILECLIP2_TINY).eval()
    assert type(student.model).__name__ == "CustomTextCLIP"
    assert student.model.visual.trunk.__class__.__name__ == "FastVit"  # fastvit_mci0's trunk
    pixels, tokens = _sizes(student)
    with torch.no_grad():
        image, levels = student.encode_image_levels(pixels)
        text = student.encode_text(tokens)
    assert image.shape == text.shape == (4, 16)
    assert [lv.shape[1] for lv in levels] == student.level_dims()["image"]


def test_open_clip_starts_from_a_local_checkpoint_file(tmp_path):
    torch.manual_seed(3)
    source = create_student("open_clip", **VIT_B32_TINY)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(4)  # another random start: only the file can make the two equal
    student = create_student("open_clip", **VIT_B32_TINY, pretrained=str(path))
    for key, value in source.model.state_dict().items():
        assert torch.equal(student.model.state_dict()[key], value), key
    assert "pretrained" not in student.spec()["kwargs"]
    assert student.spec()["init"] == {"pretrained": str(path)}


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    source = create_student("open_clip", **VIT_B32_TINY).model.state_dict()
    state = {k: v.contiguous() for k, v in source.items() if k != "ln_final.weight"}
    state["text_projection"] = torch.zeros(7, 7)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(PipelineError) as err:
        create_student("open_clip", **VIT_B32_TINY, pretrained=str(path))
    message = str(err.value)
    assert "missing keys [ln_final.weight]" in message and "unexpected keys [extra.weight]" in message
    assert "text_projection (7, 7) (expected (32, 16))" in message and "\n" not in message


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown open_clip model 'ViT-Q-99'; known: .*ViT-B-32"):
        create_student("open_clip", model="ViT-Q-99")


def test_a_missing_checkpoint_file_and_an_unknown_tag_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match=f"pretrained checkpoint {tmp_path}/none.pt not found"):
        create_student("open_clip", **VIT_B32_TINY, pretrained=str(tmp_path / "none.pt"))
    with pytest.raises(PipelineError, match="'no_such_tag' is neither a file nor a pretrained tag of "
                                            "'ViT-B-32' \\(tags: .*openai"):
        create_student("open_clip", **VIT_B32_TINY, pretrained="no_such_tag")
    with pytest.raises(PipelineError, match=f"{tmp_path}/alone: no trained student here .*distill train"):
        load_student(tmp_path / "alone")


def test_timm_tower_starts_from_a_local_file_without_its_classifier(tmp_path):
    import timm

    torch.manual_seed(5)
    full = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    path = tmp_path / "mnv3.pt"
    torch.save(full.state_dict(), path)  # classifier included, as timm checkpoints come
    kwargs = dict(TINY["timm_hf"], timm_model="mobilenetv3_small_050", timm_kwargs={})
    student = create_student("timm_hf", **kwargs, pretrained_file=str(path))
    for key, value in student.vision.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.0")}, path)
    with pytest.raises(PipelineError, match="missing keys \\[blocks.0.0"):
        create_student("timm_hf", **kwargs, pretrained_file=str(path))


def test_chosen_image_blocks_must_chain_and_text_blocks_must_exist():
    kwargs = dict(TINY["timm_hf"], timm_model="tf_efficientnet_lite0", timm_kwargs={})
    with pytest.raises(PipelineError, match="image layers \\[0, 2\\] do not chain: block 2 takes 24 "
                                            "channels but gets 16"):
        create_student("timm_hf", **kwargs, image_blocks=[0, 2])
    with pytest.raises(PipelineError, match="text layers \\[0, 6\\] do not fit: .*\\[0, 6\\)"):
        create_student("timm_hf", **dict(kwargs, text_model="minilm"), text_blocks=[0, 6])


def test_bad_student_input_is_one_line_on_the_command_line(tmp_path):
    """`distill train` with a missing checkpoint file: one line on stderr, exit code 1."""
    from pipeline.data.writing import write_manifest

    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n  student: open_clip\n  student_kwargs: {model: ViT-B-32, pretrained: "
        f"{tmp_path}/missing.safetensors}}\n  caches: [{tmp_path}/none.zarr]\n  dataset: {tmp_path}\n")
    (tmp_path / "train").mkdir()
    write_manifest(tmp_path / "train")  # an empty split: the student is built before the stores
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "train", "--params", str(params)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.safetensors not found" in errors[0], proc.stderr[-2000:]
