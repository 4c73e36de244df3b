"""Data-parallel training under torchrun: 2 real processes with gloo on CPU.

Step 1's loss and gradients equal a single process's on the same global batch; a resumed run
equals an uninterrupted one; a checkpoint of another process count is refused; `distill train
--nproc 2` runs end to end.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.training.batch import assemble
from tests.test_train import TINY_STUDENT, toy  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_ddp_worker.py"
pytestmark = pytest.mark.slow


def _config(toy, out: Path, **overrides) -> dict:
    cfg = dict(student_kwargs=TINY_STUDENT, dataset=str(toy["dataset"]), caches=[str(toy["cache"])],
               out_dir=str(out), batch_size=8, steps=6, lr=2e-3, warmup_steps=2, log_every=1,
               checkpoint_every=2, shuffle_buffer=8, device="cpu", threads=1,
               losses=[{"name": "contrastive"}, {"name": "feature", "kwargs": {"metric": "cosine"}},
                       {"name": "similarity_kl", "weight": 0.5}])
    cfg.update(overrides)
    return cfg


def _torchrun(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(f"torchrun failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def _write(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def test_step_one_equals_one_process_on_the_global_batch(toy, tmp_path):
    """Loss and every gradient of DDP step 1 (2 ranks x 4 samples, embeddings gathered with
    gradients, gradients averaged by DDP) equal one process's on the same 8 samples, to float32
    round-off (rtol 1e-4, atol 1e-6: the sums run in another order)."""
    from pipeline.config import from_dict
    from stages.train.run import TrainConfig, setup

    cfg = _config(toy, tmp_path / "m")
    _torchrun(2, "step1", _write(tmp_path / "cfg.json", cfg), str(tmp_path / "step1.pt"))
    ddp = torch.load(tmp_path / "step1.pt", weights_only=False)
    assert ddp["world_size"] == 2 and len(ddp["batches"]) == 2
    ranks = ddp["batches"]
    assert set(ranks[0]["image_rows"].tolist()).isdisjoint(ranks[1]["image_rows"].tolist())
    batch = {"pixels": torch.cat([b["pixels"] for b in ranks]),
             "image_rows": torch.cat([b["image_rows"] for b in ranks]),
             "text_rows": torch.cat([b["text_rows"] for b in ranks]),
             "captions": [c for b in ranks for c in b["captions"]]}
    run = setup(from_dict(TrainConfig, cfg, "train"))
    total, terms = run.objective(assemble(run.plan, run.student, batch, run.device, amp=False))
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    assert total.item() == pytest.approx(ddp["loss"], rel=1e-5)
    for name, value in terms.items():
        assert value.item() == pytest.approx(ddp["terms"][name], rel=1e-5, abs=1e-7), name
    single = {f"{prefix}.{n}": p.grad for prefix, m in (("student", run.student), ("objective", run.objective))
              for n, p in m.named_parameters() if p.grad is not None}
    assert single.keys() == ddp["grads"].keys()
    for name, grad in single.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the in-batch terms saw the global batch: on one rank's 4 samples the loss differs
    half = {k: (v[:4] if k != "captions" else v[:4]) for k, v in batch.items()}
    local, _ = run.objective(assemble(run.plan, run.student, half, run.device, amp=False))
    assert abs(local.item() - ddp["loss"]) > 1e-3


def test_resume_equals_uninterrupted_and_another_world_size_is_refused(toy, tmp_path):
    from pipeline.config import from_dict
    from stages.train.run import TrainConfig, train

    whole = _config(toy, tmp_path / "whole")
    _torchrun(2, "train", _write(tmp_path / "whole.json", whole))
    cut = _config(toy, tmp_path / "cut")
    _torchrun(2, "train", _write(tmp_path / "cut.json", cut), "3")  # killed after step 3
    scratch = tmp_path / ".scratch" / "cut" / "last.safetensors"
    assert scratch.exists() and not (tmp_path / "cut" / "student.safetensors").exists()
    # one process on that checkpoint is refused, naming the count it needs
    with pytest.raises(PipelineError, match=r"written by a run of 2 training process\(es\) at step 2.*--nproc 2"):
        train(from_dict(TrainConfig, cut, "train"), progress=False)
    assert scratch.exists()  # nothing lost: the checkpoint is still there to resume
    _torchrun(2, "train", _write(tmp_path / "cut.json", cut))
    a = load_file(tmp_path / "whole" / "student.safetensors")
    b = load_file(tmp_path / "cut" / "student.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary = json.loads((tmp_path / "cut" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["samples_seen"] == 6 * 8 and summary["teacher_forward_calls"] == 0
    def log(name: str) -> list[dict]:  # rank 0's one log, timings left out
        with (tmp_path / name / "train_log.csv").open() as f:
            return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]
    assert [row["step"] for row in log("cut")] == [str(s) for s in range(1, 7)]
    assert log("cut") == log("whole")


def test_distill_train_nproc_runs_torchrun(toy, tmp_path):
    """The CLI route: `distill train --nproc 2 -p params.yaml` trains one student on 2 processes
    and prints one summary."""
    import yaml

    cfg = _config(toy, tmp_path / "cli", steps=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": cfg}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "stages.cli", "train", "--nproc", "2", "-p",
                          str(tmp_path / "params.yaml"), "--no-progress"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count('"world_size": 2') == 1  # rank 0's summary only
    assert (tmp_path / "cli" / "student.safetensors").exists()
    summary = json.loads((tmp_path / "cli" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["finished"]


def test_batch_not_divisible_by_the_process_count_is_refused(toy, tmp_path):
    cfg = _config(toy, tmp_path / "odd", batch_size=7)
    out = _torchrun(2, "train", _write(tmp_path / "odd.json", cfg), check=False)
    assert out.returncode != 0
    assert "train.batch_size 7 is not divisible by the 2 training processes" in out.stdout + out.stderr
