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
from stages.params_schema import params_schema

REPO = Path(__file__).resolve().parent.parent


def test_schema_file_is_generated_from_the_dataclasses():
    stored = json.loads((REPO / "schemas/params.v1.json").read_text())
    assert stored == params_schema(), "regenerate: python -m stages.params_schema > schemas/params.v1.json"


def test_repository_params_load_and_validate():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    jsonschema.validate(params, params_schema())
    from stages.params_schema import (EvalConfig, NeighborsConfig, PrepareConfig, TeachConfig,
                                      TrainConfig)

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


def test_schema_lists_exactly_the_known_sections():
    from pipeline.config import PARAMS_SECTIONS

    assert sorted(params_schema()["properties"]) == sorted(PARAMS_SECTIONS)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


# (section, key, bad value, the message expected): each is refused when its section loads.
REFUSED = [
    ("teach", "views", 0, "teach.views: must be >= 1, got 0"),
    ("train", "views", "random", "train.views: 'random' is not one of ['plain', 'sample']"),
    ("train", "steps", -5, "train.steps: must be >= 1, got -5"),
    ("train", "batch_size", 0, "train.batch_size: must be >= 1, got 0"),
    ("train", "batch_size", True, "train.batch_size: expected int, got True"),
    ("train", "epochs", False, "train.epochs: expected float, got False"),
    ("train", "lr", -0.001, "train.lr: must be > 0, got -0.001"),
    ("train", "hard_negative_fraction", 1.5, "train.hard_negative_fraction: must be <= 1, got 1.5"),
    ("train", "warmup_steps", -1, "train.warmup_steps: must be >= 0, got -1"),
    ("train", "device", "gpu", "train.device: 'gpu' is not valid here"),
    ("train", "on_bad_image", "ignore", "train.on_bad_image: 'ignore' is not one of ['skip', 'strict']"),
    ("teach", "batch_size", -4, "teach.batch_size: must be >= 1, got -4"),
    ("teach", "rows_per_chunk", 0, "teach.rows_per_chunk: must be >= 1, got 0"),
    ("teach", "rows_per_chunk", 5, "teach.rows_per_chunk: 5 does not divide teach.rows_per_shard (16384)"),
    ("teach", "splits", [], "teach.splits: needs at least 1 item(s), got []"),
    ("neighbors", "k", 0, "neighbors.k: must be >= 1, got 0"),
    ("neighbors", "directions", ["i2t", "x2y"], "neighbors.directions[1]: 'x2y' is not one of"),
    ("itm", "batch_size", 0, "itm.batch_size: must be >= 1, got 0"),
    ("prepare", "test_percent", 101, "prepare.test_percent: must be <= 100, got 101"),
    ("prepare", "val_percent", 95, "prepare.test_percent + prepare.val_percent must be <= 100, got 10 + 95"),
    ("prepare", "source", "flickr", "prepare.source: 'flickr' is not one of ['demo', 'folder', 'coco', 'flickr30k', 'webdataset', 'refcoco', 'grounding_wds']"),
    ("evaluate", "ks", [1, 0], "evaluate.ks[1]: must be >= 1, got 0"),
    ("evaluate", "latency_repeats", 0, "evaluate.latency_repeats: must be >= 1, got 0"),
]


def load_stage(section: str, params: dict):
    from stages.params_schema import (EvalConfig, ItmConfig, NeighborsConfig, PrepareConfig,
                                      TeachConfig)
    from stages.train.run import load_train_config

    if section == "train":
        return load_train_config(params)
    cls = {"prepare": PrepareConfig, "teach": TeachConfig, "neighbors": NeighborsConfig,
           "itm": ItmConfig, "evaluate": EvalConfig}[section]
    return load_section(cls, section, params)


@pytest.mark.parametrize("section,key,value,message", REFUSED, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in REFUSED])
def test_bad_setting_is_refused_naming_the_key(tmp_path, section, key, value, message):
    from pipeline.config import load_params

    params = repo_params()
    params[section][key] = value
    if section == "train":
        params["train"].pop("recipe")  # the recipe's keys would replace losses, not these
    path = write(tmp_path, yaml.safe_dump(params))
    with pytest.raises(ConfigError) as exc:
        load_stage(section, load_params(path))
    assert message in str(exc.value)
    # the schema says the same (bar the cross-field rules it cannot express)
    if "does not divide" not in message and "+" not in message:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(params, params_schema())


def test_recipe_and_loss_terms_are_bounded():
    from stages.train.run import load_train_config

    params = repo_params()
    params["recipes"]["best"]["hard_negative_fraction"] = -0.5
    with pytest.raises(ConfigError, match=r"recipes.best.hard_negative_fraction: must be >= 0, got -0.5"):
        load_train_config(params)
    params = repo_params()
    params["recipes"]["best"]["losses"][1]["weight"] = -1
    with pytest.raises(ConfigError, match=r"recipes.best.losses\[1\].weight: must be >= 0, got -1"):
        load_train_config(params)


def test_direct_construction_is_checked_too():
    from stages.params_schema import TeachConfig
    from stages.train.run import TrainConfig

    with pytest.raises(ConfigError, match="train.steps: must be >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="teach.rows_per_chunk: 3 does not divide"):
        TeachConfig(rows_per_shard=16, rows_per_chunk=3)


def test_unknown_top_level_section_names_the_known_ones(tmp_path):
    from pipeline.config import PARAMS_SECTIONS, load_params

    params = repo_params()
    params["trian"] = params.pop("train")
    with pytest.raises(ConfigError) as exc:
        load_params(write(tmp_path, yaml.safe_dump(params)))
    assert f"unknown top-level section(s) ['trian']; known: {', '.join(PARAMS_SECTIONS)}" in str(exc.value)
    assert str(tmp_path / "params.yaml") in str(exc.value)


@pytest.mark.parametrize("text,line,column", [
    ("train:\n  steps: 5\n   lr: 1\n", 3, 6),     # bad indentation
    ("train: {steps: 5\n", 2, 1),                 # unclosed flow mapping
    ("teach:\n  splits: [train\n  batch_size: 3\n", 3, 13),
])
def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path, text, line, column):
    from pipeline.config import load_params

    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:{line}:{column}: invalid YAML: ") and "\n" not in message


def test_cli_refuses_bad_settings_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    params = repo_params()
    params["train"]["steps"] = -5
    path = write(tmp_path, yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["train", "--params", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train.steps: must be >= 1, got -5" in result.output
