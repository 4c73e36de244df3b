"""Cost of augmented views in stage 1: teach time and store bytes per image, for V views.

The real teach runner (in-process) on one split with the vision teacher of ``params.yaml``
(``vision_from``: EfficientNet-Lite0 in the demo) at ``teach.views`` = each of ``--views``, the
views drawn as ``params.yaml`` says (crop scale, ratio, flip); every pass writes a fresh store.
Reports, per V: teach seconds (median of ``--repeats``), seconds per image, the ratio to V = 1,
store bytes per image and their ratio to V = 1. The teacher is built once, in this process.

    python benchmarks/bench_views.py --split test --views 1 2 4 8 --repeats 2
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import machine_info, markdown_table, median, timed, write_results

from pipeline.config import load_params, load_section
from pipeline.data.manifest import load_manifest
from pipeline.stores.base import store_nbytes
from pipeline.teachers import create_teacher
from stages.teach.run import TeachConfig, run_teach


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--split", default="test")
    p.add_argument("--views", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    params = load_params(args.params)
    name = params["vision_from"]
    entry = params["teachers"][name]
    base = load_section(TeachConfig, "teach", params)
    teacher = create_teacher(entry["teacher"], **entry.get("kwargs", {}))
    n_images = load_manifest(Path(base.dataset) / args.split).n_images
    rows: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-views-") as tmp:
        for r in range(args.repeats):  # interleaved: drift on a shared machine hits every V
            for views in args.views:
                out = Path(tmp) / f"v{views}-{r}"
                cfg = replace(base, splits=(args.split,), out_root=str(out), views=views,
                              view_splits=(args.split,), summary_dir=str(out / "reports"))
                seconds = timed(lambda: run_teach(cfg, name, teacher, progress=False), "cpu")
                row = rows.setdefault(views, {"views": views, "seconds": []})
                row["seconds"].append(round(seconds, 2))
                row["store_bytes"] = store_nbytes(out / name / f"{args.split}.zarr")
                shutil.rmtree(out)
    first = rows[args.views[0]]
    for row in rows.values():
        row["median_s"] = median(row["seconds"])
        row["s_per_image"] = row["median_s"] / n_images
        row["time_ratio"] = row["median_s"] / median(first["seconds"])
        row["bytes_per_image"] = row["store_bytes"] / n_images
        row["bytes_ratio"] = row["store_bytes"] / first["store_bytes"]
    table = markdown_table(
        ["V", "teach s (median)", "ms / image", f"time ÷ V={args.views[0]}", "bytes / image",
         f"bytes ÷ V={args.views[0]}"],
        [[r["views"], f"{r['median_s']:.1f}", f"{1000 * r['s_per_image']:.1f}", f"{r['time_ratio']:.2f}",
          f"{r['bytes_per_image']:.0f}", f"{r['bytes_ratio']:.2f}"] for r in rows.values()])
    print(table)
    result = {"teacher": name, "split": args.split, "images": n_images, "rows": list(rows.values()),
              "machine": machine_info("cpu"), "table": table}
    write_results("bench_views", result)
    return result


if __name__ == "__main__":
    main()
