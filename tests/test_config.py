"""params.yaml, the stage config dataclasses and the generated schema agree."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import from_dict, load_section
from pipeline.errors import ConfigError
from pipeline.params_schema import params_schema

REPO = Path(__file__).resolve().parent.parent


def test_schema_file_is_generated_from_the_dataclasses():
    stored = json.loads((REPO / "schemas/params.v1.json").read_text())
    assert stored == params_schema(), "regenerate: python -m pipeline.params_schema > schemas/params.v1.json"


def test_repository_params_load_and_validate():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    jsonschema.validate(params, params_schema())
    from pipeline.params_schema import EvalConfig, NeighborsConfig, PrepareConfig, TeachConfig, TrainConfig

    for cls, section in ((PrepareConfig, "prepare"), (TeachConfig, "teach"), (NeighborsConfig, "neighbors"),
                         (TrainConfig, "train"), (EvalConfig, "evaluate")):
        assert isinstance(load_section(cls, section, params), cls)
    bad = dict(params, train=dict(params["train"], epochz=3))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, params_schema())


@dataclass(frozen=True)
class Inner:
    k: int = 1


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    sizes: tuple[int, ...] = (1,)
    inner: Inner = Inner()
    maybe: str | None = None


def test_from_dict_types_and_errors():
    cfg = from_dict(Outer, {"rate": 2, "sizes": [3, 4], "inner": {"k": 5}})
    assert cfg == Outer(rate=2.0, sizes=(3, 4), inner=Inner(5))
    with pytest.raises(ConfigError, match=r"Outer.inner: unknown key\(s\) \['j'\]; known keys: \['k'\]"):
        from_dict(Outer, {"inner": {"j": 1}}, "Outer")
    with pytest.raises(ConfigError, match="sizes\\[1\\]: expected int"):
        from_dict(Outer, {"sizes": [1, "two"]})
    with pytest.raises(ConfigError, match="section 'nope' not found"):
        load_section(Outer, "nope", {"other": {}})
