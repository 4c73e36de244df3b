"""Efficiency probes for ``evaluate``: parameters per tower, encode latency, and peak memory
measured in a fresh process, with the machine's load recorded beside the timings."""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import PIL.Image
import torch
from torch.overrides import TorchFunctionMode

from pipeline.evaluation.kept_efficiency import keep, load_kept, reuse_note, teacher_efficiency_key
from pipeline.evaluation.scoring import EncodedSplit
from pipeline.paths import project_path
from pipeline.students import Student, load_student

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvalConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MEMORY_METHOD = ("peak resident set size (VmHWM, the kernel's RSS high-water mark) of a fresh Python "
                 "process that builds the model and encodes one batch of images and one of texts; "
                 "`baseline` is that process right after `import torch`, `loaded` after importing "
                 "the model's libraries and building it")
# The probe process: baseline right after `import torch`, before the pipeline (and open_clip,
# transformers, zarr...) is imported, so `loaded - baseline` includes the model's libraries.
_PROBE_MAIN = (
    "import json, sys, torch\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "baseline = int(hwm[0].split()[1]) / 1024.0 if hwm else None\n"
    "from pipeline.evaluation.efficiency import memory_probe\n"
    "print(json.dumps(memory_probe(json.loads(sys.argv[1]), baseline)))\n"
)


