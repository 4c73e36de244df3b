"""Stage 3 (``evaluate``): retrieval quality and efficiency of a student next to its teacher.

The student encodes the test split from its shards; the teacher is scored from its cache of the
same split. Both are scored on the same rows: cache rows are joined to shard samples by their
stable ids, and an image is kept only when the student could decode it AND the cache marks it
valid; a caption is kept only when its image is kept and the cache marks the caption valid.

Outputs: ``metrics.json`` (numbers only, nested by model and section, which ``dvc metrics show``
flattens),
Recall@K curves as CSV for ``dvc plots``, and a Markdown report.
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from torch.overrides import TorchFunctionMode

from pipeline import metrics as M
from pipeline.cache import TeacherCache
from pipeline.config import DEVICE_PATTERN, check_settings, setting
from pipeline.data.shards import Manifest, SkipCounter, iter_samples, load_manifest
from pipeline.devices import resolve_device
from pipeline.progress import note, progress_task
from pipeline.students import Student, load_student

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    "from pipeline.evaluate import memory_probe\n"
    "print(json.dumps(memory_probe(json.loads(sys.argv[1]), baseline)))\n"
)


@dataclass(frozen=True)
class EvalConfig:
    """Parameters of the ``evaluate`` stage (``params.yaml`` section ``evaluate``)."""

    dataset: str = "data/emoji/test"             # dataset directory of the test split
    student_dir: str = "models/student"          # holds student.json + student.safetensors
    teacher_cache: str | None = "caches/demo_clip/test.zarr"  # same split; null = student only
    teacher: str | None = "demo_clip"            # registry name for efficiency; null = skip it
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_teacher
    ks: tuple[int, ...] = setting((1, 5, 10), minimum=1, min_items=1)  # Recall@K cut-offs (RSUM sums
                                                 # them over both directions)
    curve_max_k: int = setting(50, minimum=1)    # Recall@K curve for K = 1..curve_max_k
    ndcg_k: int = setting(10, minimum=1)         # single-modal NDCG cut-off
    encode_batch_size: int = setting(64, minimum=1)  # images (and texts) per student forward when encoding
    latency_batch_sizes: tuple[int, ...] = setting((1, 64), minimum=1)  # batch sizes timed for the
                                                 # efficiency table
    latency_warmup: int = setting(2, minimum=0)  # untimed calls before timing (allocator, caches)
    latency_repeats: int = setting(5, minimum=1)  # timed calls; the median is reported
    measure_memory: bool = True                  # peak memory via a subprocess per model
    device: str = setting("cpu", pattern=DEVICE_PATTERN)  # "cpu", "cuda" or "auto"
    block_rows: int = setting(1024, minimum=1)   # query rows per similarity tile (bounds memory)
    n_examples: int = setting(3, minimum=0)      # test images shown with their top-3 captions
    metrics_path: str = "reports/eval/metrics.json"
    plots_dir: str = "reports/eval/plots"        # recall_at_k.csv (+ _wide.csv for dvc plots)
    report_path: str = "reports/eval/report.md"

    def __post_init__(self) -> None:
        check_settings(self, "evaluate")


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedSplit:
    """The student's embeddings of a split, in manifest row order, with the ids to join on."""

    image_ids: list[str]
    text_ids: list[str]
    text_to_image: np.ndarray      # int64 [N_txt]
    labels: list[str | None]       # per image
    captions: list[str]            # per text row
    image_emb: np.ndarray          # float32 [N_img, D]; zero rows where the image did not decode
    text_emb: np.ndarray           # float32 [N_txt, D]
    image_ok: np.ndarray           # bool [N_img]: the image decoded
    sample_images: list[PIL.Image.Image] = field(default_factory=list)  # first decoded images (for timing)


def _encode_images(student: Student, images: list[PIL.Image.Image], device: str) -> np.ndarray:
    pixels = torch.stack([student.preprocess(im) for im in images]).to(device)
    return student.encode_image(pixels).float().cpu().numpy()


def _encode_texts(student: Student, texts: list[str], device: str) -> np.ndarray:
    return student.encode_text(student.tokenize(texts).to(device)).float().cpu().numpy()


