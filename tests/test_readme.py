"""What the README promises: its minimal params.yaml runs through the four commands, and its demo
figures and the report's screenshots come from one recorded run (docs/demo_run.json)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stages.cli import app
from tests.conftest import TINY_CLIP_CFG
from tests.test_prepare import _img2dataset_shards

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import report_screenshots  # noqa: E402

runner = CliRunner()


def minimal_params() -> dict:
    """The YAML block between the README's minimal-params markers."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- minimal-params:start -->\n```yaml\n(.*?)```\n<!-- minimal-params:end -->", text, re.S)
    assert block, "README.md lost its minimal-params block"
    return yaml.safe_load(block.group(1))


def test_readme_minimal_params_run_the_four_commands(tmp_path: Path, monkeypatch):
    """The README's params.yaml, changed only where this machine differs: the shards' folder, a
    tiny random-init open_clip teacher instead of ViT-B-32 (no downloads), a short schedule."""
    params = minimal_params()
    assert set(params) == {"prepare", "teachers", "teach", "train", "evaluate"}
    name = next(iter(params["teachers"]))
    tiny = {"model_cfg": TINY_CLIP_CFG, "pretrained": None}
    _img2dataset_shards(tmp_path / "shards", n_shards=3, per_shard=16)
    params["prepare"]["src"] = str(tmp_path / "shards")
    params["teachers"][name]["kwargs"] = tiny
    params["evaluate"]["teacher_kwargs"] = tiny
    # the tiny teacher has one block per tower: the student inherits that one
    params["train"]["init"].update(image_layers=[0], text_layers=[0])
    params["train"].update(epochs=1.0, batch_size=8, device="cpu")
    params["evaluate"].update(latency_batch_sizes=[1, 4], latency_repeats=1, measure_memory=False,
                              teacher_efficiency_cache=str(tmp_path / "kept"))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    for command in (["prepare"], ["teach", name], ["train"], ["evaluate"]):
        result = runner.invoke(app, [*command, "--no-progress"])
        assert result.exit_code == 0, f"distill {' '.join(command)}: {result.output}"
    summary = json.loads(Path("models/student/train_summary.json").read_text())
    assert summary["finished"] and summary["teacher_forward_calls"] == 0
    assert list(summary["caches"]) == [f"caches/{name}/train.zarr"]  # no other store was read
    spec = json.loads(Path("models/student/student.json").read_text())
    assert spec["init"]["from_teacher"] == name and spec["student"] == "open_clip"
    metrics = json.loads(Path("reports/eval/metrics.json").read_text())
    assert metrics["counts"]["n_images"] > 0 and "rsum" in metrics["teacher"]


def test_readme_figures_and_screenshots_come_from_the_recorded_run():
    """README table == the table rendered from docs/demo_run.json, and both screenshots are
    stamped with the fingerprint of those metrics (scripts/report_screenshots.py writes all four)."""
    problems = report_screenshots.check(REPO / "README.md", REPO / "docs/demo_run.json",
                                        [REPO / "docs/report.png", REPO / "docs/report-gallery.png"])
    assert problems == []


def test_readme_block_is_rendered_from_the_record_alone(tmp_path: Path):
    """The check can fail: a figure changed in the record no longer matches the README."""
    record = json.loads((REPO / "docs/demo_run.json").read_text())
    record["metrics"]["student"]["rsum"] += 1.0
    changed = tmp_path / "demo_run.json"
    changed.write_text(json.dumps(record))
    problems = report_screenshots.check(REPO / "README.md", changed, [REPO / "docs/report.png"])
    assert any("README.md" in p for p in problems) and any("report.png" in p for p in problems)
    readme = tmp_path / "README.md"
    readme.write_text(report_screenshots.replace_block((REPO / "README.md").read_text(),
                                                       report_screenshots.readme_block(record)))
    assert f"| RSUM | {record['metrics']['alone']['rsum']:.1f} | {record['metrics']['student']['rsum']:.1f} |" in readme.read_text()
    assert not any("README" in p for p in report_screenshots.check(readme, changed, []))


def test_gallery_page_keeps_the_gallery_only():
    page = ("<html><head><style>x</style></head><body>\n<h1>Evaluation report</h1><h2>Retrieval quality</h2>"
            "<table></table><h2>Retrieval gallery</h2><div class=query>q</div><h2>Notes</h2><ul></ul></body></html>")
    cut = report_screenshots.gallery_page(page)
    assert "<style>x</style>" in cut and "<div class=query>q</div>" in cut
    assert "Retrieval quality" not in cut and "Notes" not in cut
