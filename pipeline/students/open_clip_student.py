"""open_clip students: an open_clip ``CLIP`` (ViT image tower + causal text transformer)."""
from __future__ import annotations

import math

from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.students.base import STUDENTS, Levels, Student, count_parameters


class OpenClipStudent(Student):
    """open_clip ``CLIP`` (ViT image tower + causal text transformer) built from a config."""

    def __init__(self, model: nn.Module, image_size: int, embed_dim: int, context_length: int) -> None:
        super().__init__()
        from open_clip import SimpleTokenizer

        self.model = model
        self.image_size, self.embed_dim = image_size, embed_dim
        # The BPE vocabulary ships inside the open_clip wheel: tokenizing works offline.
        self._tokenizer = SimpleTokenizer(context_length=context_length)

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_image(pixels, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def encode_image_levels(self, pixels: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + the class token of each ViT block but the last.

        The class token is read from the residual stream after the block (the stream starts
        after ``ln_pre``), before ``ln_post``; with ``pool_type='avg'`` the patch tokens' mean.
        """
        visual = self.model.visual
        levels = list(range(len(visual.transformer.resblocks) - 1))
        if not levels:
            return self.encode_image(pixels, normalize), []
        out = self.model.forward_intermediates(
            image=pixels, image_indices=levels, normalize=normalize, image_output_fmt="NLC",
            image_output_extra_tokens=True)
        if visual.pool_type == "tok":
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

        levels = list(range(len(self.model.transformer.resblocks) - 1))
        if not levels:
            return self.encode_text(tokens, normalize), []
        out = self.model.forward_intermediates(text=tokens, text_indices=levels,
                                               normalize=normalize)
        eos = getattr(self.model, "text_eos_id", None)
        pooled = [text_global_pool(h, tokens, self.model.text_pool_type, eos_token_id=eos)
                  for h in out["text_intermediates"]]
        return out["text_features"], pooled

    def level_dims(self) -> dict[str, list[int]]:
        image, text = self.model.visual.transformer, self.model.transformer
        return {"image": [image.width] * (len(image.resblocks) - 1),
                "text": [text.width] * (len(text.resblocks) - 1)}

    def tower_parameters(self) -> dict[str, int]:
        text = count_parameters(self.model) - count_parameters(self.model.visual) - self.model.logit_scale.numel()
        return {"image": count_parameters(self.model.visual), "text": text}


@STUDENTS.register("open_clip_tiny")
def make_open_clip_tiny(embed_dim: int = 128, image_size: int = 64, patch_size: int = 8,
                        vision_width: int = 128, vision_layers: int = 3, vision_heads: int = 4,
                        context_length: int = 32, vocab_size: int = 49408, text_width: int = 128,
                        text_heads: int = 4, text_layers: int = 2,
                        init_temperature: float = 0.07) -> OpenClipStudent:
    """A tiny open_clip CLIP: with the defaults ~0.6M image and ~0.4M text-transformer params
    plus the 6.3M-param token embedding; a step at batch 64 takes ~0.2 s on 2 CPU cores."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=patch_size,
                           image_size=image_size, head_width=vision_width // vision_heads)
    text = CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                       heads=text_heads, layers=text_layers)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text,
                 init_logit_scale=math.log(1.0 / init_temperature))
    return OpenClipStudent(model, image_size, embed_dim, context_length)