def _encode_captions(student: Student, captions: list[str], batch_size: int, device: str,
                     advance: Callable[[int], None]) -> np.ndarray:
    text_emb = np.zeros((len(captions), student.embed_dim), dtype=np.float32)
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        text_emb[start:stop] = _encode_texts(student, captions[start:stop], device)
        advance(stop - start)
    return text_emb


def encode_split(student: Student, manifest: Manifest, batch_size: int, device: str,
                 progress: bool | None = None, keep_images: int = 0) -> EncodedSplit:
    """Encode every image and caption of a split; undecodable images are kept as zero rows.

    The first ``keep_images`` decoded images are kept for latency measurement.
    """
    ids, labels, captions, t2i, image_ok = [], [], [], [], []
    kept: list[PIL.Image.Image] = []
    emb_parts: list[tuple[list[int], np.ndarray]] = []
    pending: list[tuple[int, PIL.Image.Image]] = []
    total = manifest.n_images + manifest.n_texts

    def flush() -> None:
        rows, images = [i for i, _ in pending], [im for _, im in pending]
        emb_parts.append((rows, _encode_images(student, images, device)))
        pending.clear()

    with torch.inference_mode(), progress_task("evaluate: encode", total, progress) as advance:
        for row, sample in enumerate(iter_samples(manifest, handler=SkipCounter())):
            ids.append(sample.sample_id)
            labels.append(sample.label)
            image_ok.append(sample.image is not None)
            captions.extend(sample.captions)
            t2i.extend([row] * len(sample.captions))
            if sample.image is not None:
                pending.append((row, sample.image))
                if len(kept) < keep_images:
                    kept.append(sample.image)
            if len(pending) == batch_size:
                flush()
            advance(1)
        if pending:
            flush()
        text_emb = _encode_captions(student, captions, batch_size, device, advance)
    image_emb = np.zeros((len(ids), student.embed_dim), dtype=np.float32)
    for rows, emb in emb_parts:
        image_emb[rows] = emb
    text_ids = [f"{sid}#{c}" for sid, n in _caption_counts(ids, t2i) for c in range(n)]
    return EncodedSplit(ids, text_ids, np.asarray(t2i, dtype=np.int64), labels, captions,
                        image_emb, text_emb, np.asarray(image_ok, dtype=bool), kept)


def _caption_counts(image_ids: list[str], t2i: list[int]) -> list[tuple[str, int]]:
    counts = np.bincount(np.asarray(t2i, dtype=np.int64), minlength=len(image_ids))
    return list(zip(image_ids, counts.tolist()))


# ----------------------------------------------------------------------------- joining


@dataclass
class EvalRows:
    """The rows both models are scored on: indices into the student's split and the cache."""

    image_rows: np.ndarray          # student (manifest) image rows kept
    text_rows: np.ndarray           # student (manifest) text rows kept
    text_to_image: np.ndarray       # kept captions -> position in image_rows
    cache_image_rows: np.ndarray | None
    cache_text_rows: np.ndarray | None
    n_images_excluded: int
    n_texts_excluded: int


def join_rows(split: EncodedSplit, cache: TeacherCache | None) -> EvalRows:
    """Rows valid for both models; cache rows are matched by stable id, not position."""
    image_keep = split.image_ok.copy()
    text_keep = np.ones(len(split.text_ids), dtype=bool)
    cache_img = cache_txt = None
    if cache is not None:
        img_row, txt_row = cache.image_row(), cache.text_row()
        cache_img = np.array([img_row.get(s, -1) for s in split.image_ids], dtype=np.int64)
        cache_txt = np.array([txt_row.get(t, -1) for t in split.text_ids], dtype=np.int64)
        image_keep &= (cache_img >= 0) & cache.image_valid[np.maximum(cache_img, 0)]
        text_keep &= (cache_txt >= 0) & cache.text_valid[np.maximum(cache_txt, 0)]
    # A caption whose image is gone has no positive left: drop it in both directions.
    text_keep &= image_keep[split.text_to_image]
    image_rows = np.flatnonzero(image_keep)
    text_rows = np.flatnonzero(text_keep)
    new_index = np.full(len(image_keep), -1, dtype=np.int64)
    new_index[image_rows] = np.arange(len(image_rows))
    return EvalRows(
        image_rows, text_rows, new_index[split.text_to_image[text_rows]],
        None if cache_img is None else cache_img[image_rows],
        None if cache_txt is None else cache_txt[text_rows],
        int((~image_keep).sum()), int((~text_keep).sum()),
    )


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """One model's metrics (flat) and Recall@K curves per direction."""

    metrics: dict[str, float]
    counts: dict[str, int]
    curves: dict[str, np.ndarray]


