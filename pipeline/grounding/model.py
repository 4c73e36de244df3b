"""Grounding students: TransVG-style models (Deng et al., ICCV 2021), built by name.

An image tower turns the image into patch tokens, a text tower turns the expression into token
features, and a fusion transformer reads ``[REG]`` + visual tokens + linguistic tokens; a box head
on the ``[REG]`` output predicts the box as normalised ``(cx, cy, w, h)`` in ``[0, 1]`` (its
centre read off an attention map of ``[REG]`` over the fused visual tokens, see ``_box``). The fusion
outputs at the first visual token and at the first linguistic token (the text's ``[CLS]``) are
what EpmVG distils to the teacher's image and text embeddings.

Every model is built from ``GROUNDING_STUDENTS`` with JSON-serialisable kwargs, so ``student.json``
(registry name + kwargs) next to ``student.safetensors`` rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from pipeline.errors import PipelineError
from pipeline.registry import Registry
from pipeline.students import CLIP_MEAN, CLIP_STD, EXTRA_SEP, read_checkpoint, save_checkpoint

GROUNDING_STUDENTS: Registry = Registry("grounding student")
SPEC_VERSION = 1
PAD, CLS = 0, 1  # token ids; words hash into [2, vocab_size)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass
class GroundOutput:
    """What a forward pass gives the losses."""

    box: Tensor  # [B, 4] normalised cxcywh in [0, 1]
    visual_first: Tensor  # [B, d] fusion output at the first visual token
    text_first: Tensor  # [B, d] fusion output at the first linguistic token ([CLS])


def hash_tokenize(texts: list[str], context_length: int, vocab_size: int) -> Tensor:
    """Word tokens ``[B, context_length]``: ``[CLS]``, then each lower-cased word or punctuation
    mark hashed (sha1, stable across runs and machines) into ``[2, vocab_size)``, padded with 0.

    A vocabulary-free tokenizer: nothing to ship or download, and a new word never fails.
    """
    out = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())[: context_length - 1]
        ids = [CLS] + [2 + int(hashlib.sha1(w.encode()).hexdigest()[:8], 16) % (vocab_size - 2)
                       for w in words]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def sine_positions(grid: int, width: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sine position embedding ``[grid * grid, width]`` (DETR's, which TransVG uses):
    half the channels encode the row, half the column, at geometrically spaced frequencies."""
    quarter = width // 4
    freq = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 * math.pi
    angles = coords[:, None] * freq[None]  # [grid, quarter]
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid, 2 * quarter]
    rows = per_axis[:, None, :].expand(grid, grid, -1)
    cols = per_axis[None, :, :].expand(grid, grid, -1)
    pos = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 4 * quarter)
    return nn.functional.pad(pos, (0, width - 4 * quarter))


