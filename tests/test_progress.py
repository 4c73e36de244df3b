"""Output streams: stdout holds the JSON summary alone; progress goes to stderr, as plain lines at a
steady interval when stderr is not a terminal; third-party bars only when asked for."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from pipeline.progress import ProgressLines
from stages.cli import app
from tests.test_cli import write_params
from tests.test_evaluate import eval_setup  # noqa: F401  (fixture)
from tests.test_train import _cfg, toy  # noqa: F401  (fixture)

runner = CliRunner()
LINE = re.compile(r"^(?P<what>.+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>[\d.]+)%\) \d+ s elapsed")


def plain(data) -> dict:
    """A config as params.yaml holds it (lists, not tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(data)))


def progress_lines(stderr: str, what: str) -> list[tuple[int, int]]:
    found = [LINE.match(line) for line in stderr.splitlines()]
    return [(int(m["done"]), int(m["total"])) for m in found if m and m["what"] == what]


def test_lines_every_percent_step_with_start_and_end():
    out = io.StringIO()
    lines = ProgressLines("work", 8, out, seconds=3600, percent=25)
    for _ in range(8):
        lines.advance(1, "x")
    lines.finish()
    text = out.getvalue().splitlines()
    assert [(m["done"], m["pct"]) for m in map(LINE.match, text)] == [
        ("0", "0.0"), ("2", "25.0"), ("4", "50.0"), ("6", "75.0"), ("8", "100.0")]
    assert "ETA" in text[1] and "ETA" not in text[-1] and text[-1].endswith("[x]")


def test_lines_at_a_steady_interval_of_time():
    out = io.StringIO()
    lines = ProgressLines("work", 1000, out, seconds=0, percent=100)
    for _ in range(3):
        lines.advance()
    lines.finish()  # the last line already said 3/1000: not repeated
    assert [LINE.match(t)["done"] for t in out.getvalue().splitlines()] == ["0", "1", "2", "3"]


def test_teach_stdout_is_the_json_summary_alone(make_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS_SECONDS", "0")
    params = write_params(tmp_path / "params.yaml", make_dataset(), tmp_path)
    result = runner.invoke(app, ["teach", "tiny", "--params", str(params)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing else on stdout
    assert summary["units_computed"] > 0
    seen = progress_lines(result.stderr, "teach tiny")
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] and len(seen) > 2
    quiet = runner.invoke(app, ["teach", "tiny", "--params", str(params), "--no-progress"])
    assert quiet.exit_code == 0 and progress_lines(quiet.stderr, "teach tiny") == []


def test_train_shows_progress_lines_in_a_log(toy, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DISTILL_PROGRESS_PERCENT", "25")
    cfg = _cfg(toy, tmp_path / "model", steps=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": plain(cfg)}))
    result = runner.invoke(app, ["train", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["finished"] is True
    assert [d for d, _ in progress_lines(result.stderr, f"train {cfg.student}")] == [0, 2, 4, 6, 8]


def test_evaluate_shows_life_in_a_log(eval_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DISTILL_PROGRESS_SECONDS", "0")
    cfg = dataclasses.replace(eval_setup, measure_memory=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": plain(cfg)}))
    result = runner.invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "student" in json.loads(result.stdout)
    done, total = progress_lines(result.stderr, "evaluate: encode")[-1]
    assert done == total == 12 + 24  # images and captions
    assert "evaluate: scoring retrieval" in result.stderr
    assert "evaluate: measuring size, latency and memory" in result.stderr


# Loads all-MiniLM-L6-v2 (packaged) through transformers, whose loader draws a "Loading weights"
# bar: first hidden as the CLI starts by default (before transformers is imported), then shown as
# with --progress (transformers already imported).
LOAD_MINILM = """
import sys
from pipeline.progress import library_progress
from pipeline.teachers import create_teacher
library_progress(False)
create_teacher("hf_text", model="minilm")
print("SHOWN FROM HERE", file=sys.stderr, flush=True)
library_progress(True)
create_teacher("hf_text", model="minilm")
"""


def test_third_party_bars_only_when_asked_for():
    proc = subprocess.run([sys.executable, "-c", LOAD_MINILM], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hidden, shown = proc.stderr.split("SHOWN FROM HERE")
    assert "Loading weights" not in hidden and "Loading weights" in shown


def test_progress_help_matches_its_default():
    result = runner.invoke(app, ["teach", "--help"])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())  # rich's panel, unwrapped
    assert "by default a bar on a terminal, otherwise a plain line" in text
    assert "default: True" not in text and "[default: progress]" not in text
