"""Teach throughput on the Dask executor: 2 worker processes vs 1, same data, CPU teacher.

Two LocalClusters are started (1 worker and ``--workers`` workers, one torch thread and one task
thread per worker, so each worker is one core's worth of work) and the real teach runner
(``run_teach`` with ``executor: dask``) encodes the same split on each, in passes interleaved over
``--repeats`` (every pass writes a fresh cache; one untimed warm-up pass per cluster lets every
worker build its teacher). speed-up = median seconds on 1 worker / median seconds on N workers.
Prints a Markdown table, writes ``benchmarks/results/bench_teach_scaling.json``.

    python benchmarks/bench_teach_scaling.py                  # demo_clip, data/emoji test split
    python benchmarks/bench_teach_scaling.py --workers 2 --repeats 3 --rows-per-shard 32
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _common import machine_info, markdown_table, median, teacher_kwargs, write_results
from bench_teach import add_data_and_teacher_args, dataset_root

from pipeline.config import TeacherEntry
from pipeline.data.manifest import load_manifest
from stages.executors import DaskConfig
from stages.teach.run import TeachConfig, run_teach


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_teacher_args(p)
    p.add_argument("--batch-size", type=int, default=TeachConfig.batch_size)
    p.add_argument("--rows-per-shard", type=int, default=32,
                   help="rows per unit: small enough that every worker gets units")
    p.add_argument("--workers", type=int, default=2, help="workers of the larger cluster")
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes per cluster")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def teach_pass(args: argparse.Namespace, root: Path, work: Path, scheduler: str) -> float:
    """One teach run on the cluster at ``scheduler`` into a fresh folder; its seconds."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="teach-"))
    cfg = TeachConfig(dataset=str(root), splits=(args.split,), out_root=str(out / "caches"),
                      batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                      rows_per_chunk=math.gcd(args.rows_per_shard, TeachConfig.rows_per_chunk),
                      device="cpu",
                      summary_dir=str(out / "summary"), executor="dask",
                      dask=DaskConfig(scheduler=scheduler, torch_threads=1))
    summary = run_teach(cfg, args.teacher, progress=False,
                        entry=TeacherEntry(args.teacher, teacher_kwargs(args)))
    assert not summary["up_to_date"] and summary["units_computed"] > 1
    shutil.rmtree(out)
    return summary["seconds"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import dask
    from distributed import LocalCluster

    from stages.executors import local_worker_config

    args = parse_args(argv)
    sizes = (1, args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        root, source = dataset_root(args, work)
        manifest = load_manifest(root / args.split)
        stack.enter_context(dask.config.set(local_worker_config(1)))  # one torch thread per worker
        clusters = {n: stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1,
                                                        processes=True, dashboard_address=":0"))
                    for n in sizes}
        for n in sizes:  # warm-up: every worker builds its teacher
            teach_pass(args, root, work, clusters[n].scheduler_address)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for r in range(args.repeats):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                times[n].append(teach_pass(args, root, work, clusters[n].scheduler_address))
    med = {n: median(t) for n, t in times.items()}
    rows_total = manifest.n_images + manifest.n_texts
    print(markdown_table(["workers", "seconds", "images/s", "rows/s"],
                         [[n, f"{med[n]:.2f}", f"{manifest.n_images / med[n]:.1f}",
                           f"{rows_total / med[n]:.1f}"] for n in sizes]))
    speedup = med[1] / med[args.workers]
    print(f"\n{manifest.n_images} images + {manifest.n_texts} captions ({source}); units of "
          f"{args.rows_per_shard} rows; speed-up {args.workers} workers / 1 worker = {speedup:.2f}")
    result = {"benchmark": "bench_teach_scaling", "machine": machine_info("cpu"),
              "teacher": args.teacher, "dataset": str(manifest.root), "dataset_source": source,
              "n_images": manifest.n_images, "n_texts": manifest.n_texts,
              "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard,
              "repeats": args.repeats, "times_s": {str(n): t for n, t in times.items()},
              "median_s": {str(n): m for n, m in med.items()}, "speedup": speedup}
    print(f"\nwritten: {write_results('bench_teach_scaling', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
