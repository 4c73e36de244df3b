"""Ablation of the distillation recipes with ``dvc exp run``: one experiment per (recipe, seed).

    python scripts/ablation.py --recipes none baseline clip_kd dsmd sard mcad epmvg hard_batches \
        --seeds 0 1 --out docs/ablation

Each experiment is ``dvc exp run -S train.recipe=<r> -S train.seed=<s>`` on the demo pipeline
(same student, same steps; teacher stages are cached, so only train and evaluate run). The
metrics of each run are read from ``evaluate.metrics_path`` right after it finishes and the
table (mean ± std over seeds) is written to ``<out>.md`` with the raw numbers in ``<out>.json``.
The workspace's params.yaml and dvc.lock are restored at the end (`dvc exp show` keeps every run).

With ``--jobs N`` (N > 1) the runs go side by side instead: each is ``distill train`` then
``distill evaluate`` with the workspace's params.yaml, the recipe and seed set, one torch thread,
and its outputs under ``<root>/<recipe>-s<seed>/`` (what ``dvc exp run`` computes, as
``scripts/ground_ablation.py`` does; a step is a handful of small ops, so on a CPU several
one-thread processes finish sooner than one run after the other). The teacher stages must have
run first (``dvc repro neighbors itm``, or ``make demo``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

COLUMNS = [("i2t R@1", "i2t_R@1"), ("i2t R@5", "i2t_R@5"), ("i2t R@10", "i2t_R@10"),
           ("t2i R@1", "t2i_R@1"), ("t2i R@5", "t2i_R@5"), ("t2i R@10", "t2i_R@10"),
           ("i2i NDCG@10", "i2i_ndcg@10"), ("t2t NDCG@10", "t2t_ndcg@10")]


def run_one(recipe: str, seed: int, extra: list[str]) -> dict:
    """Run one experiment; return its evaluation metrics and wall time."""
    name = f"{recipe}-s{seed}"
    cmd = ["dvc", "exp", "run", "-n", name, "-S", f"train.recipe={recipe}",
           "-S", f"train.seed={seed}", *[a for s in extra for a in ("-S", s)]]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    params = yaml.safe_load(Path("params.yaml").read_text())
    metrics = json.loads(Path(params["evaluate"]["metrics_path"]).read_text())
    summary = json.loads((Path(params["train"]["out_dir"]) / "train_summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "name": name, "metrics": metrics,
            "train_seconds": summary["seconds"], "steps": summary["steps"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def run_side_by_side(recipe: str, seed: int, extra: list[str], base: dict, root: Path) -> dict:
    """Train and evaluate one (recipe, seed) under ``root`` on one torch thread; return as
    :func:`run_one` does."""
    name = f"{recipe}-s{seed}"
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    params = json.loads(json.dumps(base))
    for item in extra:  # "section.key=value", as dvc exp run -S takes it
        dotted, value = item.split("=", 1)
        *path, key = dotted.split(".")
        node = params
        for part in path:
            node = node[part]
        node[key] = yaml.safe_load(value)
    params["train"].update(recipe=recipe, seed=seed, out_dir=str(run / "model"), threads=1)
    params["evaluate"].update(student_dir=str(run / "model"), metrics_path=str(run / "metrics.json"),
                              plots_dir=str(run / "plots"), report_path=str(run / "report.md"),
                              html_path=str(run / "index.html"), threads=1)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # DataLoader workers and BLAS too
    t0 = time.perf_counter()
    with (run / "log.txt").open("w") as log:
        for stage in ("train", "evaluate"):
            cmd = ["distill", stage, "-p", str(run / "params.yaml")]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "name": name, "epochs": params["train"]["epochs"],
            "metrics": json.loads((run / "metrics.json").read_text()),
            "train_seconds": summary["seconds"], "steps": summary["steps"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: list[dict], descriptions: dict[str, str]) -> str:
    """Markdown table: one row per recipe plus the teacher; NDCG and RSUM-% scaled to 100."""
    head = ["recipe", "seeds", *[c for c, _ in COLUMNS], "RSUM", "RSUM % of teacher", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    found = set(r["recipe"] for r in results)  # params.yaml's order, whatever order the runs ended in
    recipes = [r for r in descriptions if r in found] + sorted(found - set(descriptions))
    for recipe in recipes:
        runs = [r for r in results if r["recipe"] == recipe]
        cells = [f"`{recipe}`", str(len(runs))]
        for _, key in COLUMNS:
            scale = 100.0 if "ndcg" in key else 1.0
            cells.append(_mean_std([scale * r["metrics"]["student"][key] for r in runs]))
        cells.append(_mean_std([r["metrics"]["student"]["rsum"] for r in runs]))
        cells.append(_mean_std([r["metrics"]["pct_of_teacher"]["rsum"] for r in runs]))
        cells.append(f"{statistics.mean(r['train_seconds'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    teacher = results[0]["metrics"]["teacher"]
    cells = ["teacher (cache)", "–"] + [f"{(100.0 if 'ndcg' in k else 1.0) * teacher[k]:.1f}"
                                   for _, k in COLUMNS] + [f"{teacher['rsum']:.1f}", "100", "–"]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{r}`: {descriptions.get(r, '')}" for r in recipes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="extra -S overrides for every run")
    parser.add_argument("--out", default="docs/ablation")
    parser.add_argument("--append", action="store_true",
                        help="add to the runs already in <out>.json instead of starting afresh")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; above 1, runs go side by side under --root (no dvc exp)")
    parser.add_argument("--root", type=Path, default=Path("ablation"),
                        help="with --jobs > 1: folder of the runs' outputs")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    descriptions = {k: v.get("description", "") for k, v in (params.get("recipes") or {}).items()}
    unknown = sorted(set(args.recipes) - set(descriptions))
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {sorted(descriptions)}")
    raw = Path(f"{args.out}.json")
    results = json.loads(raw.read_text()) if args.append and raw.exists() else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        grid = [(r, s) for s in args.seeds for r in args.recipes]
        with ThreadPoolExecutor(args.jobs) as pool:
            for run in pool.map(lambda rs: run_side_by_side(*rs, args.set, params, args.root), grid):
                results.append(run)
                raw.write_text(json.dumps(results, indent=2) + "\n")  # a cut-short run keeps what it did
        Path(f"{args.out}.md").write_text(table(results, descriptions))
        print(Path(f"{args.out}.md").read_text())
        return 0
    try:
        for seed in args.seeds:  # seed-major: a cut-short run still covers every recipe once
            for recipe in args.recipes:
                results.append(run_one(recipe, seed, args.set))
                raw.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock"], check=False)
        subprocess.run(["dvc", "checkout", "--quiet"], check=False)
    if results:
        Path(f"{args.out}.md").write_text(table(results, descriptions))
        print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