def median_latency_ms(fn: Callable[[], Any], warmup: int, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` in ms, after ``warmup`` untimed calls, under inference_mode."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _repeat_to(items: list, n: int) -> list:
    """``items`` cycled to length ``n`` (a test split can be smaller than the timed batch)."""
    return [items[i % len(items)] for i in range(n)]


def time_encoders(encode_images: Callable[[torch.Tensor], Any], encode_texts: Callable[[list[str]], Any],
                  pixels: torch.Tensor, captions: list[str], cfg: EvalConfig, device: str
                  ) -> dict[str, float]:
    """Per-batch and per-item median latency for each batch size in ``cfg.latency_batch_sizes``.

    Images are timed from preprocessed pixels (decoding/resizing is data loading, not the model);
    texts from raw strings, tokenisation included (it is part of every text query).
    """
    out: dict[str, float] = {}
    for bs in cfg.latency_batch_sizes:
        px = pixels[torch.arange(bs) % len(pixels)].to(device)
        texts = _repeat_to(captions, bs)
        for kind, fn in (("image", lambda: encode_images(px)), ("text", lambda: encode_texts(texts))):
            ms = median_latency_ms(fn, cfg.latency_warmup, cfg.latency_repeats, device)
            out[f"{kind}_ms_per_batch_b{bs}"] = ms
            out[f"{kind}_ms_per_item_b{bs}"] = ms / bs
    return out


def student_efficiency(student: Student, images: list[PIL.Image.Image], captions: list[str],
                       cfg: EvalConfig, device: str) -> dict[str, float]:
    """Parameters per tower and encode latency of the student."""
    towers = student.tower_parameters()
    out: dict[str, float] = {f"params_{k}": int(v) for k, v in towers.items()}
    out["params_total"] = int(sum(p.numel() for p in student.parameters()))
    pixels = torch.stack([student.preprocess(im) for im in images])
    out.update(time_encoders(student.encode_image,
                             lambda t: student.encode_text(student.tokenize(t).to(device)),
                             pixels, captions, cfg, device))
    return out


def build_teacher(cfg: EvalConfig, device: str) -> tuple[Any | None, str | None]:
    """The teacher for efficiency measurement, or ``(None, reason)`` when it cannot be built."""
    if cfg.teacher is None:
        return None, "teacher efficiency not measured: `evaluate.teacher` is null"
    try:
        from pipeline.teachers import create_teacher
        teacher = create_teacher(cfg.teacher, **cfg.teacher_kwargs)
        if hasattr(teacher, "to"):
            teacher = teacher.to(device)
        return teacher, None
    except Exception as exc:  # any failure (missing weights, no hub access) only skips this table
        return None, f"teacher {cfg.teacher!r} could not be constructed ({type(exc).__name__}: {exc})"


class _ParameterUse(TorchFunctionMode):
    """Records which parameters take part in any torch operation while active."""

    def __init__(self, by_storage: dict[int, list[torch.nn.Parameter]]) -> None:
        super().__init__()
        self.by_storage, self.used = by_storage, set()

    def _visit(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.untyped_storage().data_ptr() in self.by_storage:
                self.used.add(obj.untyped_storage().data_ptr())
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self._visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                self._visit(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Attribute reads (``p.device``, ``p.dtype``) go through ``__get__`` and touch no weights.
        if getattr(func, "__name__", "") != "__get__":
            self._visit(args)
            self._visit(kwargs or {})
        return func(*args, **(kwargs or {}))


def parameters_used(model: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """Number of ``model`` parameters that ``fn()`` reads (each counted once).

    Works for any module layout: a teacher has no tower API, so its image (text) tower is
    measured as the parameters its image (text) encoder actually touches.
    """
    by_storage: dict[int, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    mode = _ParameterUse(by_storage)
    with mode, torch.inference_mode():
        fn()
    return sum(p.numel() for ptr in mode.used for p in by_storage[ptr])


def teacher_efficiency(teacher: Any, images: list[PIL.Image.Image], captions: list[str],
                       cfg: EvalConfig, device: str) -> dict[str, float]:
    """Parameters per tower and encode latency of a constructed teacher (absent modalities skipped)."""
    out: dict[str, float] = {"params_total": int(sum(p.numel() for p in teacher.parameters()))}
    has_image, has_text = "image" in teacher.modalities, "text" in teacher.modalities
    pixels = torch.stack([teacher.preprocess(im) for im in images]) if has_image else torch.zeros(1)
    if has_image:
        out["params_image"] = parameters_used(teacher, lambda: teacher.encode_images(pixels[:1].to(device)))
    if has_text:
        out["params_text"] = parameters_used(teacher, lambda: teacher.encode_texts(captions[:1]))
    timed = time_encoders(teacher.encode_images if has_image else (lambda p: None),
                          teacher.encode_texts if has_text else (lambda t: None),
                          pixels, captions, cfg, device)
    keep = {"image"} if has_image else set()
    keep |= {"text"} if has_text else set()
    out.update({k: v for k, v in timed.items() if k.split("_", 1)[0] in keep})
    return out


def _peak_rss_mb() -> float:
    """Peak resident set size of this process image, in MiB.

    Reads ``VmHWM`` from /proc: ``getrusage(...).ru_maxrss`` also counts the parent's peak when
    the process was started by fork/vfork + exec (Linux folds the pre-exec memory map's high-water
    mark into it), which would report the evaluating process instead of the probe.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _probe_encoders(spec: dict[str, Any], device: str):
    """(preprocess, encode_images, encode_texts) of the model a probe spec names."""
    if spec["kind"] == "student":
        student = load_student(Path(spec["student_dir"])).to(device)
        return (student.preprocess, student.encode_image,
                lambda t: student.encode_text(student.tokenize(t).to(device)))
    from pipeline.teachers import create_teacher
    teacher = create_teacher(spec["teacher"], **spec["kwargs"]).to(device)
    noop = lambda x: None  # noqa: E731 - a modality the teacher lacks costs nothing
    return (teacher.preprocess if "image" in teacher.modalities else None,
            teacher.encode_images if "image" in teacher.modalities else noop,
            teacher.encode_texts if "text" in teacher.modalities else noop)


def memory_probe(spec: dict[str, Any], baseline_mb: float | None = None) -> dict[str, float]:
    """Run inside the probe process: build one model, encode one batch of each modality."""
    device = spec["device"]
    out = {"baseline_rss_mb": _peak_rss_mb() if baseline_mb is None else baseline_mb}
    preprocess, encode_images, encode_texts = _probe_encoders(spec, device)
    out["loaded_rss_mb"] = _peak_rss_mb()
    bs = int(spec["batch_size"])
    with torch.inference_mode():
        if preprocess is not None:
            gray = PIL.Image.new("RGB", (256, 256), (128, 128, 128))
            encode_images(torch.stack([preprocess(gray)] * bs).to(device))
        encode_texts(_repeat_to(spec["captions"], bs))
    out["peak_rss_mb"] = _peak_rss_mb()
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_peak_memory(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, float]:
    """Peak memory of encoding with one model, measured in a fresh Python process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _PROBE_MAIN, json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {spec['kind']} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _with_memory(eff: dict[str, float], spec: dict[str, Any], cfg: EvalConfig, notes: list[str]) -> None:
    if not cfg.measure_memory:
        return
    try:
        eff.update(measure_peak_memory(spec))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        notes.append(f"peak memory of the {spec['kind']} not measured: {exc}")


def machine_state() -> dict[str, float]:
    """CPUs, torch threads and the load average now (1, 5, 15 min), recorded beside latencies."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpus": os.cpu_count() or 1, "torch_threads": torch.get_num_threads(),
            "load_1min": load[0], "load_5min": load[1], "load_15min": load[2]}


def busy_note(machine: dict[str, float]) -> str | None:
    """A warning when more work was runnable than the machine has CPUs while timing, which
    inflates every latency in the report; None on a quiet machine."""
    if machine["load_1min"] > machine["cpus"]:
        return (f"the machine was busy while latencies were measured (load average "
                f"{machine['load_1min']:.1f} over the last minute on {machine['cpus']} CPUs): "
                "the timings are inflated; rerun `distill evaluate` on an idle machine to compare them")
    return None


def measure_efficiency(cfg: EvalConfig, student: Student, split: EncodedSplit, device: str,
                       notes: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Parameters, latency and peak memory of the student and (when it builds) the teacher, and
    the machine's state while timing (the highest load average seen before and after)."""
    before = machine_state()
    eff = _measure(cfg, student, split, device, notes)
    after = machine_state()
    machine = {**before, **{k: max(before[k], after[k]) for k in ("load_1min", "load_5min", "load_15min")}}
    note = busy_note(machine)
    if note:
        notes.append(note)
    return eff, machine


def _measure(cfg: EvalConfig, student: Student, split: EncodedSplit, device: str,
             notes: list[str]) -> dict[str, dict[str, float]]:
    # Any content times the same; fall back to a gray image / fixed caption for an empty split.
    images = split.sample_images or [PIL.Image.new("RGB", (224, 224), (128, 128, 128))]
    captions = split.captions[:max(cfg.latency_batch_sizes)] or ["a photo"]
    probe = {"device": device, "batch_size": max(cfg.latency_batch_sizes), "captions": captions}
    eff = {"student": student_efficiency(student, images, captions, cfg, device)}
    _with_memory(eff["student"], {**probe, "kind": "student", "student_dir": cfg.student_dir}, cfg, notes)
    teacher, why_not = build_teacher(cfg, device)
    if teacher is None:
        notes.append(why_not)
        return eff
    key = teacher_efficiency_key(teacher, cfg, device, captions)
    kept = load_kept(cfg.teacher_efficiency_cache, key)
    if kept is not None:  # same teacher, machine and timing settings: nothing new to measure
        eff["teacher"] = kept["efficiency"]
        notes.append(reuse_note({**kept, "path": project_path(kept["path"])}))
        return eff
    load = machine_state()["load_1min"]
    eff["teacher"] = teacher_efficiency(teacher, images, captions, cfg, device)
    del teacher  # free it before the probe process allocates its own copy
    _with_memory(eff["teacher"], {**probe, "kind": "teacher", "teacher": cfg.teacher,
                                  "kwargs": cfg.teacher_kwargs}, cfg, notes)
    load = max(load, machine_state()["load_1min"])
    if cfg.measure_memory and "peak_rss_mb" not in eff["teacher"]:
        return eff  # the probe failed: keep nothing, so the next evaluation tries again
    if load <= (os.cpu_count() or 1):  # timings of a busy machine are inflated: not worth keeping
        keep(cfg.teacher_efficiency_cache, key, eff["teacher"], load)
    return eff
