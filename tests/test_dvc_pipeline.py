"""End to end: the real ``dvc.yaml`` under ``dvc repro`` on a tiny dataset with tiny teachers.

Checks the promises DVC makes for us: a second ``dvc repro`` runs nothing, a training parameter
reruns only ``train`` and ``evaluate``, and caches shared through a (local) DVC remote let a
fresh clone reproduce the pipeline without running any teacher.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.grounding.scenes import load_pool
from tests.conftest import TINY_CLIP_CFG, tiny_samples, write_scene_shards

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    """The repository's params.yaml, shrunk to a tiny dataset, teacher and student."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] = {"source": "folder", "src": "raw", "out": "data/tiny", "shard_size": 16,
                         "test_percent": 30, "val_percent": 10, "salt": "split-v1"}
    # the student distils from the teacher `align` makes of tiny_vision's images and tiny_clip's texts
    params.update(distill_from="aligned", vision_from="tiny_vision", text_from="tiny_clip",
                  single_stream_from="tiny_blip")
    params["teachers"] = {
        "tiny_clip": {"teacher": "open_clip", "kwargs": {"model_cfg": TINY_CLIP_CFG, "pretrained": None}},
        "tiny_vision": {"teacher": "open_clip",
                        "kwargs": {"model_cfg": TINY_CLIP_CFG, "pretrained": None, "seed": 1}},
        "tiny_blip": {"teacher": "blip_itm", "kwargs": {"config": "tiny", "seed": 0}}}
    params["teach"].update(dataset="data/tiny", batch_size=16, rows_per_shard=32, rows_per_chunk=16)
    params["align"].update(vision="tiny_vision", text="tiny_clip", embed_dim=16, epochs=3, batch_size=8,
                           patience=2)
    params["neighbors"].update(teacher="aligned", k=12)
    params["itm"].update(dual="aligned", single="tiny_blip", k=11, dataset="data/tiny")
    params["train"].update(
        student="open_clip_tiny", init={},  # the demo's inherits from its aligned teacher's towers
        student_kwargs={"embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32,
                        "vision_layers": 1, "vision_heads": 2, "context_length": 16, "text_width": 32,
                        "text_heads": 2, "text_layers": 1},
        dataset="data/tiny", caches=["caches/aligned/train.zarr"], batch_size=8, epochs=1.0,
        vision_teacher="caches/tiny_vision/train.zarr", text_teacher="caches/tiny_clip/train.zarr",
        single_stream_teacher="caches/tiny_blip/train.zarr",
        neighbors="caches/neighbors/aligned/train.zarr", itm_scores="caches/itm/aligned/train.zarr",
        warmup_steps=1, log_every=1, checkpoint_every=2, device="cpu")
    params["evaluate"].update(dataset="data/tiny/test", teacher_cache="caches/aligned/test.zarr",
                              teacher=None, latency_repeats=2, latency_warmup=1, measure_memory=False)
    grounding = params["grounding"]
    grounding["teacher"] = "tiny_clip"
    grounding["prepare"].update(src="scenes", out="data/scenes", test_percent=30, val_percent=0)
    grounding["teach"].update(dataset="data/scenes", batch_size=16, rows_per_shard=32, rows_per_chunk=16)
    grounding["train"].update(
        student_kwargs={"image_size": 32, "patch_size": 8, "vision_width": 32, "text_width": 32,
                        "fusion_width": 32, "fusion_layers": 1, "heads": 2, "vocab_size": 256},
        recipe="epmvg", dataset="data/scenes", cache="caches/grounding/tiny_clip/train.zarr", batch_size=8, epochs=1.0,
        warmup_steps=1, log_every=1, device="cpu")
    grounding["evaluate"].update(dataset="data/scenes/test", latency_batch_sizes=[1, 4], latency_repeats=2,
                                 latency_warmup=1, n_examples=2)
    return params


def write_raw_folder(raw: Path, n: int = 40) -> None:
    """A folder of PNGs and a captions JSONL, the `folder` source of `distill prepare`."""
    raw.mkdir(parents=True)
    with (raw / "captions.jsonl").open("w") as f:
        for sample in tiny_samples(n):
            name = f"{sample['__key__']}.png"
            (raw / name).write_bytes(sample["png"])
            f.write(json.dumps({"file": name, **sample["json"]}) + "\n")


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command with the test interpreter's bin directory first on PATH; return its output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    """Names of the stages `dvc repro` actually ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project holding the repository's pipeline with tiny parameters."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("pipeline", "stages", "schemas"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    write_raw_folder(proj / "raw")
    write_scene_shards(proj / "scenes", load_pool(str(REPO / "demo" / "emoji")), 20)
    run(["git", "init", "-q"], proj)
    run(["dvc", "init", "-q"], proj)
    return proj


