"""The `distill` typer app: stage commands parse params.yaml and fail with clear messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.registry import Registry, UnknownNameError
from stages.cli import app
from tests.conftest import TINY_CLIP_CFG

runner = CliRunner()


def write_params(path: Path, root: Path, tmp_path: Path, **teach) -> Path:
    params = {
        "teachers": {"tiny": {"teacher": "open_clip", "kwargs": {"model_cfg": TINY_CLIP_CFG}}},
        "teach": {"dataset": str(root), "out_root": str(tmp_path / "caches"), "batch_size": 8,
                  "rows_per_shard": 16, "rows_per_chunk": 8, "summary_dir": str(tmp_path / "reports"),
                  **teach},
    }
    path.write_text(yaml.safe_dump(params))
    return path


def test_teach_info_verify_round_trip(make_dataset, tmp_path):
    params = write_params(tmp_path / "params.yaml", make_dataset(), tmp_path)
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["forward_calls"] > 0 and summary["units_computed"] == 2 + 3 + 1 + 2
    store = tmp_path / "caches/tiny/train.zarr"
    info = runner.invoke(app, ["cache", "info", str(store), "--json"])
    assert info.exit_code == 0
    assert json.loads(info.stdout)["image_rows"] == {"valid": 24, "invalid": 0, "unwritten": 0}
    assert runner.invoke(app, ["cache", "verify", str(store)]).exit_code == 0
    (store / "text_emb/c/0/0").write_bytes(b"\x00" * 64)  # a damaged shard file
    verify = runner.invoke(app, ["cache", "verify", str(store)])
    assert verify.exit_code == 1 and "text_emb" in verify.output


def test_verify_against_a_dataset_root_or_split_folder(make_dataset, tmp_path):
    """--dataset takes the root (the store's split is picked) or a split folder; a store of
    another split is called sound but not this split's, naming the stage that made it."""
    root = make_dataset()
    params = write_params(tmp_path / "params.yaml", root, tmp_path)
    assert runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"]).exit_code == 0
    store = str(tmp_path / "caches/tiny/train.zarr")
    for given, used in ((root, root / "train"), (root / "train", root / "train")):
        result = runner.invoke(app, ["cache", "verify", store, "--quick", "--dataset", str(given)])
        assert result.exit_code == 0, result.output
        assert f"dataset: {used}" in result.output and "OK" in result.output
    other = runner.invoke(app, ["cache", "verify", store, "--quick", "--dataset", str(root / "test")])
    text = " ".join(other.output.split())
    assert other.exit_code == 1
    assert "the store belongs to another split or dataset: `distill teach` made it from split 'train'" in text
    assert "is sound" in text and "rebuild" not in text
    empty = tmp_path / "nothing"
    empty.mkdir()
    missing = runner.invoke(app, ["cache", "verify", store, "--dataset", str(empty)])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"{empty}: no manifest.json here nor in {empty / 'train'}/" in " ".join(missing.output.split())


def test_made_by_names_the_stage_of_each_store_kind():
    from pipeline.stores.inspect import made_by

    assert made_by({"schema": "vlm-distill/teacher-cache", "teacher": {"teacher": "open_clip"}}) == "distill teach"
    assert made_by({"schema": "vlm-distill/teacher-cache", "teacher": {"teacher": "aligned"}}) == "distill align"
    assert made_by({"schema": "vlm-distill/neighbors"}) == "distill neighbors"
    assert made_by({"schema": "vlm-distill/itm-scores"}) == "distill itm"


def test_unknown_param_key_is_a_clean_error(make_dataset, tmp_path):
    params = write_params(tmp_path / "params.yaml", make_dataset(), tmp_path, batchsize=3)
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params)])
    assert result.exit_code == 1
    assert "unknown key(s) ['batchsize']" in result.output and "batch_size" in result.output


def test_unknown_teacher_lists_known_ones(make_dataset, tmp_path):
    params = write_params(tmp_path / "params.yaml", make_dataset(), tmp_path)
    data = yaml.safe_load(params.read_text())
    data["teachers"]["tiny"]["teacher"] = "open_clipp"
    params.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    from pipeline.teachers import list_teachers

    assert f"unknown teacher 'open_clipp'; known: {', '.join(list_teachers())}" in result.output
    assert "open_clip" in list_teachers()


def test_registry_refuses_duplicates_and_unknown_names():
    reg: Registry[object] = Registry("loss")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object)
    with pytest.raises(UnknownNameError, match="unknown loss 'c'; known: a"):
        reg.create("c")


def test_list_shows_registered_components():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("open_clip", "demo_clip", "efficientnet_lite", "hf_text", "open_clip_tiny", "contrastive"):
        assert name in result.stdout


def test_unknown_device_override_is_a_clean_error(make_dataset, tmp_path):
    params = write_params(tmp_path / "params.yaml", make_dataset(), tmp_path)
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--device", "gpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the override goes through the same settings check as params.yaml
    assert "teach.device: 'gpu' is not valid here (expected auto|cpu|mps|cuda(:[0-9]+)?)" in result.stderr
