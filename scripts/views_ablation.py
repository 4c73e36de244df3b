"""Ablation of augmented teacher views and of a teacher ensemble on the demo.

    python scripts/views_ablation.py --views 8 --recipe best --seeds 0 1 --jobs 2 --out docs/views_ablation

Three arms, each trained and evaluated with ``recipe`` on every seed (as ``scripts/ablation.py
--jobs`` runs them: ``distill train`` + ``distill evaluate`` side by side, one torch thread each):

- ``V=1``: the demo's stores (one teacher embedding per image), ``train.views: plain`` (the
  student's own random resized crop + flip, target = the plain image's embedding);
- ``V=<views>``: the vision-only teacher (``vision_from``) taught again on the train split with
  ``teach.views``, the cross-modal teacher aligned again on it (``distill align``: each view through
  the heads), ``train.views: sample`` (the student replays each sample's stored view, the target
  is that view's embedding). The views' crops are drawn with the student's own scale, ratio and
  flip, so both arms see the same augmentation, except that view 0 is the plain image;
- ``ensemble``: ``train.caches`` = the demo's cross-modal teacher and ``demo_clip``, V = 1.

Neighbour, ITM and single-stream stores are left out of every arm (the recipe reads none), and
``evaluate.teacher`` is null (no end-to-end teacher timing). Besides quality, the table gives
the store bytes per image and the teach time of the vision teacher's train split at V = 1 and V =
``views`` (both taught here, one after the other), and each arm's seconds per training step.
The teacher stages must have run first (``dvc repro``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import COLUMNS, _mean_std, run_side_by_side  # noqa: E402

COMMON = ["train.neighbors=null", "train.itm_scores=null", "train.single_stream_teacher=null",
          "evaluate.teacher=null"]


def distill(stage: str, name: str | None, params: dict, where: Path) -> None:
    """Run ``distill <stage> [name] -p <where>/params-<stage>.yaml``."""
    path = where / f"params-{stage}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = ["distill", stage, *([name] if name else []), "-p", str(path)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def teach_vision(base: dict, views: int, root: Path) -> dict:
    """The vision teacher's train split at ``views`` views under ``root``; its cost."""
    vision = base["vision_from"]
    params = json.loads(json.dumps(base))
    student_aug = {"view_scale": [0.6, 1.0], "view_ratio": [3 / 4, 4 / 3], "view_flip": True}
    params["teach"].update(splits=["train"], out_root=str(root), summary_dir=str(root / "reports"),
                           views=views, view_splits=["train"], **student_aug)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    distill("teach", vision, params, root)
    seconds = time.perf_counter() - t0
    summary = json.loads((root / "reports" / f"{vision}.json").read_text())
    store = root / vision / "train.zarr"
    nbytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    n_images = summary["images"]["train"]
    return {"views": views, "teach_seconds": round(summary["seconds"], 1),
            "wall_seconds": round(seconds, 1), "images": n_images,
            "store_bytes": nbytes, "bytes_per_image": round(nbytes / n_images, 1)}


def align_on_views(base: dict, root: Path) -> None:
    """Align the cross-modal teacher on ``root``'s vision store (other splits: the demo's)."""
    caches = Path(base["teach"]["out_root"]).resolve()
    vision, text = base["align"]["vision"], base["align"]["text"]
    for split in ("val", "test"):  # V = 1 outside the train split: the demo's own stores
        link = root / vision / f"{split}.zarr"
        if not link.exists():
            link.symlink_to(caches / vision / f"{split}.zarr")
    if not (root / text).exists():
        (root / text).symlink_to(caches / text)
    params = json.loads(json.dumps(base))
    params["align"].update(cache_root=str(root), heads_dir=str(root / "heads"),
                           summary_dir=str(root / "reports"))
    distill("align", None, params, root)


def arm_sets(arm: str, base: dict, root: Path) -> list[str]:
    """The ``--set`` overrides of one arm."""
    aligned = base["align"]["name"]
    if arm == "V=1":
        return COMMON
    if arm == "ensemble":
        caches = base["teach"]["out_root"]
        return COMMON + [f"train.caches=[{caches}/{aligned}/train.zarr,{caches}/demo_clip/train.zarr]"]
    return COMMON + ["train.views=sample", f"train.caches=[{root}/{aligned}/train.zarr]",
                     f"train.vision_teacher={root}/{base['vision_from']}/train.zarr",
                     f"evaluate.teacher_cache={root}/{aligned}/test.zarr"]


def table(results: list[dict], stores: dict[int, dict]) -> str:
    head = ["arm", "seeds", *[c for c, _ in COLUMNS], "RSUM", "RSUM % of teacher", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        cells = [arm, str(len(runs))]
        for _, key in COLUMNS:
            scale = 100.0 if "ndcg" in key else 1.0
            cells.append(_mean_std([scale * r["metrics"]["student"][key] for r in runs]))
        cells.append(_mean_std([r["metrics"]["student"]["rsum"] for r in runs]))
        cells.append(_mean_std([r["metrics"]["pct_of_teacher"]["rsum"] for r in runs]))
        cells.append(f"{statistics.mean(r['seconds_per_step'] for r in runs):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| vision teacher store, train split | bytes per image | store bytes | teach s |",
              "|---|---:|---:|---:|"]
    for views, s in sorted(stores.items()):
        lines.append(f"| V = {views} | {s['bytes_per_image']:.0f} | {s['store_bytes']} | {s['teach_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["V=1", "V=views", "ensemble"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("ablation/views"))
    parser.add_argument("--out", default="docs/views_ablation")
    parser.add_argument("--epochs", type=float, default=30.0,
                        help="train.epochs of every run (the published table: 30; the quick demo's params.yaml: 15)")
    args = parser.parse_args()
    base = yaml.safe_load(Path("params.yaml").read_text())
    base["train"]["epochs"] = args.epochs
    root = args.root.resolve()
    stores = {}
    for views in (1, args.views):
        where = root / f"caches_v{views}"
        shutil.rmtree(where, ignore_errors=True)
        stores[views] = teach_vision(base, views, where)
        print(json.dumps(stores[views]), flush=True)
    views_root = root / f"caches_v{args.views}"
    align_on_views(base, views_root)
    arms = [f"V={args.views}" if a == "V=views" else a for a in args.arms]
    grid = [(arm, seed) for seed in args.seeds for arm in arms]
    results: list[dict] = []

    def one(arm_seed: tuple[str, int]) -> dict:
        arm, seed = arm_seed
        run = run_side_by_side(args.recipe, seed, arm_sets(arm, base, views_root), base,
                               root / "runs" / arm.replace("=", ""))
        summary = json.loads((root / "runs" / arm.replace("=", "") / f"{args.recipe}-s{seed}" /
                              "model" / "train_summary.json").read_text())
        return run | {"arm": arm, "seconds_per_step": summary["seconds_per_step"]}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for run in pool.map(one, grid):
            results.append(run)
            Path(f"{args.out}.json").write_text(json.dumps({"stores": stores, "runs": results}, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(table(results, stores))
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
