"""The teacher's efficiency figures, kept between evaluations.

Every ``evaluate`` of a new student times the same teacher again (latency at each batch size and a
memory probe in a fresh process: most of an evaluation's time for a mid-sized teacher), although
nothing about the teacher changed. The figures are therefore kept in one JSON file per key, under
``evaluate.teacher_efficiency_cache`` (``.cache/teacher_efficiency`` by default: outside every DVC
output, so ``dvc repro`` does not delete them), and reused when the key matches:

* the teacher: its fingerprint (weights, preprocessing, heads: everything that makes its outputs);
* the machine: CPU model and count, platform, torch version, torch threads, device (and the GPU's
  name on CUDA);
* the timing settings: batch sizes, warm-up and timed calls, whether memory is probed, and the
  captions timed (a text encoder with dynamic padding times longer captions longer).

Only figures measured on a quiet machine (1-minute load average at most the CPU count) are kept:
a busy machine's timings are inflated, and the next evaluation measures again. The report then
says the teacher's figures were reused and when they were measured, at what load.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.fingerprint import fingerprint

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvalConfig


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_identity(device: str) -> dict[str, Any]:
    """What a latency depends on besides the model: CPU, torch and its threads, device."""
    identity: dict[str, Any] = {"cpu_model": cpu_model(), "cpus": os.cpu_count() or 1,
                                "platform": f"{platform.system()} {platform.machine()}",
                                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        identity["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return identity


def teacher_efficiency_key(teacher: Any, cfg: EvalConfig, device: str, captions: list[str]) -> dict[str, Any]:
    """Everything the teacher's efficiency figures depend on (see the module docstring)."""
    return {"teacher_fingerprint": fingerprint(teacher.fingerprint()),
            "machine": machine_identity(device),
            "timing": {"latency_batch_sizes": list(cfg.latency_batch_sizes),
                       "latency_warmup": cfg.latency_warmup, "latency_repeats": cfg.latency_repeats,
                       "measure_memory": cfg.measure_memory, "captions": fingerprint(captions)}}


def _path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{fingerprint(key).split(':', 1)[1][:24]}.json"


def load_kept(cache_dir: str | Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    """The kept record for ``key`` (``efficiency``, ``measured``, ``load_1min``, ``path``), or None
    when there is none (or it is unreadable, or was written for another key)."""
    if cache_dir is None:
        return None
    path = _path(cache_dir, key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != json.loads(json.dumps(key)):
        return None
    return {**record, "path": str(path)}


def keep(cache_dir: str | Path | None, key: dict[str, Any], efficiency: dict[str, float],
         load_1min: float) -> None:
    """Write the figures for ``key`` (atomically: evaluations side by side may share the folder)."""
    if cache_dir is None:
        return
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "efficiency": efficiency, "load_1min": load_1min,
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def reuse_note(record: dict[str, Any]) -> str:
    """The report's sentence on reused teacher figures."""
    return (f"the teacher's efficiency figures (parameters, latency, memory) were reused from its "
            f"measurement of {record['measured']} at load {record['load_1min']:.1f}: same teacher "
            f"fingerprint, machine and timing settings ({record['path']}; delete it, or set "
            "evaluate.teacher_efficiency_cache to null, to measure again)")
