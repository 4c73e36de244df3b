"""Ablation of grounding distillation: one run per (recipe, seed), several at a time.

    python scripts/ground_ablation.py --recipes none epmvg --seeds 0 1 --jobs 4 --out docs/ground_ablation

Each run is ``distill ground train`` then ``distill ground evaluate`` with the workspace's
params.yaml and ``grounding.train.recipe``/``seed`` set, writing under ``ablation/<recipe>-s<seed>/``
(model, metrics, report) — what ``dvc exp run -S grounding.train.recipe=<r> -S
grounding.train.seed=<s> ground_evaluate`` computes, but runs go side by side (a run is a
handful of small ops per step, so on a shared CPU several processes finish sooner than one
after the other). The teacher cache must be built first (``dvc repro ground_teach``). Acc@0.5
and mean IoU, overall and by expression type, go to ``<out>.md`` (mean ± std over seeds) and the
raw numbers to ``<out>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml


def run_one(recipe: str, seed: int, base: dict, root: Path) -> dict:
    """Train and evaluate one (recipe, seed); return its metrics, summary and wall time."""
    run = root / f"{recipe}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    params = json.loads(json.dumps(base))
    grounding = params["grounding"]
    grounding["train"].update(recipe=recipe, seed=seed, out_dir=str(run / "model"))
    grounding["evaluate"].update(student_dir=str(run / "model"), metrics_path=str(run / "metrics.json"),
                                 figures_dir=str(run / "figures"), report_path=str(run / "report.md"))
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one core each: runs share the machine evenly
    t0 = time.perf_counter()
    with (run / "log.txt").open("w") as log:
        for stage in ("train", "evaluate"):
            cmd = ["distill", "ground", stage, "-p", str(run / "params.yaml")]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "metrics": json.loads((run / "metrics.json").read_text()),
            "train_seconds": summary["seconds"], "steps": summary["steps"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def _cell(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: list[dict]) -> str:
    """Markdown: Acc@0.5 overall and by type, mean IoU (×100), training seconds; one row per recipe."""
    types = sorted(results[0]["metrics"]["by_type"])
    head = ["recipe", "seeds", "Acc@0.5", *[f"Acc@0.5 {t}" for t in types], "mean IoU", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == recipe]
        cells = [f"`{recipe}`", str(len(runs)), _cell([r["metrics"]["acc_at_0_5"] for r in runs]),
                 *[_cell([r["metrics"]["by_type"][t]["acc_at_0_5"] for r in runs]) for t in types],
                 _cell([r["metrics"]["mean_iou"] for r in runs]),
                 f"{statistics.mean(r['train_seconds'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["none", "epmvg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=4, help="runs at a time")
    parser.add_argument("--root", type=Path, default=Path("ablation"), help="folder of the runs' outputs")
    parser.add_argument("--out", type=Path, default=Path("docs/ground_ablation"))
    args = parser.parse_args()
    base = yaml.safe_load(Path("params.yaml").read_text())
    grid = [(r, s) for r in args.recipes for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda rs: run_one(*rs, base, args.root), grid))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
