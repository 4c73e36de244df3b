"""Any student as two ONNX encoders with a dynamic batch: ``image_encoder.onnx`` (``pixels
[B, 3, S, S]`` float32 -> ``image_embeds [B, D]``) and ``text_encoder.onnx`` (``tokens [B, L]``
int64 -> ``text_embeds [B, D]``), both L2-normalised, plus ``preprocess.json`` (image size,
mean, std, interpolation; the tokenizer and context length) so that onnxruntime alone serves
them. A Hugging Face tokenizer is saved beside them (``tokenizer/``)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.scratch import write_durable

IMAGE_FILE, TEXT_FILE, PREPROCESS_FILE = "image_encoder.onnx", "text_encoder.onnx", "preprocess.json"
log = logging.getLogger(__name__)


class _Encoder(nn.Module):
    """One tower of a student as a module of one tensor input (what the exporter traces)."""

    def __init__(self, student: nn.Module, kind: str) -> None:
        super().__init__()
        self.student, self.kind = student, kind

    def forward(self, x: Tensor) -> Tensor:
        return self.student.encode_image(x) if self.kind == "image" else self.student.encode_text(x)


def _export(module: nn.Module, example: Tensor, path: Path, name: str, output: str, opset: int) -> None:
    """torch.export-based ONNX export with a dynamic batch (the TorchScript tracer bakes the
    traced batch's branches into Hugging Face attention masks). Its progress lines are kept off
    stdout, which carries the stage's JSON summary."""
    tmp = path.with_name(path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=[name], output_names=[output],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                          verbose=False)
    log.debug("onnx export of %s: %s", path.name, chatter.getvalue())
    tmp.replace(path)


def tokenizer_info(student: Any, out: Path) -> dict[str, Any]:
    """How to make the text encoder's input: the HF tokenizer saved into ``out/tokenizer``, or
    open_clip's BPE tokenizer (which ships with open_clip)."""
    tok = student._tokenizer
    hf = getattr(tok, "_tok", None)
    if hf is not None:
        hf.save_pretrained(str(out / "tokenizer"))
        return {"tokenizer": "tokenizer/", "kind": "huggingface", "context_length": tok.context_length,
                "pad_id": tok.pad_id, "padding": "max_length"}
    return {"tokenizer": "open_clip.SimpleTokenizer", "kind": "open_clip",
            "context_length": int(getattr(tok, "context_length", 77))}


def export_onnx(student: Any, out: Path, opset: int = 17) -> dict[str, Any]:
    """Write the two encoders and ``preprocess.json`` into ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    student = student.eval()
    pixels = torch.zeros(2, 3, student.image_size, student.image_size)
    tokens = student.tokenize(["an example caption", "another one"])
    _export(_Encoder(student, "image"), pixels, out / IMAGE_FILE, "pixels", "image_embeds", opset)
    _export(_Encoder(student, "text"), tokens, out / TEXT_FILE, "tokens", "text_embeds", opset)
    norm = student.image_norm
    info = {"image_size": student.image_size, "mean": list(norm.mean), "std": list(norm.std),
            "interpolation": norm.interpolation, "resize": "shorter side, then centre crop",
            "text": tokenizer_info(student, out), "embed_dim": student.embed_dim, "opset": opset}
    write_durable(out / PREPROCESS_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return {"dir": str(out), "files": [IMAGE_FILE, TEXT_FILE, PREPROCESS_FILE], **info}


def onnx_encoders(out: Path) -> tuple[Any, Any]:
    """(image session, text session) of an exported folder (onnxruntime, CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    return (ort.InferenceSession(str(out / IMAGE_FILE), opts, providers=providers),
            ort.InferenceSession(str(out / TEXT_FILE), opts, providers=providers))


def max_differences(student: Any, out: Path, pixels: Tensor, tokens: Tensor) -> dict[str, float]:
    """Largest |onnxruntime - torch| of each encoder on the given batch."""
    image, text = onnx_encoders(out)
    with torch.no_grad():
        want_i = student.encode_image(pixels).numpy()
        want_t = student.encode_text(tokens).numpy()
    got_i = image.run(None, {"pixels": pixels.numpy().astype(np.float32)})[0]
    got_t = text.run(None, {"tokens": tokens.numpy().astype(np.int64)})[0]
    return {"image": float(np.abs(got_i - want_i).max()), "text": float(np.abs(got_t - want_t).max())}