def _encoder(width: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class ConvPatchTower(nn.Module):
    """Image tower: a two-step conv patchifier (``patch_size / 2``, then 2) to a grid of patch
    tokens, plus a learned position embedding and a few transformer layers."""

    def __init__(self, image_size: int, patch_size: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        if patch_size % 2 or image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must be even and divide image_size {image_size}")
        half = patch_size // 2
        self.stem = nn.Sequential(nn.Conv2d(3, width // 2, half, stride=half), nn.BatchNorm2d(width // 2),
                                  nn.GELU(), nn.Conv2d(width // 2, width, 2, stride=2))
        # where a patch is must survive to the box head: fixed sine positions, as in DETR/TransVG
        self.register_buffer("pos", sine_positions(image_size // patch_size, width)[None], persistent=False)
        self.encoder = _encoder(width, heads, layers)

    def forward(self, pixels: Tensor) -> Tensor:
        tokens = self.stem(pixels).flatten(2).transpose(1, 2) + self.pos
        return self.encoder(tokens)


class TextTower(nn.Module):
    """Text tower: token and position embeddings through a few transformer layers."""

    def __init__(self, vocab_size: int, context_length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.02)
        self.encoder = _encoder(width, heads, layers)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.encoder(self.embed(tokens) + self.pos, src_key_padding_mask=tokens == PAD)


class TransVGStudent(nn.Module):
    """[REG] + visual + linguistic tokens -> fusion transformer -> box head on [REG]."""

    registry_name = ""
    spec_kwargs: dict[str, Any]

    def __init__(self, image_size: int = 48, patch_size: int = 8, vision_width: int = 64,
                 vision_layers: int = 1, text_width: int = 64, text_layers: int = 1,
                 context_length: int = 10, vocab_size: int = 4096, fusion_width: int = 96,
                 fusion_layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.image_size, self.context_length, self.vocab_size = image_size, context_length, vocab_size
        self.n_visual = (image_size // patch_size) ** 2
        self.visual = ConvPatchTower(image_size, patch_size, vision_width, heads, vision_layers)
        self.text = TextTower(vocab_size, context_length, text_width, heads, text_layers)
        self.visual_proj = nn.Linear(vision_width, fusion_width)
        self.text_proj = nn.Linear(text_width, fusion_width)
        self.reg = nn.Parameter(torch.zeros(1, 1, fusion_width))
        grid_pos = sine_positions(image_size // patch_size, fusion_width)
        self.register_buffer("visual_pos", grid_pos[None], persistent=False)
        self.fusion_pos = nn.Parameter(torch.randn(1, 1 + self.n_visual + context_length, fusion_width) * 0.02)
        self.fusion = _encoder(fusion_width, heads, fusion_layers)
        self.norm = nn.LayerNorm(fusion_width)
        self.box_head = nn.Sequential(nn.Linear(fusion_width, fusion_width), nn.ReLU(),
                                      nn.Linear(fusion_width, fusion_width), nn.ReLU(),
                                      nn.Linear(fusion_width, 4))
        self.width = fusion_width
        nn.init.zeros_(self.box_head[-1].weight)  # start at a centred box, not at noise
        nn.init.zeros_(self.box_head[-1].bias)
        # [REG] points at the patch it means: a dot-product map over the fused visual tokens
        self.point_query = nn.Linear(fusion_width, fusion_width)
        self.point_key = nn.Linear(fusion_width, fusion_width)
        grid = image_size // patch_size
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
        xy = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
        self.register_buffer("patch_centres", xy, persistent=False)  # [V, 2] (x, y) in [0, 1]
        self.cell = 1.0 / grid

    def preprocess(self, image: PIL.Image.Image) -> Tensor:
        """Resize to ``image_size`` square (boxes are normalised per axis, so they follow) and
        normalise -> CHW float32. No flips or crops: they would change what an expression means."""
        image = image.convert("RGB").resize((self.image_size, self.image_size), PIL.Image.Resampling.BILINEAR)
        return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)

    def tokenize(self, texts: list[str]) -> Tensor:
        return hash_tokenize(texts, self.context_length, self.vocab_size)

    def forward(self, pixels: Tensor, tokens: Tensor) -> GroundOutput:
        visual = self.visual_proj(self.visual(pixels)) + self.visual_pos
        text = self.text_proj(self.text(tokens))
        reg = self.reg.expand(len(pixels), -1, -1)
        fused = self.fusion(torch.cat([reg, visual, text], dim=1) + self.fusion_pos,
                            src_key_padding_mask=self._mask(tokens))
        fused = self.norm(fused)
        return GroundOutput(self._box(fused), fused[:, 1], fused[:, 1 + self.n_visual])

    def _box(self, fused: Tensor) -> Tensor:
        """Box from [REG]: the centre is the expected patch centre under [REG]'s attention map
        over the fused visual tokens plus an offset of up to one patch, the size comes from the
        MLP. Reading the centre off patch positions, instead of regressing it from one vector,
        is what lets a small model trained from scratch leave the "average box" quickly."""
        reg, visual = fused[:, 0], fused[:, 1:1 + self.n_visual]
        logits = torch.einsum("bd,bvd->bv", self.point_query(reg), self.point_key(visual)) / math.sqrt(self.width)
        centre = logits.softmax(-1) @ self.patch_centres
        head = self.box_head(reg)
        offset = self.cell * torch.tanh(head[:, :2])
        return torch.cat([(centre + offset).clamp(0, 1), head[:, 2:].sigmoid()], dim=-1)

    def _mask(self, tokens: Tensor) -> Tensor:
        keep = torch.zeros(len(tokens), 1 + self.n_visual, dtype=torch.bool, device=tokens.device)
        return torch.cat([keep, tokens == PAD], dim=1)

    def tower_parameters(self) -> dict[str, int]:
        """Parameters per part (image tower, text tower, fusion + box head)."""
        image = sum(p.numel() for p in self.visual.parameters())
        text = sum(p.numel() for p in self.text.parameters())
        return {"image": image, "text": text,
                "fusion": sum(p.numel() for p in self.parameters()) - image - text}

    def spec(self) -> dict[str, Any]:
        return {"student": self.registry_name, "kwargs": self.spec_kwargs, "spec_version": SPEC_VERSION,
                "task": "grounding"}


@GROUNDING_STUDENTS.register("transvg_tiny")
def make_transvg_tiny(**kwargs: Any) -> TransVGStudent:
    """A small TransVG: conv-patch image tower, hashed-word text tower, 2-layer fusion."""
    model = TransVGStudent(**kwargs)
    model.registry_name, model.spec_kwargs = "transvg_tiny", dict(kwargs)
    return model


def create_grounder(name: str, **kwargs: Any) -> TransVGStudent:
    """Build a grounding student by registry name (an unknown name lists the known ones)."""
    return GROUNDING_STUDENTS.create(name, **kwargs)


def save_grounder(path: Path, model: TransVGStudent) -> None:
    """``path`` (safetensors) + ``path.with_suffix('.json')`` (the spec), atomically."""
    save_checkpoint(path, model, {}, model.spec())  # type: ignore[arg-type]


def load_grounder(model_dir: Path) -> TransVGStudent:
    """Rebuild a grounding student from ``student.json`` + ``student.safetensors``."""
    spec_path, weights = Path(model_dir) / "student.json", Path(model_dir) / "student.safetensors"
    if not spec_path.exists():
        raise PipelineError(f"{spec_path}: grounding student spec not found; run `distill ground train`")
    spec = json.loads(spec_path.read_text())
    if spec.get("task") != "grounding" or spec.get("spec_version", SPEC_VERSION) > SPEC_VERSION:
        raise PipelineError(f"{spec_path}: not a grounding student spec of version <= {SPEC_VERSION}")
    model = create_grounder(spec["student"], **spec.get("kwargs", {}))
    tensors, _ = read_checkpoint(weights)
    model.load_state_dict({k: v for k, v in tensors.items() if EXTRA_SEP not in k}, strict=True)
    return model.eval()
