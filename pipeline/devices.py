"""Device names and CPU thread settings shared by the stages."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch

from pipeline.config import DEVICE_PATTERN
from pipeline.errors import ConfigError


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``mps``, ``cuda`` and
    ``cuda:N`` pass through; anything else (e.g. a ``--device`` typo) is a ``ConfigError``."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, mps, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads (None: leave torch's setting), then restore
    it. On a machine shared with other work, as many threads as cores oversubscribe the CPUs and
    every thread waits for the slowest: fewer threads are then much faster (docs/training.md "Threads")."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels [B, 3, H, W]`` laid out channels-last (NHWC), for convolutional towers: oneDNN on
    CPU and tensor cores on GPU run NHWC convolutions faster, and a convolution's output keeps its
    input's layout, so the whole trunk follows (BENCHMARKS.md "The demo pipeline", this CPU: the
    demo student's training step 0.73x, EfficientNet-Lite0's forward at batch 32 0.69x per image).
    Values are the same up to rounding."""
    return pixels.contiguous(memory_format=torch.channels_last) if pixels.ndim == 4 else pixels
