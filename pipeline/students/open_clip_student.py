"""open_clip students: any architecture ``open_clip.list_models()`` names (``ViT-B-32``,
``MobileCLIP2-S0``, ``RN50``...), with ``model_cfg`` overrides, starting from random weights, a
local checkpoint file or an open_clip pretrained tag; and the small ``open_clip_tiny``.

The model's own transforms (size, mean/std, interpolation from open_clip's preprocess config)
and tokenizer are used, so an exported student behaves as open_clip's users expect.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.registry import UnknownNameError
from pipeline.students.base import STUDENTS, ImageNorm, Levels, Student, count_parameters
from pipeline.students.weights import load_weights_file

class OpenClipStudent(Student):
    """An open_clip model (``CLIP`` or ``CustomTextCLIP``) as a student."""

    def __init__(self, model: nn.Module, image_size: int, embed_dim: int, tokenizer: Any,
                 norm: ImageNorm = ImageNorm(), model_cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.image_size, self.embed_dim = image_size, embed_dim
        self.image_norm = norm
        self.model_cfg = model_cfg  # the full open_clip config (export writes it)
        self._tokenizer = tokenizer

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    @property
    def _text(self) -> nn.Module:
        """The text tower: ``model.text`` of a CustomTextCLIP, else the CLIP itself."""
        return getattr(self.model, "text", self.model)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_image(pixels, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def encode_image_levels(self, pixels: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + one pooled level per image block but the last: the class token of
        each ViT block (from the residual stream after the block, before ``ln_post``; with
        ``pool_type='avg'`` the patch tokens' mean), or each timm stage's mean over positions."""
        levels = list(range(len(self.level_dims()["image"])))
        if not levels:
            return self.encode_image(pixels, normalize), []
        visual = self.model.visual
        vit = hasattr(visual, "transformer")
        out = self.model.forward_intermediates(
            image=pixels, image_indices=levels, normalize=normalize,
            **({"image_output_fmt": "NLC", "image_output_extra_tokens": True} if vit else {}))
        if not vit:  # NCHW maps of a CNN / hybrid trunk
            pooled = [h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1)
                      for h in out["image_intermediates"]]
        elif visual.pool_type == "tok":
            pooled = [prefix[:, 0] for prefix in out["image_intermediates_prefix"]]
        elif visual.pool_type == "avg":
            pooled = [tokens.mean(dim=1) for tokens in out["image_intermediates"]]
        else:
            raise PipelineError(f"open_clip image pool_type {visual.pool_type!r} has no level "
                                "pooling; use pool_type 'tok' or 'avg'")
        return out["image_features"], pooled

    def encode_text_levels(self, tokens: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + each text block but the last, pooled as open_clip pools the final
        one (the EOT token for ``argmax``), from the residual stream before ``ln_final``."""
        from open_clip.transformer import text_global_pool

        levels = list(range(len(self._text.transformer.resblocks) - 1))
        if not levels:
            return self.encode_text(tokens, normalize), []
        out = self.model.forward_intermediates(text=tokens, text_indices=levels,
                                               normalize=normalize)
        text = self._text
        pool = getattr(text, "pool_type", None) or getattr(self.model, "text_pool_type", "argmax")
        eos = getattr(text, "eos_id", None) or getattr(self.model, "text_eos_id", None)
        pooled = [text_global_pool(h, tokens, pool, eos_token_id=eos)
                  for h in out["text_intermediates"]]
        return out["text_features"], pooled

    def level_dims(self) -> dict[str, list[int]]:
        visual, text = self.model.visual, self._text.transformer
        if hasattr(visual, "transformer"):
            image = [visual.transformer.width] * (len(visual.transformer.resblocks) - 1)
        else:  # a timm trunk: its feature stages but the last
            info = getattr(getattr(visual, "trunk", None), "feature_info", None) or []
            image = [int(level["num_chs"]) for level in list(info)[:-1]]
        return {"image": image, "text": [text.width] * (len(text.resblocks) - 1)}

    def tower_parameters(self) -> dict[str, int]:
        text = count_parameters(self.model) - count_parameters(self.model.visual) - self.model.logit_scale.numel()
        return {"image": count_parameters(self.model.visual), "text": text}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``overrides`` applied key by key (nested dicts merged, not replaced)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        out[key] = (deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else copy.deepcopy(value))
    return out


def model_config(model: str | None, model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The full open_clip config: ``model``'s (an ``open_clip.list_models()`` name) with
    ``model_cfg`` merged in, or ``model_cfg`` alone when ``model`` is None."""
    import open_clip

    if model is None:
        if not model_cfg or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
            raise PipelineError("student open_clip: give `model` (an open_clip architecture) or a "
                                "complete `model_cfg` (embed_dim, vision_cfg, text_cfg)")
        return copy.deepcopy(model_cfg)
    if model not in open_clip.list_models():
        raise UnknownNameError(f"unknown open_clip model {model!r}; known: "
                               f"{', '.join(open_clip.list_models())}")
    return deep_merge(open_clip.get_model_config(model), model_cfg)


def _is_file_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors")


def build_open_clip(model: str | None, cfg: dict[str, Any], pretrained: str | None) -> nn.Module:
    """The open_clip model of config ``cfg``; weights from ``pretrained`` (a local checkpoint
    file, or an open_clip pretrained tag of ``model``, which open_clip downloads) or random."""
    import open_clip

    tag = pretrained if pretrained and not os.path.isfile(pretrained) and not _is_file_path(pretrained) else None
    if pretrained and not tag and not os.path.isfile(pretrained):
        raise PipelineError(f"student open_clip: pretrained checkpoint {pretrained} not found")
    if tag is not None:
        known = open_clip.list_pretrained_tags_by_model(model) if model else []
        if tag not in known:
            raise PipelineError(f"student open_clip: {tag!r} is neither a file nor a pretrained tag "
                                f"of {model!r} (tags: {', '.join(known) or 'none'})")
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if model is not None:
        net = open_clip.create_model(model, pretrained=tag, load_weights=tag is not None, **cfg)
    else:
        net = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    if pretrained and tag is None:
        load_weights_file(net, pretrained, f"open_clip {model or 'model_cfg'}",
                          convert=_open_clip_state if custom else None)
    return net


def _open_clip_state(state: dict[str, Any]) -> dict[str, Any]:
    """A CLIP-layout state dict as a CustomTextCLIP's (text weights under ``text.``)."""
    from open_clip.model import convert_to_custom_text_state_dict

    return convert_to_custom_text_state_dict(state)


@contextmanager
def _without_log(text: str) -> Iterator[None]:
    """Drop open_clip's root-logger records containing ``text`` while the block runs."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def preprocess_of(net: nn.Module) -> Any:
    """open_clip's preprocess config of ``net`` (a pretrained tag's, else open_clip's defaults
    at the model's image size)."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    pre = open_clip.get_model_preprocess_cfg(net)
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    return PreprocessCfg(**{k: v for k, v in pre.items() if k in known})


def _square(size: Any) -> int:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise PipelineError(f"student open_clip: image size {size} is not square; set "
                            "model_cfg.vision_cfg.image_size to one number")
    return int(size[0])


@STUDENTS.register("open_clip")
def make_open_clip(model: str | None = None, model_cfg: dict[str, Any] | None = None,
                   pretrained: str | None = None, init_temperature: float | None = None) -> OpenClipStudent:
    """Any open_clip architecture. ``model``: an ``open_clip.list_models()`` name (None: a complete
    ``model_cfg``); ``model_cfg``: overrides merged into its config (e.g. ``{vision_cfg: {layers:
    6}, text_cfg: {layers: 4}}``); ``pretrained``: a local checkpoint file (its keys must fit) or
    one of open_clip's pretrained tags for ``model`` (downloaded from the hub); None = random.
    ``init_temperature`` sets the initial logit scale (default: the model's own)."""
    import open_clip

    cfg = model_config(model, model_cfg)
    full = copy.deepcopy(cfg)
    with _without_log("initialized randomly"):  # a student starts random unless told otherwise
        net = build_open_clip(model, cfg, pretrained)
    if init_temperature is not None:
        net.logit_scale.data.fill_(math.log(1.0 / init_temperature))
    pre = preprocess_of(net)
    norm = ImageNorm(tuple(pre.mean), tuple(pre.std), pre.interpolation)
    context = full["text_cfg"].get("context_length", 77)
    tokenizer = (open_clip.get_tokenizer(model, context_length=context) if model is not None
                 else open_clip.SimpleTokenizer(context_length=context))
    return OpenClipStudent(net, _square(pre.size), int(full["embed_dim"]), tokenizer, norm, full)


@STUDENTS.register("open_clip_tiny")
def make_open_clip_tiny(embed_dim: int = 128, image_size: int = 64, patch_size: int = 8,
                        vision_width: int = 128, vision_layers: int = 3, vision_heads: int = 4,
                        context_length: int = 32, vocab_size: int = 49408, text_width: int = 128,
                        text_heads: int = 4, text_layers: int = 2,
                        init_temperature: float = 0.07) -> OpenClipStudent:
    """A tiny open_clip CLIP: with the defaults ~0.6M image and ~0.4M text-transformer params
    plus the 6.3M-param token embedding; a step at batch 64 takes ~0.2 s on 2 CPU cores."""
    from open_clip import SimpleTokenizer
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=patch_size,
                           image_size=image_size, head_width=vision_width // vision_heads)
    text = CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                       heads=text_heads, layers=text_layers)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text,
                 init_logit_scale=math.log(1.0 / init_temperature))
    cfg = {"embed_dim": embed_dim,  # as open_clip's JSON configs: unset (None) fields left out
           "vision_cfg": {k: v for k, v in vars(vision).items() if v is not None},
           "text_cfg": {k: v for k, v in vars(text).items() if v is not None}}
    # The BPE vocabulary ships inside the open_clip wheel: tokenizing works offline.
    return OpenClipStudent(model, image_size, embed_dim, SimpleTokenizer(context_length=context_length),
                           model_cfg=cfg)
