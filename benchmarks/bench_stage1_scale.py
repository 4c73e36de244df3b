"""Stage 1 past memory: peak RSS of ``neighbors`` and ``align`` at N and 10 N rows.

    python benchmarks/bench_stage1_scale.py --rows 1000000 10000000 --dim 64 --work /tmp/stage1

Each size gets a synthetic teacher store (``pipeline.synthetic.write_synthetic_store``: random
unit vectors, image and text, one caption per image, ``--dim`` wide, float16, written with the
project's own writer under ``--work``). Then a fresh Python process per measurement, which
prints one JSON line with its own peak RSS (``VmHWM``):

* ``neighbors``: ``plan_neighbors`` as the stage runs it (the store opened lazily: statuses
  only), then the first unit of the ``t2i`` direction computed as a worker computes it
  (``--unit-rows`` caption queries against every image row, the keys read a block at a time).
  A whole run is that unit repeated N / unit-rows times per direction (its time estimate below);
  the memory of one unit is the memory of all.
* ``align``: the whole stage, ``run_align`` with one epoch (the heads read the pairs a block
  of ``align.block_rows`` images at a time) and every unit of the aligned stores written.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, machine_info, write_results  # noqa: E402


def _peak_mb() -> float:
    """This process's peak RSS in MiB (``VmHWM``: its own address space, not its parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_store(work: Path, n_rows: int, dim: int) -> Path:
    """The synthetic teacher store of ``n_rows`` rows (written once, reused)."""
    from pipeline.synthetic import write_synthetic_store

    root = work / f"n{n_rows}" / "caches"
    store = root / "syn" / "train.zarr"
    if not (store / "zarr.json").exists():
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthetic_store(store, n_rows, dim)
        print(f"wrote {store} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return root


def probe_neighbors(root: Path, unit_rows: int) -> dict:
    from stages.neighbors.run import NeighborsConfig, plan_neighbors

    cfg = NeighborsConfig(teacher="syn", k=32, directions=("t2i",), cache_root=str(root),
                          out_root=str(root.parent / "nn"), rows_per_shard=unit_rows)
    t0 = time.perf_counter()
    job = plan_neighbors(cfg, "syn")
    plan_s, rss_plan = time.perf_counter() - t0, _peak_mb()
    unit = job.units[0]
    t0 = time.perf_counter()
    arrays, _ = job.work.compute(unit)
    unit_s = time.perf_counter() - t0
    idx = arrays["t2i_topk_idx"]
    return {"stage": "neighbors", "units_per_direction": len(job.units), "unit_rows": unit.rows,
            "plan_s": plan_s, "unit_s": unit_s, "peak_rss_mb_after_plan": rss_plan,
            "peak_rss_mb": _peak_mb(), "lists_complete": bool((idx >= 0).all())}


def probe_align(root: Path, dim: int) -> dict:
    from stages.align.run import AlignConfig, run_align

    out = root.parent
    shutil.rmtree(root / "al", ignore_errors=True)
    cfg = AlignConfig(name="al", vision="syn", text="syn", cache_root=str(root), val_split=None,
                      embed_dim=dim, epochs=1, batch_size=256, heads_dir=str(out / "models"),
                      summary_dir=str(out / "reports"))
    t0 = time.perf_counter()
    summary = run_align(cfg, progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(root / "al", ignore_errors=True)
    return {"stage": "align", "seconds": seconds,
            "train_pairs": summary["train_pairs"], "units": summary["units_computed"],
            "peak_rss_mb": _peak_mb()}


def run_probe(stage: str, root: Path, args: argparse.Namespace) -> dict:
    """One probe in a fresh Python process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", stage, "--root", str(root),
           "--dim", str(args.dim), "--unit-rows", str(args.unit_rows), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", default=[])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--unit-rows", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/stage1_scale"))
    p.add_argument("--stages", nargs="+", default=["neighbors", "align"])
    args = p.parse_args()
    if args.what[:1] == ["probe"]:
        import torch

        torch.set_num_threads(args.threads)
        result = probe_neighbors(args.root, args.unit_rows) if args.what[1] == "neighbors" \
            else probe_align(args.root, args.dim)
        print(json.dumps(result | {"rows": int(args.root.parent.name[1:])}))
        return
    results = []
    for n in args.rows:
        root = make_store(args.work, n, args.dim)
        for stage in args.stages:
            results.append(run_probe(stage, root, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    import os
    path = write_results("bench_stage1_scale", {"machine": machine_info("cpu") | {
        "load_average_after": os.getloadavg()}, "args": {k: str(v) for k, v in vars(args).items()},
        "results": results})
    for stage in args.stages:
        rows = [r for r in results if r["stage"] == stage]
        if len(rows) == 2:
            print(f"{stage}: peak RSS {rows[0]['peak_rss_mb']:.0f} MiB at {rows[0]['rows']:,} rows, "
                  f"{rows[1]['peak_rss_mb']:.0f} MiB at {rows[1]['rows']:,}: ratio "
                  f"{rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