def test_dvc_repro_end_to_end_and_cache_sharing(project: Path, tmp_path: Path):
    first = run(["dvc", "repro", "evaluate"], project)  # `make demo`: what the report needs
    assert stages_run(first) == {"prepare", "teach@tiny_clip", "teach@tiny_vision", "teach@tiny_blip",
                                 "align", "neighbors", "itm", "train", "train_alone", "evaluate"}
    rest = run(["dvc", "repro"], project)  # the rest: the student's export and the grounding demo
    assert stages_run(rest) == {"export", "ground_prepare", "ground_teach", "ground_train", "ground_evaluate"}
    assert (project / "models/export/onnx/image_encoder.onnx").exists()
    card = (project / "models/export/MODEL_CARD.md").read_text()
    trained = json.loads((project / "models/student/train_summary.json").read_text())
    assert trained["dataset_fingerprint"] in card and "0 teacher forward passes" in card
    assert card.startswith(f"# {trained['spec']['student']} student") and f"recipe {trained['recipe']}" in card.splitlines()[0]
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert set(metrics["alone"]) == set(metrics["student"])  # the student trained alone, beside it
    alone = json.loads((project / "models/student_alone/train_summary.json").read_text())
    assert [t["name"] for t in alone["losses"]] == ["contrastive"] and alone["teacher_forward_calls"] == 0
    assert json.loads((project / "models/student/train_summary.json").read_text())["teacher_forward_calls"] == 0
    assert (project / "caches/tiny_clip/train.zarr/zarr.json").exists()
    assert not (project / "caches/.scratch").exists()
    assert metrics  # evaluate wrote its metrics

    assert stages_run(run(["dvc", "repro"], project)) == set()  # nothing changed: nothing runs

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], project)) == {"train", "train_alone", "evaluate", "export"}

    params["teach"]["batch_size"] = 5  # does not change the cached arrays: no teacher reruns
    params["grounding"]["teach"]["batch_size"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], project)) == set()


    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    run(["dvc", "push"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pipeline"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    teach_report = clone / "reports/teach/tiny_clip.json"
    before = teach_report.read_text()
    assert stages_run(run(["dvc", "repro"], clone)) == set()  # pulled caches: no teacher runs
    assert teach_report.read_text() == before
    assert "up to date" in run(["dvc", "status"], clone).lower()

    # an ablation experiment switches the recipe: only train, evaluate and export run (not train_alone)
    exp = run(["dvc", "exp", "run", "-n", "mcad", "-S", "train.recipe=mcad"], project)
    assert stages_run(exp) == {"train", "evaluate", "export"}
    summary = json.loads((project / "models/student/train_summary.json").read_text())
    assert [t["name"] for t in summary["losses"]] == ["contrastive", "mcad_candidates", "mcad_feature"]

    # augmented views (every teacher's train split, aligned through the heads) replayed by the
    # student, distilled from an ensemble of two cross-modal teachers
    exp = run(["dvc", "exp", "run", "-n", "views", "-S", "teach.views=3", "-S", "train.views=sample",
               "-S", "train.caches=[caches/aligned/train.zarr,caches/tiny_clip/train.zarr]"], project)
    assert {"teach@tiny_clip", "teach@tiny_vision", "align", "train", "evaluate"} <= stages_run(exp)
    summary = json.loads((project / "models/student/train_summary.json").read_text())
    assert summary["views"] == {"mode": "sample", "per_image": 3}
    assert summary["ensemble"] == ["caches/aligned/train.zarr", "caches/tiny_clip/train.zarr"]
    for store in ("aligned/train.zarr", "tiny_vision/train.zarr"):
        attrs = json.loads((project / "caches" / store / "zarr.json").read_text())["attributes"]
        assert attrs["schema_version"] == 2 and attrs["views"] == 3
    test_attrs = json.loads((project / "caches/aligned/test.zarr/zarr.json").read_text())["attributes"]
    assert test_attrs["schema_version"] == 1  # views for the train split only

    # the grounding task: trained from the teacher cache of its scenes without running a teacher,
    # and an experiment switches the distillation off, rerunning only its train and evaluate
    ground = json.loads((project / "models/grounding/train_summary.json").read_text())
    assert ground["teacher_forward_calls"] == 0 and ground["teacher_fields"] == ["image", "text"]
    assert (project / "reports/ground/figures/example_0.png").exists()
    assert "![" in (project / "reports/ground/report.md").read_text()
    exp = run(["dvc", "exp", "run", "-n", "ground-none", "-S", "grounding.train.recipe=none"], project)
    assert stages_run(exp) == {"ground_train", "ground_evaluate"}
    ground = json.loads((project / "models/grounding/train_summary.json").read_text())
    assert [t["name"] for t in ground["losses"]] == ["box_l1", "box_giou"] and ground["teacher_fields"] == []
    assert "acc_at_0_5" in json.loads((project / "reports/ground/metrics.json").read_text())
