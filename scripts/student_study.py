"""Which student start and which recipe keep the most of the teacher: init × recipe × views, and
a size curve, on the emoji demo and on Fashion-MNIST.

    make demo                                                    # the emoji stores
    python scripts/build_fashion_shards.py --out data/fashion-raw --n 2000
    for s in prepare "teach effnet" "teach minilm" align; do distill $s -p benchmarks/fashion.yaml; done
    python scripts/student_study.py --seeds 0 1 --jobs 2 --out docs/student_study

Every run is ``distill train`` then ``distill evaluate`` side by side on one torch thread
(``scripts/ablation.py --jobs``), with a ``timm_hf`` student shaped after the cross-modal
teacher ``aligned`` (EfficientNet-Lite0 + MiniLM + linear heads): ``--size``'s image blocks,
image size and MiniLM layers.

- **init**: ``inherited`` (``train.init.from_teacher``: the teacher's blocks, heads and scale),
  or ``random`` (``train.init.weights: random``: the same architecture, untrained);
- **recipe**: ``none`` (the student alone, its contrastive loss), ``baseline``, ``best``,
  ``mobileclip2`` (pure similarity distillation at a fixed teacher temperature);
- **views**: 1 (the plain image's embedding; the student's own crops and flips), or V (the
  vision teacher taught on V stored views of the train split, the teacher aligned again on them,
  ``train.views: sample``);
- **size curve**: ``--curve`` sizes, inherited, recipe ``--curve-recipe`` (and, with
  ``--curve-alone``, each size trained alone).

Each size's image-encode latency at batch 1 is timed against the teacher's, in one process, one
thread, alternating (the ratio of medians). Neighbour, ITM and single-stream stores are left
out except for the recipes that read them (``dsmd``, ``mcad``, ``hard_batches``); evaluation does not time the models (``evaluate.teacher``
null), the latency table does. Raw numbers: ``<out>.json``; tables: ``<out>.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import _mean_std, run_side_by_side  # noqa: E402
from views_ablation import align_on_views, teach_vision  # noqa: E402

DATASETS = {"emoji": "params.yaml", "fashion": "benchmarks/fashion.yaml"}
# Student sizes: EfficientNet-Lite0 blocks kept (None: all 16), image px, MiniLM layers kept.
SIZES = {
    "XS": {"image_layers": [0, 1, 3, 5, 8], "image_size": 64, "text_layers": [5]},
    "S": {"image_layers": [0, 1, 3, 5, 8, 11, 15], "image_size": 64, "text_layers": [5]},
    "M80": {"image_layers": [0, 1, 3, 5, 8, 11, 15], "image_size": 80, "text_layers": [0, 5]},
    "M": {"image_layers": [0, 1, 3, 5, 8, 11, 15], "image_size": 96, "text_layers": [0, 5]},
    "L": {"image_layers": None, "image_size": 112, "text_layers": [0, 2, 4, 5]},
}
COMMON = ["evaluate.teacher=null", "evaluate.measure_memory=false", "evaluate.alone_dir=null",
          "train.student=timm_hf"]
# Recipes that read the neighbour, ITM or single-stream stores keep them; the others run without.
ROLE_STORE_RECIPES = {"dsmd", "mcad", "hard_batches"}
NO_ROLE_STORES = ["train.neighbors=null", "train.itm_scores=null", "train.single_stream_teacher=null"]


def common_sets(recipe: str) -> list[str]:
    """The overrides every run of ``recipe`` shares."""
    return COMMON + ([] if recipe in ROLE_STORE_RECIPES else NO_ROLE_STORES)


def student_sets(size: str, init: str, heads: str) -> list[str]:
    """The overrides building a ``size`` student from the aligned teacher of ``heads``."""
    s = SIZES[size]
    init_map = {"from_teacher": "aligned", "teacher": {"teacher": "aligned", "kwargs": {"heads": heads}},
                "image_layers": s["image_layers"], "text_layers": s["text_layers"],
                "weights": "teacher" if init == "inherited" else "random"}
    return [f"train.init={json.dumps(init_map)}",
            f"train.student_kwargs={json.dumps({'image_size': s['image_size'], 'context_length': 24})}"]


def views_sets(base: dict, views_root: Path) -> list[str]:
    """The overrides of the V-view arm: the stores aligned on the views, replayed in training."""
    aligned = base["align"]["name"]
    return ["train.views=sample", f"train.caches=[{views_root}/{aligned}/train.zarr]",
            f"train.vision_teacher={views_root}/{base['vision_from']}/train.zarr",
            f"evaluate.teacher_cache={views_root}/{aligned}/test.zarr"]


def latency_ratios(base: dict, sizes: list[str], repeats: int = 40) -> dict[str, dict]:
    """Image-encode latency at batch 1 of each size ÷ the teacher's (one thread, alternating)."""
    import torch

    from pipeline.students.inherit import inherit
    from pipeline.teachers import create_teacher

    torch.set_num_threads(1)
    heads = f"{base['align']['heads_dir']}/{base['align']['name']}"
    teacher = create_teacher("aligned", heads=heads)
    models = {"teacher": (teacher.encode_images, teacher.vision.net.input_image_size)}
    for size in sizes:
        s = SIZES[size]
        student = inherit(teacher, "aligned", s["image_layers"], s["text_layers"],
                          {"image_size": s["image_size"], "context_length": 24}).eval()
        models[size] = (student.encode_image, s["image_size"])
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for rep in range(repeats + 5):
            for name, (fn, px) in models.items():
                x = torch.randn(1, 3, px, px)
                t0 = time.perf_counter()
                fn(x)
                if rep >= 5:  # warm-up
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {k: {"ms": round(v, 3), "ratio": round(v / med["teacher"], 3)} for k, v in med.items()}


