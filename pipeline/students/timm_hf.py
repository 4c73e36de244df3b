"""timm + Hugging Face students: a timm image model and a transformers text encoder, each with a
linear projection to ``embed_dim``; either tower may start from local weights or be cut down to
chosen blocks (:mod:`pipeline.students.towers`)."""
from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.devices import channels_last
from pipeline.students.base import CLIP_MEAN, CLIP_STD, STUDENTS, ImageNorm, Levels, Student, count_parameters
from pipeline.students.towers import image_tower, level_widths, pretrained_text_tower, random_text_tower


class TimmHfStudent(Student):
    """timm image backbone + transformers text encoder, each with a linear head to ``embed_dim``.

    ``normalize_features``: the towers' pooled features are L2-normalised before the heads (as
    the ``aligned`` teacher's heads were trained on normalised cached features).
    """

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer: Any, pad_id: int,
                 image_size: int, embed_dim: int, init_temperature: float, *,
                 proj_bias: bool = False, normalize_features: bool = False,
                 text_pooling: Literal["mean", "cls"] = "mean", norm: ImageNorm = ImageNorm()) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.image_size, self.embed_dim, self.image_norm = image_size, embed_dim, norm
        self.image_proj = nn.Linear(vision.num_features, embed_dim, bias=proj_bias)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.normalize_features, self.text_pooling = normalize_features, text_pooling
        self._tokenizer, self._pad_id = tokenizer, pad_id
        self._image_levels = level_widths(vision, image_size) if hasattr(vision, "forward_intermediates") else None

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def _head(self, proj: nn.Linear, feat: Tensor, normalize: bool) -> Tensor:
        emb = proj(F.normalize(feat, dim=-1) if self.normalize_features else feat)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _pool_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return hidden[:, 0] if self.text_pooling == "cls" else _mean_pool(hidden, mask)

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        return self._head(self.image_proj, self.vision(channels_last(pixels)), normalize)

    def _trim(self, tokens: Tensor) -> Tensor:
        """In training, the batch's padding columns after its longest caption are cut: the
        attention mask already keeps them out of every real token and of the pooling, so the
        embeddings are the same, for about an eighth less text compute on the demo's captions
        (longest of 64 about 21 of 24 tokens). Fixed-length otherwise (export, evaluation)."""
        if not self.training:
            return tokens
        used = (tokens != self._pad_id).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        tokens = self._trim(tokens)
        mask = (tokens != self._pad_id).long()
        hidden = self.text(input_ids=tokens, attention_mask=mask).last_hidden_state
        return self._head(self.text_proj, self._pool_text(hidden, mask), normalize)

    def encode_image_levels(self, pixels: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + every feature level of the timm model but the last, through timm's
        ``forward_intermediates`` (un-normed): the class token for a class-token ViT, else the
        mean over positions (patch tokens, or H×W of a CNN stage)."""
        n_levels = len(self.level_dims()["image"])
        if n_levels == 0:
            return self.encode_image(pixels, normalize), []
        class_token = (getattr(self.vision, "num_prefix_tokens", 0) > 0
                       and getattr(self.vision, "global_pool", None) == "token")
        kwargs = {"return_prefix_tokens": True, "output_fmt": "NLC"} if class_token else {}
        final, inter = self.vision.forward_intermediates(channels_last(pixels), indices=list(range(n_levels)), **kwargs)
        if class_token:
            pooled = [prefix[:, 0] for _, prefix in inter]
        else:  # NCHW maps or NLC tokens: mean over every spatial position
            pooled = [h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1) for h in inter]
        return self._head(self.image_proj, self.vision.forward_head(final), normalize), pooled

    def encode_text_levels(self, tokens: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + the output of every transformer layer but the last
        (``output_hidden_states``), each pooled over real tokens like the final one."""
        tokens = self._trim(tokens)
        mask = (tokens != self._pad_id).long()
        out = self.text(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        # hidden_states[0] is the embedding output, [l] the output of layer l.
        layers = self.text.config.num_hidden_layers
        pooled = [self._pool_text(h, mask) for h in out.hidden_states[1:layers]]
        return self._head(self.text_proj, self._pool_text(out.last_hidden_state, mask), normalize), pooled

    def level_dims(self) -> dict[str, list[int]]:
        if self._image_levels is None:  # raises, naming what the timm model lacks
            self._image_levels = level_widths(self.vision, self.image_size)
        config = self.text.config
        return {"image": list(self._image_levels),
                "text": [config.hidden_size] * (config.num_hidden_layers - 1)}

    def tower_parameters(self) -> dict[str, int]:
        return {"image": count_parameters(self.vision) + count_parameters(self.image_proj),
                "text": count_parameters(self.text) + count_parameters(self.text_proj)}


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, L, d]`` over the positions where ``mask [B, L]`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@STUDENTS.register("timm_hf")
def make_timm_hf(embed_dim: int = 128, image_size: int = 64,
                 timm_model: str = "vit_tiny_patch16_224",
                 timm_kwargs: dict[str, Any] | None = None, text_model: str | None = None,
                 context_length: int = 32, vocab_size: int = 49408, text_width: int = 128,
                 text_heads: int = 4, text_layers: int = 2, init_temperature: float = 0.07,
                 pretrained_file: str | None = None, image_blocks: Sequence[int] | None = None,
                 text_blocks: Sequence[int] | None = None, text_pooling: Literal["mean", "cls"] = "mean",
                 proj_bias: bool = False, normalize_features: bool = False,
                 text_random_init: bool = False, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, interpolation: str = "bicubic") -> TimmHfStudent:
    """A timm image tower and a transformers text tower.

    Image: ``timm_model`` with ``timm_kwargs`` (default for ViTs: ``img_size=image_size,
    patch_size=8, depth=3``); random weights, or ``pretrained_file`` (local timm weights; every
    key but the classifier's must fit); ``image_blocks`` keeps only those blocks. Pixels are
    normalised with ``image_mean``/``image_std`` after an ``interpolation`` resize (CLIP's by
    default; ImageNet's for ImageNet-pretrained backbones).
    Text: ``text_model`` None = a random tiny BERT over open_clip's BPE ids (``text_width``,
    ``text_heads``, ``text_layers``; ``vocab_size`` must cover its 49408 ids); a local model
    directory, or ``"minilm"`` for the packaged all-MiniLM-L6-v2, starts from its weights, cut to
    ``text_blocks`` when given (``text_random_init``: its architecture with random weights);
    pooled by masked ``mean`` or the ``cls`` token.
    """
    if timm_kwargs is None:
        timm_kwargs = ({"img_size": image_size, "patch_size": 8, "depth": 3}
                       if timm_model.startswith("vit") else {})
    vision = image_tower(timm_model, timm_kwargs, image_blocks, pretrained_file)
    if text_model is not None:
        text, tokenizer, pad_id = pretrained_text_tower(text_model, context_length, text_blocks,
                                                        text_random_init)
    else:
        text, tokenizer, pad_id = random_text_tower(context_length, vocab_size, text_width,
                                                    text_heads, text_layers)
    norm = ImageNorm(tuple(image_mean), tuple(image_std), interpolation)
    return TimmHfStudent(vision, text, tokenizer, pad_id, image_size, embed_dim, init_temperature,
                         proj_bias=proj_bias, normalize_features=normalize_features,
                         text_pooling=text_pooling, norm=norm)