def score_embeddings(image_emb: np.ndarray | None, text_emb: np.ndarray | None,
                     text_to_image: np.ndarray, labels: list[str | None], cfg: EvalConfig) -> Scores:
    """Recall@K/RSUM/MedR (both towers present) and single-modal NDCG for each tower present."""
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    curves: dict[str, np.ndarray] = {}
    if image_emb is not None and text_emb is not None:
        i2t, t2i = M.retrieval_ranks(image_emb, text_emb, text_to_image, block_rows=cfg.block_rows)
        summary = M.summarize_ranks(i2t, t2i, cfg.ks)
        for name in ("n_images", "n_texts", "n_images_without_caption"):
            counts[name] = int(summary.pop(name))
        out.update(summary)
        curves = {"i2t": M.recall_curve(i2t, cfg.curve_max_k),
                  "t2i": M.recall_curve(t2i, cfg.curve_max_k)}
    k = cfg.ndcg_k
    if image_emb is not None:
        nd = M.ndcg_image_to_image(image_emb, labels, k=k, block_rows=cfg.block_rows)
        out[f"i2i_ndcg@{k}"] = nd[f"ndcg@{k}"]
        counts.update(i2i_ndcg_queries=nd["n_queries"], i2i_ndcg_excluded=nd["n_excluded"])
    if text_emb is not None:
        nd = M.ndcg_text_to_text(text_emb, text_to_image, labels, k=k, block_rows=cfg.block_rows)
        out[f"t2t_ndcg@{k}"] = nd[f"ndcg@{k}"]
        counts.update(t2t_ndcg_queries=nd["n_queries"], t2t_ndcg_excluded=nd["n_excluded"])
    return Scores(out, counts, curves)


def pct_of_teacher(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """100 * student / teacher for every metric both have (MedR: lower is better, so >100 is worse)."""
    return {k: 100.0 * v / teacher[k] for k, v in student.items()
            if k in teacher and _finite(v) and _finite(teacher[k]) and teacher[k] != 0}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- efficiency


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


# ----------------------------------------------------------------------------- peak memory


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


# ----------------------------------------------------------------------------- outputs


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN/inf become null (strict JSON readers reject NaN)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer, np.floating)):
        return _clean(value.item())
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as sorted, indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def write_recall_curves(plots_dir: Path, curves: dict[str, dict[str, np.ndarray]]) -> list[Path]:
    """Recall@K curves as CSV: long (k, direction, model, recall) and wide (k, <model>_<dir>...).

    ``dvc plots`` draws one line per y column, so the wide file is the one to declare in dvc.yaml;
    the long file is the tidy form for other tools.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    series = [(model, direction, curve) for model, by_dir in curves.items()
              for direction, curve in by_dir.items()]
    long_path, wide_path = plots_dir / "recall_at_k.csv", plots_dir / "recall_at_k_wide.csv"
    with long_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "direction", "model", "recall"])
        for model, direction, curve in series:
            w.writerows([k + 1, direction, model, f"{v:.4f}"] for k, v in enumerate(curve))
    n_k = max((len(c) for _, _, c in series), default=0)
    with wide_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k"] + [f"{m}_{d}" for m, d, _ in series])
        for k in range(n_k):
            w.writerow([k + 1] + [f"{c[k]:.4f}" for _, _, c in series])
    return [long_path, wide_path]


def qualitative_examples(split: EncodedSplit, rows: EvalRows, n: int, top: int = 3) -> list[dict]:
    """The student's top captions for ``n`` evenly spaced scored test images."""
    if n <= 0 or len(rows.image_rows) == 0 or len(rows.text_rows) == 0:
        return []
    text_emb = split.text_emb[rows.text_rows]
    picks = np.unique(np.linspace(0, len(rows.image_rows) - 1, n).round().astype(int))
    examples = []
    for p in picks:
        image_row = int(rows.image_rows[p])
        sims = text_emb @ split.image_emb[image_row]
        order = np.argsort(-sims, kind="stable")[:top]  # stable: ties go to the lower row
        examples.append({
            "image_id": split.image_ids[image_row], "label": split.labels[image_row],
            "truth": [split.captions[j] for j in rows.text_rows[rows.text_to_image == p]],
            "top": [(split.captions[rows.text_rows[j]], float(sims[j]), bool(rows.text_to_image[j] == p))
                    for j in order],
        })
    return examples


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _quality_table(metrics: dict[str, Any]) -> list[str]:
    student, teacher = metrics["student"], metrics.get("teacher", {})
    pct = metrics.get("pct_of_teacher", {})
    lines = ["| metric | student | teacher | student % of teacher |", "|---|---:|---:|---:|"]
    for key, value in student.items():
        digits = 4 if "ndcg" in key else 2
        lines.append(f"| {key} | {_fmt(value, digits)} | {_fmt(teacher.get(key), digits)} "
                     f"| {_fmt(pct.get(key), 1)} |")
    return lines


