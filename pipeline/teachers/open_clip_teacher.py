"""open_clip dual-encoder teachers: any built-in architecture with a pretrained tag, a local
checkpoint file, or random weights; or a custom architecture given as a config dict."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, NamedTuple

import torch

from pipeline.teachers.base import TEACHERS, Teacher, state_dict_sha256, weights_sha256


def _resolve_tag_file(model: str, pretrained: str) -> str | None:
    """Local file behind a pretrained tag (already downloaded by open_clip, so no network)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    path = open_clip.download_pretrained(cfg) if cfg else ""
    return path if path and os.path.isfile(path) else None


class _Built(NamedTuple):
    net: torch.nn.Module
    transform: Callable
    tokenizer: Callable
    weights_file: str | None
    embed_dim: int


def _build_named(model: str, pretrained: str | None, device: str) -> _Built:
    """Built-in architecture: open_clip's factory resolves tags and accepts a file path."""
    import open_clip  # imported here: importing pipeline.teachers stays fast for the CLI

    net, _, transform = open_clip.create_model_and_transforms(
        model, pretrained=pretrained, device=device
    )
    tokenizer = open_clip.get_tokenizer(model)
    if pretrained is None:
        weights_file = None
    elif os.path.isfile(pretrained):
        weights_file = pretrained
    else:
        weights_file = _resolve_tag_file(model, pretrained)
    embed_dim = open_clip.get_model_config(model.replace("/", "-"))["embed_dim"]
    return _Built(net, transform, tokenizer, weights_file, embed_dim)


def _build_custom(model_cfg: dict[str, Any], pretrained: str | None, device: str) -> _Built:
    """Architecture from a config dict: open_clip.CLIP built directly (no global config
    registration), the default eval transform, and open_clip's bundled BPE tokenizer."""
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    net = open_clip.CLIP(**cfg)
    if pretrained is not None:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"pretrained checkpoint {pretrained!r} not found (a custom model_cfg has no tags)"
            )
        open_clip.load_checkpoint(net, pretrained, strict=True)
    net.to(device)
    transform = open_clip.image_transform(net.visual.image_size, is_train=False)
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return _Built(net, transform, tokenizer, pretrained, cfg["embed_dim"])


class OpenClipTeacher(Teacher):
    """A CLIP-style image+text teacher backed by open_clip."""

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        device: str = "cpu",
        amp: bool = True,
        seed: int = 0,
    ) -> None:
        # Random initialisation draws from a private generator seeded with `seed`, so a random
        # teacher (tests, smoke runs) is the same in every process and its caches stay reusable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = (_build_custom(model_cfg, pretrained, device) if model_cfg is not None
                     else _build_named(model, pretrained, device))
        super().__init__(
            name="open_clip",
            modalities=frozenset({"image", "text"}),
            embed_dim=built.embed_dim,
            logit_scale=float(built.net.logit_scale.detach().exp()),
            transform=built.transform,
            amp=amp,
        )
        self.net = built.net
        self.tokenizer = built.tokenizer
        self._model = "custom" if model_cfg is not None else model
        self._model_cfg = copy.deepcopy(model_cfg)
        self._pretrained = pretrained
        self._weights_file = built.weights_file
        self.freeze()

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(pixels)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.net.encode_text(self.tokenizer(texts).to(self.device))

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {
            "model": self._model,
            "model_cfg": self._model_cfg,
            "pretrained": self._pretrained,
        }

    def _compute_weights_digest(self) -> str | None:
        # random init (pretrained None) has no file: hash the weights themselves
        if self._weights_file:
            return weights_sha256(self._weights_file)
        return state_dict_sha256(self.net)


@TEACHERS.register("open_clip")
def make_open_clip(**kw: Any) -> OpenClipTeacher:
    """open_clip teacher. kwargs: model (built-in name, default ViT-B-32), pretrained (tag such as
    "laion2b_s34b_b79k", a local checkpoint path, or None for random init), model_cfg (dict for a
    custom architecture; model is then ignored), device, amp, seed (initialisation of random
    weights; ignored once pretrained weights are loaded)."""
    return OpenClipTeacher(**kw)
