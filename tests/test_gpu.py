"""GPU path of stages 1 and 2: the same caches and training as on the CPU, within precision."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.losses import LossTerm
from pipeline.stores.teacher import TeacherCache
from pipeline.teachers import create_teacher
from stages.teach.run import TeachConfig, run_teach
from stages.train.run import TrainConfig, train
from tests.conftest import TINY_CLIP_CFG
from tests.test_train import TINY_STUDENT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_teach_then_train_on_cuda(make_dataset, tmp_path):
    root = make_dataset(n_train=40, n_test=8)
    cfg = TeachConfig(dataset=str(root), rows_per_shard=16, rows_per_chunk=8, batch_size=8,
                      summary_dir=str(tmp_path / "reports"))
    cpu_cfg = replace(cfg, out_root=str(tmp_path / "cpu"))
    gpu_cfg = replace(cfg, out_root=str(tmp_path / "gpu"))
    run_teach(cpu_cfg, "t", create_teacher("open_clip", model_cfg=TINY_CLIP_CFG), progress=False)
    gpu_teacher = create_teacher("open_clip", model_cfg=TINY_CLIP_CFG).to("cuda")
    summary = run_teach(gpu_cfg, "t", gpu_teacher, progress=False)
    assert summary["forward_calls"] > 0
    cpu = TeacherCache.open(tmp_path / "cpu/t/train.zarr")
    gpu = TeacherCache.open(tmp_path / "gpu/t/train.zarr")
    assert gpu.teacher_fingerprint == cpu.teacher_fingerprint  # device is not part of it
    assert gpu.attrs["compute"]["device"] == "cuda"
    cos = (cpu.image_emb * gpu.image_emb).sum(axis=1)  # bf16 autocast: close, not equal
    assert cos.min() > 0.99 and (cpu.text_emb * gpu.text_emb).sum(axis=1).min() > 0.99

    out = tmp_path / "student"
    result = train(TrainConfig(student_kwargs=TINY_STUDENT, dataset=str(root),
                               caches=(str(tmp_path / "gpu/t/train.zarr"),), out_dir=str(out),
                               batch_size=8, steps=20, lr=2e-3, warmup_steps=2, log_every=1,
                               device="cuda", losses=(LossTerm("contrastive"), LossTerm("feature"),
                                                      LossTerm("similarity_kl"))), progress=False)
    assert result["finished"] and result["device"] == "cuda" and result["teacher_forward_calls"] == 0
    assert np.isfinite(result["final_metrics"]["loss"])
