"""Device names shared by the stages."""
from __future__ import annotations

import re

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
