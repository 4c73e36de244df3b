"""Output streams: stdout holds the JSON summary alone; progress goes to stderr, as plain lines at a
steady interval when stderr is not a terminal; third-party bars only when asked for."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys
import time

import yaml
from typer.testing import CliRunner

import pytest

from pipeline.progress import ProgressLines, add_bar_task, make_progress
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


def test_a_short_job_prints_its_start_and_end_only():
    """Off a terminal a job of a few seconds gets two lines, not one per 5 % of it."""
    out = io.StringIO()
    lines = ProgressLines("prepare: write shards", 2000, out)  # the defaults: 30 s, no percent
    for _ in range(2000):
        lines.advance()
    lines.finish()
    assert [LINE.match(t)["done"] for t in out.getvalue().splitlines()] == ["0", "2000"]


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


class FakeClock:
    """A clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ETA = re.compile(r"(?P<done>\d+)/\d+ .* elapsed since resuming at (?P<start>\d+), ETA (?P<eta>\d+) s")


def test_resumed_lines_name_the_step_and_count_only_this_runs_rate():
    """550 of 690 steps done before the interruption, then 2 s per step: after 14 more steps the
    ETA is 126 x 2 s (the earlier steps, done in no time by this process, do not count)."""
    out, clock = io.StringIO(), FakeClock()
    lines = ProgressLines("train s", 690, out, seconds=0, start=550, clock=clock)
    for _ in range(14):
        clock.now += 2.0
        lines.advance()
    first, last = out.getvalue().splitlines()[0], out.getvalue().splitlines()[-1]
    assert first == "train s: 550/690 (79.7%) 0 s elapsed since resuming at 550"
    m = ETA.search(last)
    assert (m["done"], m["start"], m["eta"]) == ("564", "550", str(126 * 2))


def test_resumed_bar_takes_its_rate_from_this_runs_steps():
    """The terminal bar (rich): the steps of the earlier run are shown as done but do not speed up
    the ETA."""
    clock = FakeClock()
    progress = make_progress(False, get_time=clock)
    task_id = add_bar_task(progress, "train s", 690, start=550)
    for _ in range(14):
        clock.now += 2.0
        progress.update(task_id, advance=1)
    task = progress.tasks[0]
    assert task.completed == 564 and "resumed at 550" in task.description
    assert task.time_remaining == pytest.approx(126 * 2.0, rel=0.01)


class StampedStream(io.StringIO):
    """Records the time each progress line was written."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.stamps.append((time.monotonic(), line))
        return super().write(text)


def test_resumed_training_eta_matches_the_time_it_then_takes(toy, tmp_path, monkeypatch):  # noqa: F811
    """An interrupted run resumed: the resumed run's lines say from which step, and the ETA five
    steps in is within a factor 2 of the time the rest then took. The interrupted run trains for
    real; the resumed one runs the real loop (batches, checkpoint, publish) around a steady
    synthetic step of 0.3 s, so the check does not hang on this shared machine's load. The old
    rule, which counted the earlier run's 8 steps as done by this process in no time, gave 0.38
    of it."""
    import stages.train.run as train_run

    monkeypatch.setenv("DISTILL_PROGRESS_SECONDS", "0")
    cfg = _cfg(toy, tmp_path / "model", steps=24, checkpoint_every=8)
    first = train_run.train(cfg, progress=False, stop_after=10)  # the kill: last checkpoint at 8
    assert first["finished"] is False
    def steady_step(run, batch):
        time.sleep(0.3)
        return {"loss": 1.0}

    monkeypatch.setattr(train_run, "train_step", steady_step)
    stream = StampedStream()
    monkeypatch.setattr(sys, "stderr", stream)
    summary = train_run.train(cfg, progress=None)
    monkeypatch.undo()
    assert summary["finished"] and summary["resumed_from"] == 8
    stamped = [(t, line) for t, line in stream.stamps if line.startswith(f"train {cfg.student}:")]
    assert stamped[0][1].startswith(f"train {cfg.student}: 8/24 (33.3%) 0 s elapsed since resuming at 8")
    end = stamped[-1][0]
    by_step = {int(m["done"]): (t, int(m["eta"])) for t, m in ((t, ETA.search(x)) for t, x in stamped) if m}
    t, eta = by_step[13]  # five steps into the resumed run, eleven to go
    assert 0.5 <= eta / (end - t) <= 2.0, (eta, end - t)


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
