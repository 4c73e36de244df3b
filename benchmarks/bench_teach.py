"""Stage-1 throughput: the real teach runner vs the bare teacher forward on the same rows.

(1) teach   -- ``stages.teach.run.run_teach`` on real shards: tar reading, image decoding and
               preprocessing (in a prefetch thread), teacher forward, fp16 Zarr writes with
               zstd + crc32c in whole shards, status/id arrays, resume bookkeeping, publish.
(2) forward -- the same teacher on the same rows with nothing else: images already decoded and
               preprocessed into in-memory tensors, batches of the runner's batch size (texts:
               4x, as the runner batches them).
(3) data    -- (for the breakdown) reading + decoding + preprocessing the images, no teacher.

ratio = teach seconds / forward seconds (1.0 = the runner adds nothing to the model's own cost).
With ``--executor dask`` the teach passes run on a LocalCluster of ``--workers`` processes started
for the benchmark (each worker builds the teacher once, in an untimed warm-up pass); the bare
forward runs here, with the same torch thread count a worker has (``--torch-threads``).
Passes are interleaved over ``--repeats`` and medians reported; every teach pass writes a fresh
cache. Prints a Markdown table, writes ``benchmarks/results/bench_teach.json``.

    python benchmarks/bench_teach.py                       # demo_clip on data/emoji test split
    python benchmarks/bench_teach.py --executor dask --workers 1 --torch-threads 2
    python benchmarks/bench_teach.py --device cuda --batch-size 128 --decode-workers 4
    python benchmarks/bench_teach.py --teacher open_clip --teacher-model ViT-B-32 \\
        --teacher-pretrained /path/to/open_clip_pytorch_model.bin
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from _common import (machine_info, markdown_table, median, teacher_kwargs, timed, write_results,
                     write_shape_dataset)

from pipeline.config import TeacherEntry
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import iter_samples
from pipeline.iterate import batched
from pipeline.teachers import create_teacher
from stages.executors import DaskConfig
from stages.teach.run import TeachConfig, run_teach

PASSES = ("teach", "forward", "data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_teacher_args(p)
    p.add_argument("--batch-size", type=int, default=TeachConfig.batch_size,
                   help="images per teacher forward (texts: 4x), as teach.batch_size")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=1, help="interleaved passes of each kind")
    p.add_argument("--executor", choices=("inprocess", "dask"), default="inprocess",
                   help="where the teach passes run units (teach.executor)")
    p.add_argument("--workers", type=int, default=1, help="Dask worker processes (--executor dask)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads here and in each Dask worker (default: torch's own)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="image decoding processes per unit (teach.decode_workers; default auto)")
    p.add_argument("--rows-per-shard", type=int, default=TeachConfig.rows_per_shard,
                   help="rows per unit of work (teach.rows_per_shard)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def add_data_and_teacher_args(p: argparse.ArgumentParser) -> None:
    """The dataset and teacher options shared by the teach benchmarks."""
    p.add_argument("--dataset", default="data/emoji", help="dataset root holding <split>/ shards")
    p.add_argument("--split", default="test", help="split to encode")
    p.add_argument("--synthetic", type=int, default=256,
                   help="shape images to generate when the dataset split is missing")
    p.add_argument("--teacher", default="demo_clip", help="teacher registry name")
    p.add_argument("--teacher-model", default=None, help="`model` kwarg (open_clip, hf_text, timm)")
    p.add_argument("--teacher-pretrained", default=None, help="`pretrained` kwarg (tag or file)")
    p.add_argument("--teacher-kwarg", action="append", default=[], metavar="K=V",
                   help="extra teacher kwarg (JSON value), repeatable")


def dataset_root(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The dataset root with the split to encode; synthetic shape shards when it is missing."""
    root = Path(args.dataset)
    if (root / args.split / "manifest.json").exists():
        return root, "dataset"
    return write_shape_dataset(scratch / "data", args.split, args.synthetic), "synthetic"


def preprocessed(teacher: Any, manifest: Manifest) -> tuple[list[torch.Tensor], list[str]]:
    """Every decodable image preprocessed by the teacher, and every caption, in row order."""
    pixels, captions = [], []
    for sample in iter_samples(manifest, handler=SkipCounter()):
        if sample.image is not None and "image" in teacher.modalities:
            pixels.append(teacher.preprocess(sample.image))
        captions.extend(sample.captions)
    return pixels, captions


def bare_forward(teacher: Any, pixels: list[torch.Tensor], captions: list[str],
                 batch_size: int, device: str) -> None:
    """The teacher alone: image batches from memory, then caption batches (4x), as the runner."""
    if "image" in teacher.modalities:
        for start in range(0, len(pixels), batch_size):
            teacher.encode_images(torch.stack(pixels[start:start + batch_size]).to(device))
    if "text" in teacher.modalities:
        for batch in batched(captions, batch_size * 4):
            teacher.encode_texts(batch)