EFFICIENCY_ROWS = (
    ("params_image", "image tower parameters"), ("params_text", "text tower parameters"),
    ("params_total", "all parameters"),
)


def _efficiency_table(eff: dict[str, dict[str, float]], batch_sizes: tuple[int, ...]) -> list[str]:
    rows = list(EFFICIENCY_ROWS)
    for kind in ("image", "text"):
        for bs in batch_sizes:
            rows.append((f"{kind}_ms_per_item_b{bs}", f"{kind} encode, batch {bs} (ms per {kind})"))
            rows.append((f"{kind}_ms_per_batch_b{bs}", f"{kind} encode, batch {bs} (ms per batch)"))
    rows += [("loaded_rss_mb", "peak RSS after loading (MiB)"),
             ("peak_rss_mb", "peak RSS while encoding (MiB)"), ("cuda_peak_mb", "peak CUDA memory (MiB)")]
    student, teacher = eff.get("student", {}), eff.get("teacher", {})
    lines = ["| | student | teacher |", "|---|---:|---:|"]
    for key, title in rows:
        if key in student or key in teacher:
            digits = 3 if "_ms_" in key else 1
            lines.append(f"| {title} | {_fmt(student.get(key), digits)} | {_fmt(teacher.get(key), digits)} |")
    return lines


def _examples_section(examples: list[dict]) -> list[str]:
    lines: list[str] = []
    for ex in examples:
        lines += [f"**`{ex['image_id']}`** (label: {ex['label'] or '–'})", "",
                  "ground truth: " + " / ".join(f"“{c}”" for c in ex["truth"]), ""]
        for rank, (caption, sim, hit) in enumerate(ex["top"], 1):
            lines.append(f"{rank}. {'✓' if hit else '✗'} “{caption}” (cos {sim:.3f})")
        lines.append("")
    return lines


def write_report(path: Path, cfg: EvalConfig, metrics: dict[str, Any], examples: list[dict],
                 notes: list[str], device: str) -> None:
    """The Markdown report: quality table, efficiency table, examples, definitions, notes."""
    counts = metrics["counts"]
    ks = ", ".join(str(k) for k in cfg.ks)
    lines = [
        "# Evaluation report", "",
        f"Test split `{cfg.dataset}`: {_fmt(counts.get('n_images'))} images and "
        f"{_fmt(counts.get('n_texts'))} captions scored ({counts['n_images_excluded']} images and "
        f"{counts['n_texts_excluded']} captions excluded for both models: undecodable, invalid in "
        "the teacher cache, or caption of an excluded image).",
        f"Student `{cfg.student_dir}`; teacher scored from its cache `{cfg.teacher_cache}`.", "",
        "## Retrieval quality", "", *_quality_table(metrics), "",
        f"Recall@K in percent (K = {ks}); image→text counts a hit when ANY of the image's captions "
        "is in the top K, text→image when the caption's image is. RSUM = sum of the Recall@K values "
        "of both directions. MedR = median 1-based rank of the first positive (lower is better, so "
        "its % of teacher above 100 means worse). Ties in similarity are broken by the lower row.",
        "", "## Efficiency", "", *_efficiency_table(metrics["efficiency"], cfg.latency_batch_sizes), "",
        f"Device `{device}`, {torch.get_num_threads()} torch threads, one process. Latency = median of "
        f"{cfg.latency_repeats} timed calls after {cfg.latency_warmup} warm-up calls under "
        "`torch.inference_mode()`; images from preprocessed pixels, texts from strings "
        f"(tokenisation included). Memory: {MEMORY_METHOD}. `VmHWM` is read from "
        "/proc/self/status rather than `getrusage().ru_maxrss`, which in a child started by "
        "fork/vfork + exec also counts the parent's peak.", "",
        "## Qualitative examples (student)", "", *_examples_section(examples),
        "## Relevance definitions", "", M.NDCG_DEFINITION, "",
    ]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- the stage


