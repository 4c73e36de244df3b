"""Shared pieces of the benchmarks: machine info, timing, result files, demo data."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers depend on: CPU count, threads, torch version, device."""
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_1min"] = os.getloadavg()[0]  # other work on the machine skews timings
    except OSError:
        pass
    return info


def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of ``fn`` takes (GPU work included)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (default ``benchmarks/results``)."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_image(i: int, size: int = 96) -> tuple[Image.Image, list[str], str]:
    """A coloured shape on noise with two captions and a label (data when no demo set exists)."""
    colour = list(COLOURS)[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(180, 255, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(size // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLOURS[colour])
    return img, [f"a {colour} {shape}", f"{shape} number {i} in {colour}"], shape


def write_shape_dataset(root: Path, split: str, n: int, per_shard: int = 100) -> Path:
    """Real WebDataset shards + manifest of ``n`` shape images under ``root/split``."""
    from pipeline.data.writing import write_manifest, write_shards

    def samples():
        for i in range(n):
            img, captions, label = shape_image(i)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            yield {"__key__": f"s{i:06d}", "png": buf.getvalue(),
                   "json": {"captions": captions, "label": label}}

    write_shards(samples(), root / split, split, per_shard)
    write_manifest(root / split)
    return root


def demo_batch(batch_size: int, dataset: str | None) -> tuple[list[Image.Image], list[str]]:
    """``batch_size`` (image, first caption) pairs: from a dataset split if given, else shapes."""
    if dataset and Path(dataset, "manifest.json").exists():
        from pipeline.data.manifest import load_manifest
        from pipeline.data.handlers import SkipCounter
        from pipeline.data.shards import iter_samples

        images, captions = [], []
        for sample in iter_samples(load_manifest(dataset), handler=SkipCounter()):
            if sample.image is not None:
                images.append(sample.image)
                captions.append(sample.captions[0])
            if len(images) == batch_size:
                break
        if images:  # a split smaller than the batch is cycled
            return ([images[i % len(images)] for i in range(batch_size)],
                    [captions[i % len(captions)] for i in range(batch_size)])
    pairs = [shape_image(i) for i in range(batch_size)]
    return [p[0] for p in pairs], [p[1][0] for p in pairs]


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values parsed as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def teacher_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher factory kwargs from ``--teacher-kwarg``, ``--teacher-model``, ``--teacher-pretrained``."""
    kwargs = parse_kwargs(args.teacher_kwarg)
    if args.teacher_model is not None:
        kwargs["model"] = args.teacher_model
    if args.teacher_pretrained is not None:
        kwargs["pretrained"] = args.teacher_pretrained
    return kwargs
