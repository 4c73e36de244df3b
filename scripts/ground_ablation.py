"""Ablation of grounding distillation with ``dvc exp run``: one experiment per (recipe, seed).

    python scripts/ground_ablation.py --recipes none epmvg --seeds 0 1 --out docs/ground_ablation

Each experiment is ``dvc exp run -S grounding.train.recipe=<r> -S grounding.train.seed=<s>``
with the target ``ground_evaluate`` (the teacher cache is up to date, so only ``ground_train``
and ``ground_evaluate`` run; the retrieval stages are not touched). Acc@0.5
and mean IoU, overall and by expression type, go to ``<out>.md`` (mean ± std over seeds) and the
raw numbers to ``<out>.json``. params.yaml and dvc.lock are restored at the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import yaml


def run_one(recipe: str, seed: int) -> dict:
    """Run one experiment; return its metrics, training summary and wall time."""
    cmd = ["dvc", "exp", "run", "-n", f"ground-{recipe}-s{seed}", "-S", f"grounding.train.recipe={recipe}",
           "-S", f"grounding.train.seed={seed}", "ground_evaluate"]  # only the grounding stages
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    grounding = yaml.safe_load(Path("params.yaml").read_text())["grounding"]
    metrics = json.loads(Path(grounding["evaluate"]["metrics_path"]).read_text())
    summary = json.loads((Path(grounding["train"]["out_dir"]) / "train_summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "metrics": metrics, "train_seconds": summary["seconds"],
            "steps": summary["steps"], "wall_seconds": round(time.perf_counter() - t0, 1)}


def _cell(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: list[dict]) -> str:
    """Markdown: Acc@0.5 overall and by type, mean IoU, training seconds; one row per recipe."""
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
    parser.add_argument("--out", type=Path, default=Path("docs/ground_ablation"))
    args = parser.parse_args()
    saved = {p: Path(p).read_text() for p in ("params.yaml", "dvc.lock")}
    results = []
    try:
        for recipe in args.recipes:
            for seed in args.seeds:
                results.append(run_one(recipe, seed))
                args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    finally:
        for path, text in saved.items():
            Path(path).write_text(text)
    args.out.with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