def _score_teacher(cache: TeacherCache, rows: EvalRows, labels: list[str | None],
                   cfg: EvalConfig) -> Scores:
    """The teacher's scores from its cached embeddings on the joined rows."""
    image_emb = cache.image_emb[rows.cache_image_rows] if cache.image_emb is not None else None
    text_emb = cache.text_emb[rows.cache_text_rows] if cache.text_emb is not None else None
    return score_embeddings(image_emb, text_emb, rows.text_to_image, labels, cfg)


def _with_memory(eff: dict[str, float], spec: dict[str, Any], cfg: EvalConfig, notes: list[str]) -> None:
    if not cfg.measure_memory:
        return
    try:
        eff.update(measure_peak_memory(spec))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        notes.append(f"peak memory of the {spec['kind']} not measured: {exc}")


def measure_efficiency(cfg: EvalConfig, student: Student, split: EncodedSplit, device: str,
                       notes: list[str]) -> dict[str, dict[str, float]]:
    """Parameters, latency and peak memory of the student and (when it builds) the teacher."""
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
    eff["teacher"] = teacher_efficiency(teacher, images, captions, cfg, device)
    del teacher  # free it before the probe process allocates its own copy
    _with_memory(eff["teacher"], {**probe, "kind": "teacher", "teacher": cfg.teacher,
                                  "kwargs": cfg.teacher_kwargs}, cfg, notes)
    return eff


def evaluate(cfg: EvalConfig, progress: bool | None = None) -> dict[str, Any]:
    """Score student and teacher on the test split; write metrics.json, plots and the report.

    Returns the metrics dict exactly as written to ``cfg.metrics_path``.
    """
    device = resolve_device(cfg.device)
    manifest = load_manifest(cfg.dataset)
    student = load_student(Path(cfg.student_dir)).to(device).eval()
    split = encode_split(student, manifest, cfg.encode_batch_size, device, progress,
                         keep_images=max(cfg.latency_batch_sizes))
    cache = (TeacherCache.open(cfg.teacher_cache, expect_dataset=manifest.fingerprint)
             if cfg.teacher_cache else None)
    rows = join_rows(split, cache)
    note(f"evaluate: scoring retrieval on {len(rows.image_rows)} images", progress)
    labels = [split.labels[i] for i in rows.image_rows]
    student_scores = score_embeddings(split.image_emb[rows.image_rows], split.text_emb[rows.text_rows],
                                      rows.text_to_image, labels, cfg)
    metrics: dict[str, Any] = {"student": student_scores.metrics}
    curves = {"student": student_scores.curves}
    if cache is not None:
        teacher_scores = _score_teacher(cache, rows, labels, cfg)
        metrics["teacher"] = teacher_scores.metrics
        metrics["pct_of_teacher"] = pct_of_teacher(student_scores.metrics, teacher_scores.metrics)
        curves["teacher"] = teacher_scores.curves
    metrics["counts"] = {**student_scores.counts, "n_images_excluded": rows.n_images_excluded,
                         "n_texts_excluded": rows.n_texts_excluded}
    notes: list[str] = []
    note("evaluate: measuring size, latency and memory", progress)
    metrics["efficiency"] = measure_efficiency(cfg, student, split, device, notes)
    metrics = _clean(metrics)
    write_json(Path(cfg.metrics_path), metrics)
    write_recall_curves(Path(cfg.plots_dir), curves)
    examples = qualitative_examples(split, rows, cfg.n_examples)
    write_report(Path(cfg.report_path), cfg, metrics, examples, notes, device)
    return metrics

