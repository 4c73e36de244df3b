"""Loss balancers: the weight of each objective term, fixed or set during training.

A balancer sees the unweighted term values of every training step and returns the weights the
step uses. Its running statistics are buffers, so ``objective.state_dict()`` (which the trainer
checkpoints) holds them and a resumed run continues with exactly the same weights.

- ``fixed``: the weights written in ``train.losses``.
- ``dsmd``: the dynamic self-adaptive loss balancer of DSMD (arXiv 2404.10838), as implemented
  here from the losses' own running statistics (see ``DSMDBalancer``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.registry import Registry


class LossBalancer(nn.Module):
    """Base class: ``forward(values)`` returns each term's weight for this step."""

    def __init__(self, names: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.names = list(names)
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise ValueError(f"balancer: no configured weight for terms {missing}")
        self.base = {n: float(weights[n]) for n in self.names}

    def forward(self, values: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        raise NotImplementedError  # pragma: no cover - abstract

    def current(self) -> dict[str, float]:
        """The weights the latest step used (the configured ones before any step)."""
        raise NotImplementedError  # pragma: no cover - abstract


BALANCERS: Registry[LossBalancer] = Registry("balancer")


class FixedBalancer(LossBalancer):
    """The configured weights, unchanged (no state)."""

    def forward(self, values: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        return dict(self.base)

    def current(self) -> dict[str, float]:
        return dict(self.base)


@BALANCERS.register("fixed")
def make_fixed(names: Sequence[str], weights: Mapping[str, float]) -> FixedBalancer:
    """The weights of ``train.losses`` as written."""
    return FixedBalancer(names, weights)


class DSMDBalancer(LossBalancer):
    """Self-adaptive weights from each term's running loss statistics.

    With ``m_i`` the exponential moving average of term i's value (momentum ``β``, started at
    its first value ``L_i(0)``), ``m̄`` their mean and ``n`` the number of terms:

        r_i = m_i / L_i(0)                               (how far term i still is from its start)
        w_i = c_i · n · softmax(r / T)_i · m̄ / max(m_i, ρ·m̄)

    ``c_i`` is the configured weight. The factor ``m̄ / m_i`` equalises the terms' magnitudes, so
    no term dominates only because of its scale; the softmax moves weight towards the terms that
    have decreased least relative to their start (temperature ``T``; T → ∞ gives equal shares).
    ``ρ`` caps the boost of a term that is already near zero. Statistics update in training mode
    only; the weights are constants for the backward pass.
    """

    def __init__(self, names: Sequence[str], weights: Mapping[str, float],
                 momentum: float = 0.9, temperature: float = 1.0, min_ratio: float = 1e-3) -> None:
        super().__init__(names, weights)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"dsmd balancer: momentum must be in [0, 1), got {momentum}")
        if temperature <= 0 or min_ratio <= 0:
            raise ValueError("dsmd balancer: temperature and min_ratio must be > 0")
        self.momentum, self.temperature, self.min_ratio = momentum, temperature, min_ratio
        n = len(self.names)
        self.register_buffer("ema", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("base_weights", torch.tensor([self.base[k] for k in self.names],
                                                          dtype=torch.float64))

    def _update(self, values: Mapping[str, Tensor]) -> None:
        observed = torch.stack([values[k].detach().to(torch.float64).reshape(())
                                for k in self.names])
        if int(self.steps) == 0:
            self.ema.copy_(observed)
            self.initial.copy_(observed)
        else:
            self.ema.mul_(self.momentum).add_((1 - self.momentum) * observed)
        self.steps.add_(1)

    def _weights(self) -> Tensor:
        if int(self.steps) == 0:
            return self.base_weights.clone()
        mean = self.ema.mean().clamp(min=1e-12)
        magnitude = torch.maximum(self.ema, self.min_ratio * mean)
        progress = magnitude / self.initial.clamp(min=1e-12)
        share = len(self.names) * torch.softmax(progress / self.temperature, dim=0)
        return self.base_weights * share * mean / magnitude

    def forward(self, values: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        if self.training:
            with torch.no_grad():
                self._update(values)
        weights = self._weights()
        dtype = next(iter(values.values())).dtype
        return {k: weights[i].to(dtype) for i, k in enumerate(self.names)}

    def current(self) -> dict[str, float]:
        return {k: float(w) for k, w in zip(self.names, self._weights().tolist())}


@BALANCERS.register("dsmd")
def make_dsmd(names: Sequence[str], weights: Mapping[str, float], momentum: float = 0.9,
              temperature: float = 1.0, min_ratio: float = 1e-3) -> DSMDBalancer:
    """DSMD's dynamic self-adaptive loss balancer (magnitude-equalised, progress-weighted)."""
    return DSMDBalancer(names, weights, momentum, temperature, min_ratio)
