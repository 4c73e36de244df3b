"""What every student shares: the dual-encoder contract, its image transforms and the registry.

Every student is built by name from ``STUDENTS`` with JSON-serialisable kwargs, so a checkpoint is
fully described by ``student.json`` (registry name + kwargs) next to ``student.safetensors``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import PIL.Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.registry import Registry
from pipeline.views import apply_view, crop_box

# OpenAI CLIP pixel statistics: the common convention for CLIP-style image towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC_VERSION = 1
# Factory kwargs that only say where the first weights come from (a checkpoint file, a hub tag):
# a saved student's spec leaves them out, as its weights file holds the weights.
INIT_ONLY_KWARGS = ("pretrained", "pretrained_file")
# (final embedding [B, embed_dim], pooled intermediate levels [B, d_l] shallow to deep)
Levels = tuple[Tensor, list[Tensor]]


@dataclass(frozen=True)
class ImageNorm:
    """How a student's image tower expects its pixels: normalisation and resize interpolation
    (CLIP's by default; an inherited tower keeps its teacher's, an open_clip model its own)."""

    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"  # bicubic | bilinear

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)


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
    image_norm: ImageNorm = ImageNorm()
    init_record: dict[str, Any] | None = None  # where the first weights came from (spec "init")

    def preprocess(self, image: PIL.Image.Image) -> Tensor:
        """Eval transform: resize shorter side, centre crop, normalise -> CHW float32."""
        return eval_preprocess(image, self.image_size, self.image_norm)

    def train_transform(self, augment: bool = True) -> "TrainAugment":
        """Training transform (random resized crop + flip), separate from ``preprocess``.

        ``augment=False`` gives a transform with the same call signature doing ``preprocess``.
        """
        return TrainAugment(self.image_size, enabled=augment, norm=self.image_norm)

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
        """JSON spec from which ``load_student`` rebuilds this model (the architecture; where
        its first weights came from is recorded under ``init``)."""
        kwargs = {k: v for k, v in self.spec_kwargs.items() if k not in INIT_ONLY_KWARGS}
        init = {k: v for k, v in self.spec_kwargs.items() if k in INIT_ONLY_KWARGS and v}
        if self.init_record:
            init = init | self.init_record
        spec = {"student": self.registry_name, "kwargs": kwargs, "embed_dim": self.embed_dim,
                "image_size": self.image_size, "spec_version": SPEC_VERSION}
        return spec | ({"init": init} if init else {})


def eval_preprocess(image: PIL.Image.Image, image_size: int, norm: ImageNorm = ImageNorm()) -> Tensor:
    """Resize the shorter side to ``image_size``, centre crop, normalise -> CHW float32."""
    image = image.convert("RGB")
    image = TF.resize(image, image_size, interpolation=norm.mode)
    image = TF.center_crop(image, [image_size, image_size])
    return TF.normalize(TF.to_tensor(image), norm.mean, norm.std)


class TrainAugment:
    """Light augmentation: random resized crop (scale 0.6-1) and horizontal flip.

    Randomness comes from the ``random.Random`` passed per call rather than torch's global RNG,
    so the data loader can derive it from (seed, epoch, sample id) and a resumed run sees the
    same augmented pixels whatever the worker layout.
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 enabled: bool = True, norm: ImageNorm = ImageNorm()) -> None:
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, scale, ratio, flip_p
        self.enabled, self.norm = enabled, norm

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a crop, as torchvision's RandomResizedCrop samples it."""
        return crop_box(width, height, self.scale, self.ratio, rng)

    def replay(self, image: PIL.Image.Image, view: Any) -> Tensor:
        """The pixels of a stored view (``train.views: sample``): the view's box and flip cut
        from the raw image, then this student's own resize and normalisation, as the teacher
        saw the same box through its own (:mod:`pipeline.views`)."""
        return eval_preprocess(apply_view(image, view), self.image_size, self.norm)

    def __call__(self, image: PIL.Image.Image, rng: random.Random) -> Tensor:
        if not self.enabled:
            return eval_preprocess(image, self.image_size, self.norm)
        image = image.convert("RGB")
        top, left, h, w = self.crop_box(image.width, image.height, rng)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, h, w, size, self.norm.mode)
        if rng.random() < self.flip_p:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.norm.mean, self.norm.std)


STUDENTS: Registry[Student] = Registry("student")


def create_student(name: str, **kwargs: Any) -> Student:
    """Build student ``name``; records name and kwargs for its spec."""
    student = STUDENTS.create(name, **kwargs)
    student.registry_name = name
    student.spec_kwargs = dict(kwargs)
    return student


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


