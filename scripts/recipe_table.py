"""Recipes on two datasets at two schedule lengths: does any recipe fall far below training alone?

    python scripts/build_fashion_shards.py --out data/fashion-raw --n 2000
    for s in prepare "teach effnet" "teach minilm" "teach blip" align neighbors itm; do
        distill $s -p benchmarks/fashion.yaml; done
    make demo                                                  # the emoji stores
    python scripts/recipe_table.py --epochs 10 30 --jobs 2 --out docs/recipe_table

Every recipe of params.yaml is trained and evaluated (seed 0) on the emoji demo (params.yaml)
and on Fashion-MNIST (benchmarks/fashion.yaml), for each number of epochs, side by side on one
torch thread each (``scripts/ablation.py --jobs``), outputs under ``ablation/table/``. Runs that
``--reuse`` names (an ablation JSON of the same settings, e.g. docs/ablation.json for the emoji
demo at 30 epochs) are taken from there instead. The table gives each run's RSUM and its share
of the student trained alone (recipe ``none``) on the same dataset and schedule, and marks those
below ``--floor`` (default 85 %). Raw numbers: ``<out>.json``; the table: ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import run_side_by_side  # noqa: E402

DATASETS = {"emoji": "params.yaml", "fashion": "benchmarks/fashion.yaml"}


def _reused(paths: list[str], epochs: float) -> dict[tuple[str, str, float], dict]:
    """(dataset, recipe, epochs) -> run, from ablation JSONs of the emoji demo (seed 0)."""
    out = {}
    for path in paths:
        for run in json.loads(Path(path).read_text()):
            if run["seed"] == 0 and run.get("epochs", 30) == epochs:
                out[("emoji", run["recipe"], epochs)] = run
    return out


def table(results: list[dict], recipes: list[str], floor: float) -> str:
    """One row per recipe, one RSUM column (with % of `none`) per dataset and schedule."""
    cols = list(dict.fromkeys((r["dataset"], r["epochs"]) for r in results))
    found = {(r["dataset"], r["epochs"], r["recipe"]): r["metrics"]["student"]["rsum"] for r in results}
    head = ["recipe", *[f"{d} {e:g} ep" for d, e in cols]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for recipe in recipes:
        cells = [f"`{recipe}`"]
        for d, e in cols:
            rsum, alone = found.get((d, e, recipe)), found.get((d, e, "none"))
            if rsum is None:
                cells.append("–")
                continue
            pct = 100 * rsum / alone if alone else float("nan")
            mark = " **↓**" if pct < floor else ""
            cells.append(f"{rsum:.1f} ({pct:.0f} %){mark}")
        lines.append("| " + " | ".join(cells) + " |")
    teacher = {(r["dataset"], r["epochs"]): r["metrics"]["teacher"]["rsum"] for r in results}
    lines.append("| teacher (`aligned`) | " + " | ".join(f"{teacher[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", nargs="+", type=float, default=[10, 30])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--recipes", nargs="*", help="default: every recipe of params.yaml")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", nargs="*", default=[], help="ablation JSONs of the emoji demo to take runs from")
    parser.add_argument("--floor", type=float, default=85.0, help="% of `none` below which a run is marked")
    parser.add_argument("--set", nargs="*", default=["evaluate.teacher=null", "evaluate.measure_memory=false"],
                        help="extra overrides for every run (default: quality only, no teacher timing "
                             "or memory probes)")
    parser.add_argument("--root", type=Path, default=Path("ablation/table"))
    parser.add_argument("--out", default="docs/recipe_table")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    recipes = args.recipes or list(params["recipes"])
    raw = Path(f"{args.out}.json")
    results: list[dict] = json.loads(raw.read_text()) if raw.exists() else []
    done = {(r["dataset"], r["recipe"], r["epochs"]) for r in results}
    grid = []
    for epochs in args.epochs:
        reused = _reused(args.reuse, epochs)
        for dataset in args.datasets:
            for recipe in recipes:
                key = (dataset, recipe, epochs)
                if key in done:
                    continue
                if key in reused:
                    results.append({**reused[key], "dataset": dataset, "epochs": epochs, "reused": True})
                else:
                    grid.append(key)

    def one(key: tuple[str, str, float]) -> dict:
        dataset, recipe, epochs = key
        base = yaml.safe_load(Path(DATASETS[dataset]).read_text())
        base["recipes"] = params["recipes"]  # one definition of each recipe: params.yaml's
        run = run_side_by_side(recipe, 0, [f"train.epochs={epochs:g}", *args.set], base,
                               args.root / dataset / f"{epochs:g}ep")
        return {**run, "dataset": dataset, "epochs": epochs}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for run in pool.map(one, grid):
            results.append(run)
            raw.write_text(json.dumps(results, indent=2) + "\n")  # a cut-short run keeps what it did
    raw.write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(table(results, recipes, args.floor))
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
