"""Weights files loaded into a student's towers with every key checked: a checkpoint whose keys
do not fit is one clear error naming the missing, unexpected and wrong-shaped keys."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError

SHOWN = 5  # keys named per kind in an error


def read_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or torch file (a ``state_dict``/``model`` entry is
    unwrapped, a DataParallel ``module.`` prefix dropped)."""
    path = str(path)
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: checkpoint file not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise PipelineError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PipelineError(f"{path}: holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def fit_faults(module: nn.Module, state: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The keys of ``state`` that do not fit ``module``: missing, unexpected, wrong shape."""
    own = module.state_dict()
    return {"missing": sorted(set(own) - set(state)),
            "unexpected": sorted(set(state) - set(own)),
            "wrong shape": sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                                  for k in set(own) & set(state) if own[k].shape != state[k].shape)}


def describe_faults(faults: dict[str, list[str]]) -> str:
    """``missing keys [a, b, ...] (12 in all); unexpected keys [...]`` for the kinds that occur."""
    parts = []
    for kind, keys in faults.items():
        if keys:
            more = f" ({len(keys)} in all)" if len(keys) > SHOWN else ""
            parts.append(f"{kind} keys [{', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}]{more}")
    return "; ".join(parts)


def load_checked(module: nn.Module, state: Mapping[str, Tensor], where: str, what: str) -> None:
    """Load ``state`` into ``module`` when every key fits, else one error naming the faults."""
    faults = fit_faults(module, state)
    if any(faults.values()):
        raise PipelineError(f"{where}: the checkpoint does not fit {what}: {describe_faults(faults)}")
    module.load_state_dict(state, strict=True)


def load_weights_file(module: nn.Module, path: str | os.PathLike, what: str,
                      convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                      ignore: Callable[[str], bool] | None = None) -> None:
    """Load the checkpoint file ``path`` into ``module`` (``what`` names it in errors);
    ``convert`` maps the file's layout to the module's, ``ignore`` drops keys the module has no
    use for (a classifier head)."""
    state = read_state(path)
    if convert is not None:
        state = convert(state)
    if ignore is not None:
        state = {k: v for k, v in state.items() if not ignore(k)}
    load_checked(module, state, str(path), what)
