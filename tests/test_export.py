"""`distill export`: an open_clip student loads in open_clip as it is and gives the trained
model's embeddings; any student runs as ONNX in onnxruntime with the same embeddings for a batch
of 1 and of 7; the model card names the right fingerprints; a form that does not match is
refused and the previous export kept."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.losses import LossTerm
from pipeline.students import load_student
from stages.export.run import ExportConfig, run_export
from stages.train.run import train
from tests.test_student_families import VIT_B32_TINY
from tests.test_train import _cfg, toy  # noqa: F401  (the toy dataset and caches)

CAPTIONS = ["a red square", "a blue circle on green", "two dogs", "a cat", "the sea", "a tree",
            "an old car"]


def _train(toy, tmp_path, student: str, kwargs: dict) -> tuple:  # noqa: F811
    out = tmp_path / "student"
    summary = train(_cfg(toy, out, student=student, student_kwargs=kwargs, steps=2,
                         losses=(LossTerm("contrastive"),)), progress=False)
    return out, summary


def _pixels(student, n: int) -> torch.Tensor:
    return torch.randn(n, 3, student.image_size, student.image_size, generator=torch.Generator().manual_seed(n))


def _onnx(folder):
    import onnxruntime as ort

    return (ort.InferenceSession(str(folder / "image_encoder.onnx"), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(folder / "text_encoder.onnx"), providers=["CPUExecutionProvider"]))


def test_open_clip_student_loads_in_open_clip_and_onnx(toy, tmp_path):  # noqa: F811
    import open_clip

    student_dir, summary = _train(toy, tmp_path, "open_clip", VIT_B32_TINY)
    out = tmp_path / "export"
    result = run_export(ExportConfig(student_dir=str(student_dir), out_dir=str(out), metrics_path=None),
                        progress=False)
    student = load_student(student_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'open_clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")
    model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(image), student.preprocess(image), atol=1e-6, rtol=0)
    image_session, text_session = _onnx(out / "onnx")
    for n in (1, 7):
        pixels, captions = _pixels(student, n), CAPTIONS[:n]
        with torch.no_grad():
            want_i, want_t = student.encode_image(pixels), student.encode_text(student.tokenize(captions))
            torch.testing.assert_close(model.encode_image(pixels, normalize=True), want_i, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(tokenizer(captions), normalize=True), want_t,
                                       atol=1e-5, rtol=0)
        got_i = image_session.run(None, {"pixels": pixels.numpy()})[0]
        got_t = text_session.run(None, {"tokens": student.tokenize(captions).numpy()})[0]
        np.testing.assert_allclose(got_i, want_i.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_t, want_t.numpy(), atol=1e-4, rtol=0)
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# {student.registry_name} student\n")  # no inheritance, no recipe to name
    assert summary["dataset_fingerprint"] in card
    for path, fp in summary["caches"].items():
        assert fp in card and path in card
    assert f"create_model_and_transforms('local-dir:{out / 'open_clip'}')" in card
    assert result["exported"]["onnx"]["max_difference"]["image"] <= 1e-4
    preprocess_json = json.loads((out / "onnx" / "preprocess.json").read_text())
    assert preprocess_json["image_size"] == student.image_size and preprocess_json["mean"] == list(student.image_norm.mean)


def test_timm_hf_student_exports_onnx_with_its_tokenizer(toy, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    kwargs = {"embed_dim": 16, "image_size": 32, "context_length": 12, "text_model": "minilm",
              "text_blocks": [0], "timm_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                  "embed_dim": 32, "num_heads": 2}}
    student_dir, _ = _train(toy, tmp_path, "timm_hf", kwargs)
    out = tmp_path / "export"
    result = run_export(ExportConfig(student_dir=str(student_dir), out_dir=str(out), metrics_path=None),
                        progress=False)
    assert "not an open_clip model" in result["exported"]["open_clip_skipped"]
    assert not (out / "open_clip").exists()
    assert "open_clip: not written (timm_hf is not an open_clip model)" in (out / "MODEL_CARD.md").read_text()
    student = load_student(student_dir)
    tok = AutoTokenizer.from_pretrained(str(out / "onnx" / "tokenizer"))
    image_session, text_session = _onnx(out / "onnx")
    for n in (1, 7):
        captions = CAPTIONS[:n]
        ids = tok(captions, padding="max_length", truncation=True, max_length=12, return_tensors="np")["input_ids"]
        assert np.array_equal(ids, student.tokenize(captions).numpy())
        with torch.no_grad():
            want = student.encode_text(student.tokenize(captions)).numpy()
            want_i = student.encode_image(_pixels(student, n)).numpy()
        np.testing.assert_allclose(text_session.run(None, {"tokens": ids.astype(np.int64)})[0], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(image_session.run(None, {"pixels": _pixels(student, n).numpy()})[0], want_i,
                                   atol=1e-4, rtol=0)


def test_a_form_that_does_not_match_is_refused_and_the_old_export_kept(toy, tmp_path):  # noqa: F811
    student_dir, _ = _train(toy, tmp_path, "open_clip_tiny", {
        "embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
        "vision_heads": 2, "context_length": 12, "text_width": 32, "text_heads": 2, "text_layers": 1})
    out = tmp_path / "export"
    cfg = ExportConfig(student_dir=str(student_dir), out_dir=str(out), metrics_path=None)
    run_export(cfg, progress=False)
    before = (out / "onnx" / "image_encoder.onnx").read_bytes()
    with pytest.raises(PipelineError, match="onnxruntime gives embeddings .* not kept"):
        run_export(dataclasses.replace(cfg, onnx_atol=1e-30, formats=("onnx",)), progress=False)
    assert (out / "onnx" / "image_encoder.onnx").read_bytes() == before
    assert (out / "open_clip" / "open_clip_config.json").exists()