def alone_runs(results: list[dict], dataset: str, size: str, args: argparse.Namespace) -> list[dict]:
    """The same-size student trained alone (recipe ``none``, inherited, V = 1): the grid's for
    the grid's size, the ``alone`` arm's for a curve size."""
    return [r for r in results if r["dataset"] == dataset and r["size"] == size and r["recipe"] == "none"
            and r["init"] == "inherited" and r["views"] == 1 and r["arm"] in ("grid", "alone")]


def table(results: list[dict], latency: dict[str, dict], args: argparse.Namespace) -> str:
    """Student % of teacher RSUM per (dataset, init, views) and recipe; the size curve (the
    grid's size is read from the grid's inherited, V = 1 runs of the curve's recipe)."""
    lines = []
    main = [r for r in results if r["arm"] == "grid"]
    for dataset in dict.fromkeys(r["dataset"] for r in main):
        lines += [f"### {dataset}", "",
                  "| init | views | recipe | RSUM | % of teacher | vs alone (same init) |",
                  "|---|---:|---|---:|---:|---:|"]
        rows = [r for r in main if r["dataset"] == dataset]
        for init in dict.fromkeys(r["init"] for r in rows):
            for views in dict.fromkeys(r["views"] for r in rows):
                cell = [r for r in rows if r["init"] == init and r["views"] == views]
                alone = [r["metrics"]["student"]["rsum"] for r in cell if r["recipe"] == "none"]
                for recipe in dict.fromkeys(r["recipe"] for r in cell):
                    runs = [r for r in cell if r["recipe"] == recipe]
                    rsum = [r["metrics"]["student"]["rsum"] for r in runs]
                    pct = [r["metrics"]["pct_of_teacher"]["rsum"] for r in runs]
                    vs = (f"{100 * statistics.mean(rsum) / statistics.mean(alone):.0f} %"
                          if alone and recipe != "none" else "–")
                    lines.append(f"| {init} | {views} | `{recipe}` | {_mean_std(rsum)} | {_mean_std(pct)} | {vs} |")
        teacher = rows[0]["metrics"]["teacher"]["rsum"]
        lines += ["", f"Teacher (`aligned`) RSUM: {teacher:.1f}.", ""]
    curve = [r for r in results if r["arm"] == "curve"] + [
        r for r in main if r["init"] == "inherited" and r["views"] == 1 and r["recipe"] == args.curve_recipe]
    if args.curve:
        lines += ["### Size curve", "", "| dataset | size | image blocks | px | text layers | image encode ÷ teacher | RSUM | % of teacher | alone: % of teacher |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|"]
        for dataset in dict.fromkeys(r["dataset"] for r in curve):
            for size in args.curve:
                runs = [r for r in curve if r["dataset"] == dataset and r["size"] == size]
                if not runs:
                    continue
                s = SIZES[size]
                alone = [r["metrics"]["pct_of_teacher"]["rsum"] for r in alone_runs(results, dataset, size, args)]
                blocks = len(s["image_layers"]) if s["image_layers"] else 16
                lines.append(f"| {dataset} | {size} | {blocks} of 16 | {s['image_size']} | {s['text_layers']} | "
                             f"{latency.get(size, {}).get('ratio', float('nan')):.2f} | "
                             f"{_mean_std([r['metrics']['student']['rsum'] for r in runs])} | "
                             f"{_mean_std([r['metrics']['pct_of_teacher']['rsum'] for r in runs])} | "
                             f"{_mean_std(alone) if alone else '–'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--inits", nargs="+", default=["inherited", "random"])
    parser.add_argument("--recipes", nargs="+", default=["none", "baseline", "best", "mobileclip2"])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--size", default="M", choices=list(SIZES))
    parser.add_argument("--curve", nargs="*", default=["XS", "S", "M80", "M", "L"], choices=list(SIZES))
    parser.add_argument("--curve-recipe", default="best")
    parser.add_argument("--curve-alone", action="store_true",
                        help="also train each curve size alone (recipe none): the alone column")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("ablation/study"))
    parser.add_argument("--out", default="docs/student_study")
    args = parser.parse_args()
    demo = yaml.safe_load(Path("params.yaml").read_text())
    raw = Path(f"{args.out}.json")
    state = json.loads(raw.read_text()) if raw.exists() else {"runs": [], "latency": {}}
    done = {r["key"] for r in state["runs"]}
    grid = []
    for dataset in args.datasets:
        base = yaml.safe_load(Path(DATASETS[dataset]).read_text())
        base["recipes"] = demo["recipes"]  # one definition of each recipe: params.yaml's
        heads = f"{base['align']['heads_dir']}/{base['align']['name']}"
        root = (args.root / dataset).resolve()
        for views in args.views:
            extra, arm_heads = [], heads
            if views > 1:
                views_root = root / f"caches_v{views}"
                if not (views_root / base["align"]["name"]).exists():
                    teach_vision(base, views, views_root)
                    align_on_views(base, views_root)
                extra, arm_heads = views_sets(base, views_root), str(views_root / "heads" / base["align"]["name"])
            for init in args.inits:
                for recipe in args.recipes:
                    for seed in args.seeds:
                        key = f"{dataset}/grid/{init}/v{views}/{recipe}/s{seed}"
                        sets = [*common_sets(recipe), f"train.epochs={args.epochs:g}",
                                *student_sets(args.size, init, arm_heads), *extra]
                        grid.append((key, dict(dataset=dataset, arm="grid", init=init, views=views, recipe=recipe,
                                               seed=seed, size=args.size), base, sets, root / "runs" / key.rsplit("/", 2)[0]))
        for size in args.curve:
            if size == args.size and "inherited" in args.inits and 1 in args.views \
                    and args.curve_recipe in args.recipes:
                continue  # the grid's own runs (inherited, V = 1, the curve's recipe)
            arms = [("curve", args.curve_recipe)] + ([("alone", "none")] if args.curve_alone else [])
            for (arm, recipe), seed in itertools.product(arms, args.seeds):
                key = f"{dataset}/{arm}/{size}/{recipe}/s{seed}"
                sets = [*common_sets(recipe), f"train.epochs={args.epochs:g}",
                        *student_sets(size, "inherited", heads)]
                grid.append((key, dict(dataset=dataset, arm=arm, init="inherited", views=1,
                                       recipe=recipe, seed=seed, size=size),
                             base, sets, root / "runs" / key.rsplit("/", 2)[0]))
    if args.curve and any(size not in state["latency"] for size in args.curve):
        # every size timed so far and the new ones, again in one process (ratios of one run)
        sizes = [s for s in SIZES if s in args.curve or s in state["latency"]]
        state["latency"] = latency_ratios(demo, sizes)
        print(json.dumps(state["latency"]), flush=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(state, indent=2) + "\n")
    todo = [g for g in grid if g[0] not in done]

    def one(item: tuple) -> dict:
        key, meta, base, sets, where = item
        run = run_side_by_side(meta["recipe"], meta["seed"], sets, base, where)
        return {**run, **meta, "key": key, "sets": sets}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for run in pool.map(one, todo):
            state["runs"].append(run)
            raw.write_text(json.dumps(state, indent=2) + "\n")  # a cut-short study keeps what it did
    Path(f"{args.out}.md").write_text(table(state["runs"], state["latency"], args))
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
