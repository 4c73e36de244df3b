"""Smaller caches on the demo: bytes per sample and the student's RSUM by ``store_dtype``.

    python benchmarks/bench_store_dtype.py --dtypes float16 bfloat16 int8 --work /tmp/store_dtype

For each store dtype, the demo pipeline up to the student runs in its own folder under
``--work`` with ``params.yaml`` as it is except for the paths and the dtype: ``distill teach
effnet`` and ``distill teach minilm`` (``teach.store_dtype``), ``distill align``
(``align.store_dtype``), ``distill train`` (recipe ``best``, seed 0: it reads the aligned, the
vision-only and the text-only stores) and ``distill evaluate`` (the test split, no teacher
timing). Reported: bytes of the embedding arrays on disk (codes, and scales for int8) per sample
and ÷ the raw float32 bytes of the same values, the aligned teacher's own test recall (RSUM from
its test store) and the student's test RSUM. ``--dataset`` is a prepared demo dataset
(``distill prepare``; default ``data/emoji``). ``--float16-caches DIR``: the float16 run copies
the two source teachers' stores from ``DIR`` (a finished ``make demo``'s ``caches``) instead of
teaching them again (float16 is the stores' format as ``teach`` has always written them); so
does a run without the ``teach`` step (then only the aligned stores have the run's dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import REPO_ROOT, machine_info, write_results  # noqa: E402

DISTILL = [sys.executable, "-c", "from stages.cli import app; app()"]


def params_for(base: dict, root: Path, dataset: Path, dtype: str) -> dict:
    params = json.loads(json.dumps(base))
    caches = root / "caches"
    params["teach"].update(dataset=str(dataset), out_root=str(caches), store_dtype=dtype,
                           summary_dir=str(root / "reports/teach"))
    params["align"].update(cache_root=str(caches), heads_dir=str(root / "models/align"),
                           summary_dir=str(root / "reports/align"), store_dtype=dtype)
    name = params["align"]["name"]
    params["train"].update(dataset=str(dataset), caches=[str(caches / name / "train.zarr")],
                           vision_teacher=str(caches / params["align"]["vision"] / "train.zarr"),
                           text_teacher=str(caches / params["align"]["text"] / "train.zarr"),
                           single_stream_teacher=None, neighbors=None, itm_scores=None,
                           out_dir=str(root / "models/student"), recipe="best", seed=0)
    init_teacher = (params["train"].get("init") or {}).get("teacher") or {}
    if init_teacher.get("teacher") == "aligned":  # the student inherits this run's heads
        init_teacher.setdefault("kwargs", {})["heads"] = str(root / "models/align" / name)
    params["evaluate"].update(dataset=str(dataset / "test"), student_dir=str(root / "models/student"),
                              teacher_cache=str(caches / name / "test.zarr"), teacher=None, alone_dir=None,
                              metrics_path=str(root / "reports/eval/metrics.json"),
                              plots_dir=str(root / "reports/eval/plots"),
                              report_path=str(root / "reports/eval/report.md"),
                              html_path=str(root / "reports/eval/index.html"))
    return params


def run(args: list[str], params: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([*DISTILL, *args, "--params", str(params)], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def embedding_bytes(store: Path) -> tuple[int, int, int]:
    """(bytes of the embedding arrays on disk, float32 bytes of their values, samples)."""
    import zarr

    from pipeline.stores.base import store_nbytes

    group = zarr.open_group(str(store), mode="r")
    on_disk = sum(store_nbytes(store / a) for a in group.array_keys() if "_emb" in a)
    raw = sum(4 * int(group[a].size) for a in group.array_keys() if a.endswith("_emb"))
    return on_disk, raw, int(group.attrs["n_images"])


def code_bytes(store: Path) -> int:
    """Bytes of the embedding codes and scales before compression."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return sum(int(group[a].nbytes) for a in group.array_keys() if "_emb" in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "int8"])
    p.add_argument("--dataset", type=Path, default=REPO_ROOT / "data/emoji")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_store_dtype"))
    p.add_argument("--steps", nargs="+", default=["teach", "align", "train", "evaluate"])
    p.add_argument("--float16-caches", type=Path)
    p.add_argument("--epochs", type=float, help="train.epochs (default: params.yaml's)")
    args = p.parse_args()
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    from pipeline.metrics import retrieval_metrics
    from pipeline.stores.teacher import TeacherCache

    results, loads = {}, []
    for dtype in args.dtypes:
        root = args.work / dtype
        root.mkdir(parents=True, exist_ok=True)
        params = params_for(base, root, args.dataset.resolve(), dtype)
        if args.epochs:
            params["train"]["epochs"] = args.epochs
        path = root / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        seconds = {}
        name, vision, text = params["align"]["name"], params["align"]["vision"], params["align"]["text"]
        if args.float16_caches and (dtype == "float16" or "teach" not in args.steps):
            import shutil

            for teacher in (vision, text):
                shutil.rmtree(root / "caches" / teacher, ignore_errors=True)
                shutil.copytree(args.float16_caches / teacher, root / "caches" / teacher)
        elif "teach" in args.steps:
            seconds["teach"] = run(["teach", vision], path) + run(["teach", text], path)
        if "align" in args.steps:
            seconds["align"] = run(["align"], path)
        if "train" in args.steps:
            seconds["train"] = run(["train"], path)
        if "evaluate" in args.steps:
            seconds["evaluate"] = run(["evaluate"], path)
        loads.append(os.getloadavg()[0])
        sizes = {}
        for teacher in (vision, text, name):
            on_disk = raw = samples = codes = 0
            for split in params["teach"]["splits"]:
                d, r, n = embedding_bytes(root / "caches" / teacher / f"{split}.zarr")
                on_disk, raw, samples = on_disk + d, raw + r, samples + n
                codes += code_bytes(root / "caches" / teacher / f"{split}.zarr")
            sizes[teacher] = {"bytes_per_sample": on_disk / samples, "ratio_to_float32": on_disk / raw,
                              "uncompressed_ratio_to_float32": codes / raw,
                              "store_dtype": TeacherCache.open(root / "caches" / teacher / "test.zarr",
                                                               lazy=True).store_dtype}
        test = TeacherCache.open(root / "caches" / name / "test.zarr")
        teacher_rsum = retrieval_metrics(test.image_emb, test.text_emb, test.text_to_image)["rsum"]
        metrics_file = Path(params["evaluate"]["metrics_path"])
        student = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        results[dtype] = {"sizes": sizes, "teacher_rsum": teacher_rsum,
                          "student_rsum": student.get("student", {}).get("rsum", student.get("rsum")),
                          "seconds": seconds}
        print(json.dumps({dtype: results[dtype]}), file=sys.stderr, flush=True)
    out = write_results("bench_store_dtype", {"machine": machine_info("cpu") | {"load_average_after": loads},
                                              "args": {k: str(v) for k, v in vars(args).items()},
                                              "results": results})
    teachers = list(next(iter(results.values()))["sizes"])
    print("| store dtype | " + " | ".join(f"{t}: bytes/sample (÷ float32)" for t in teachers)
          + " | teacher RSUM | student RSUM |")
    print("|---|" + "---:|" * (len(teachers) + 2))
    for dtype, r in results.items():
        cells = [f"{r['sizes'][t]['bytes_per_sample']:.0f} ({r['sizes'][t]['ratio_to_float32']:.3f})" for t in teachers]
        student = "—" if r["student_rsum"] is None else f"{r['student_rsum']:.1f}"
        print(f"| {dtype} | " + " | ".join(cells) + f" | {r['teacher_rsum']:.1f} | {student} |")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