def data_only(teacher: Any, manifest: Manifest) -> None:
    """Reading, decoding and preprocessing alone (what the prefetch thread does)."""
    for sample in iter_samples(manifest, handler=SkipCounter()):
        if sample.image is not None and "image" in teacher.modalities:
            teacher.preprocess(sample.image)


def teach_pass(teacher: Any, args: argparse.Namespace, root: Path, work: Path,
               scheduler: str | None = None) -> None:
    """One full teach run into a fresh output folder (a reused one would be up to date); on the
    Dask cluster at ``scheduler`` when given (workers build the teacher from its entry)."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="teach-"))
    cfg = TeachConfig(dataset=str(root), splits=(args.split,), out_root=str(out / "caches"),
                      batch_size=args.batch_size, device=args.device, summary_dir=str(out / "summary"),
                      rows_per_shard=args.rows_per_shard,
                      rows_per_chunk=math.gcd(args.rows_per_shard, TeachConfig.rows_per_chunk), decode_workers=args.decode_workers,
                      executor="dask" if scheduler else "inprocess",
                      dask=DaskConfig(scheduler=scheduler, torch_threads=args.torch_threads))
    entry = TeacherEntry(args.teacher, teacher_kwargs(args))
    summary = run_teach(cfg, args.teacher, None if scheduler else teacher, progress=False, entry=entry)
    assert not summary["up_to_date"] and summary["units_computed"] > 0
    shutil.rmtree(out)


@contextmanager
def cluster(args: argparse.Namespace) -> Iterator[str | None]:
    """The address of a LocalCluster of ``--workers`` processes (--executor dask), else None."""
    if args.executor != "dask":
        yield None
        return
    import dask
    from distributed import LocalCluster

    from stages.executors import local_worker_config

    threads = args.torch_threads or max(1, torch.get_num_threads() // args.workers)
    with dask.config.set(local_worker_config(threads)), \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as c:
        yield c.scheduler_address


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, kwargs = args.device, teacher_kwargs(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    teacher = create_teacher(args.teacher, **kwargs).to(device)
    with tempfile.TemporaryDirectory(prefix="bench-teach-") as tmp, cluster(args) as scheduler:
        work = Path(tmp)
        root, source = dataset_root(args, work)
        manifest = load_manifest(root / args.split)
        pixels, captions = preprocessed(teacher, manifest)
        runs = {
            "teach": lambda: teach_pass(teacher, args, root, work, scheduler),
            "forward": lambda: bare_forward(teacher, pixels, captions, args.batch_size, device),
            "data": lambda: data_only(teacher, manifest),
        }
        bare_forward(teacher, pixels[:args.batch_size], captions[:4 * args.batch_size],
                     args.batch_size, device)  # warm-up: first-call allocations and kernels
        if scheduler:
            teach_pass(teacher, args, root, work, scheduler)  # workers build their teachers
        times: dict[str, list[float]] = {p: [] for p in PASSES}
        for r in range(args.repeats):
            for name in PASSES[r % 3:] + PASSES[:r % 3]:
                times[name].append(timed(runs[name], device))
    return report(args, kwargs, manifest, source, times, device)


def report(args: argparse.Namespace, kwargs: dict[str, Any], manifest: Manifest, source: str,
           times: dict[str, list[float]], device: str) -> dict[str, Any]:
    """Print the Markdown table and write the JSON result."""
    med = {p: median(t) for p, t in times.items()}
    n_img, n_txt = manifest.n_images, manifest.n_texts
    titles = {"teach": "teach runner (shards -> Zarr)", "forward": "bare teacher forward (in memory)",
              "data": "read + decode + preprocess only"}
    rows = [[titles[p], f"{med[p]:.2f}", f"{n_img / med[p]:.1f}", f"{(n_img + n_txt) / med[p]:.1f}"]
            for p in PASSES]
    ratio = med["teach"] / med["forward"]
    print(markdown_table(["pass", "seconds", "images/s", "rows/s (images + texts)"], rows))
    print(f"\n{n_img} images + {n_txt} captions ({source}: {manifest.root}); batch {args.batch_size} "
          f"images / {4 * args.batch_size} texts; teach / bare forward = {ratio:.2f}")
    result = {
        "benchmark": "bench_teach", "machine": machine_info(device), "teacher": args.teacher,
        "teacher_kwargs": kwargs, "executor": args.executor,
        "workers": args.workers if args.executor == "dask" else None,
        "torch_threads": args.torch_threads, "decode_workers": args.decode_workers,
        "rows_per_shard": args.rows_per_shard, "dataset": str(manifest.root), "dataset_source": source,
        "n_images": n_img, "n_texts": n_txt, "batch_size": args.batch_size,
        "repeats": args.repeats, "median_s": med, "times_s": times,
        "images_per_s": {p: n_img / med[p] for p in PASSES},
        "ratio_teach_over_forward": ratio,
    }
    name = "bench_teach" + (f"_dask{args.workers}" if args.executor == "dask" else "")
    print(f"\nwritten: {write_results(name, result, args.out)}")
    return result


if __name__ == "__main__":
    main()
