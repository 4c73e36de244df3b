"""Loss balancers: fixed weights, DSMD's self-adaptive weights against a loop implementation,
weights that move during training, and a resumed run that continues identically."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import BALANCERS, DistillBatch, build_objective
from pipeline.registry import UnknownNameError

B, DS, DT = 8, 6, 4
TERMS = [{"name": "contrastive", "weight": 1.0}, {"name": "fd", "weight": 0.5},
         {"name": "sard_relational", "weight": 2.0}]
DIMS = {"image": DT, "text": DT, "vision_teacher": DT, "text_teacher": DT}


def _expected_weights(history: list[list[float]], base: list[float], momentum: float,
                      temperature: float, min_ratio: float) -> list[float]:
    """The DSMD rule written out with plain floats, replaying every observed step."""
    ema = initial = None
    for values in history:
        if ema is None:
            ema, initial = list(values), list(values)
        else:
            ema = [momentum * e + (1 - momentum) * v for e, v in zip(ema, values)]
    n = len(base)
    mean = sum(ema) / n
    magnitude = [max(e, min_ratio * mean) for e in ema]
    progress = [m / i / temperature for m, i in zip(magnitude, initial)]
    z = sum(math.exp(p) for p in progress)
    return [c * n * math.exp(p) / z * mean / m for c, p, m in zip(base, progress, magnitude)]


def test_fixed_balancer_keeps_the_configured_weights_and_has_no_state():
    objective = build_objective(TERMS[:2], DS, DIMS)
    assert objective.balancer.current() == {"contrastive": 1.0, "fd": 0.5}
    assert not [k for k in objective.state_dict() if k.startswith("balancer")]
    assert objective.logged() == {"w_contrastive": 1.0, "w_fd": 0.5}


@pytest.mark.parametrize("momentum,temperature,min_ratio", [(0.9, 1.0, 1e-3), (0.5, 0.2, 0.3)])
def test_dsmd_weights_match_loop_replay(momentum, temperature, min_ratio):
    names, base = ["a", "b", "c"], [1.0, 0.5, 2.0]
    balancer = BALANCERS.create("dsmd", names=names, weights=dict(zip(names, base)),
                                momentum=momentum, temperature=temperature, min_ratio=min_ratio)
    assert balancer.current() == dict(zip(names, base))  # before any step: as configured
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(6):
        values = (torch.rand(3, generator=gen) * torch.tensor([5.0, 0.01, 1.0]) / (step + 1))
        history.append(values.double().tolist())
        weights = balancer({k: values[i] for i, k in enumerate(names)})
        expected = _expected_weights(history, base, momentum, temperature, min_ratio)
        assert [weights[k].item() for k in names] == pytest.approx(expected, rel=1e-5)
        assert list(balancer.current().values()) == pytest.approx(expected, rel=1e-9)


def test_dsmd_equalises_magnitudes_at_the_first_step():
    """At step 1 every progress ratio is 1, so each weighted term contributes c_i · mean."""
    balancer = BALANCERS.create("dsmd", names=["a", "b"], weights={"a": 1.0, "b": 1.0})
    weights = balancer({"a": torch.tensor(10.0), "b": torch.tensor(0.1)})
    assert weights["a"].item() * 10.0 == pytest.approx(5.05)
    assert weights["b"].item() * 0.1 == pytest.approx(5.05)


def test_dsmd_statistics_do_not_move_in_eval_mode():
    balancer = BALANCERS.create("dsmd", names=["a", "b"], weights={"a": 1.0, "b": 1.0})
    balancer({"a": torch.tensor(2.0), "b": torch.tensor(1.0)})
    before = copy.deepcopy(balancer.state_dict())
    balancer.eval()
    balancer({"a": torch.tensor(50.0), "b": torch.tensor(0.5)})
    assert all(torch.equal(before[k], v) for k, v in balancer.state_dict().items())


def test_dsmd_rejects_bad_settings():
    with pytest.raises(ValueError, match="momentum"):
        BALANCERS.create("dsmd", names=["a"], weights={"a": 1.0}, momentum=1.0)
    with pytest.raises(ValueError, match="no configured weight"):
        BALANCERS.create("dsmd", names=["a", "b"], weights={"a": 1.0})


class Toy(torch.nn.Module):
    """A linear student over fixed inputs, its teachers fixed random embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = torch.nn.Linear(5, DS), torch.nn.Linear(5, DS)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def batch(self, step: int) -> DistillBatch:
        gen = torch.Generator().manual_seed(100 + step % 3)
        x, y = torch.randn(B, 5, generator=gen), torch.randn(B, 5, generator=gen)
        teacher = F.normalize(torch.randn(B, DT, generator=gen), dim=-1)
        return DistillBatch(
            F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1),
            self.logit_scale.exp(), teacher, teacher, 20.0, torch.arange(B), torch.arange(B),
            vision_teacher_emb=F.normalize(torch.randn(B, DT, generator=gen), dim=-1),
            text_teacher_emb=F.normalize(torch.randn(B, DT, generator=gen), dim=-1))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    student = Toy()
    objective = build_objective(TERMS, DS, DIMS, balancer="dsmd",
                                balancer_kwargs={"momentum": 0.5})
    optimizer = torch.optim.Adam(list(student.parameters()) + list(objective.parameters()),
                                 lr=0.05)
    return student, objective, optimizer


def _run(student, objective, optimizer, steps: range) -> list[dict[str, float]]:
    logs = []
    for step in steps:
        total, _ = objective(student.batch(step))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        logs.append({"total": total.item(), **objective.logged()})
    return logs


def test_dsmd_weights_and_lambda_move_during_training():
    student, objective, optimizer = _setup()
    first = objective.logged()
    logs = _run(student, objective, optimizer, range(20))
    assert set(first) == {"w_contrastive", "w_fd", "w_sard_relational", "lambda_sard_relational"}
    for key in ("w_contrastive", "w_fd", "w_sard_relational", "lambda_sard_relational"):
        assert abs(logs[-1][key] - first[key]) > 1e-3, key
    assert 0.0 < logs[-1]["lambda_sard_relational"] < 1.0
    # The weights reweigh the terms each step: the total is their weighted sum.
    total, values = objective(student.batch(20))
    weights = objective.logged()
    assert total.item() == pytest.approx(sum(weights[f"w_{k}"] * v.item()
                                             for k, v in values.items()), rel=1e-5)


def test_resumed_run_continues_identically():
    student, objective, optimizer = _setup()
    straight = _run(student, objective, optimizer, range(12))

    student, objective, optimizer = _setup()
    _run(student, objective, optimizer, range(7))
    saved = [copy.deepcopy(m.state_dict()) for m in (student, objective, optimizer)]
    student, objective, optimizer = _setup(seed=1)  # different init: all state must come back
    for module, state in zip((student, objective, optimizer), saved):
        module.load_state_dict(state)
    resumed = _run(student, objective, optimizer, range(7, 12))
    for a, b in zip(straight[7:], resumed):
        assert a == pytest.approx(b, rel=1e-6)


def test_unknown_balancer_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="known: dsmd, fixed"):
        build_objective(TERMS[:1], DS, balancer="uncertainty")
