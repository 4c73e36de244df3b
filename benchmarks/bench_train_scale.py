"""Training from stores far larger than memory: peak RSS against N, and the step time of reading
targets from disk against a contrastive-only step.

    python benchmarks/bench_train_scale.py --rows 1000000 10000000      # both figures
    python benchmarks/bench_train_scale.py probe --store S --rows N      # one measured run

Each size gets a synthetic teacher store (``pipeline.synthetic``: random unit vectors, D = 512,
image and text, written with the project's own writer under ``--work``), then a fresh Python
process per measurement (``probe``) opens it as training does (``open_targets``: lazy readers,
every chunk verified once at open) and runs ``--steps`` optimizer steps of the tiny student with
the ``baseline`` losses (contrastive + feature + similarity KL), batches drawn as the training
stream draws them (a shuffle buffer of 1,000 consecutive rows of one tar shard at a time, shards
in random order), the next batch's rows prefetched during each step. It prints one JSON line:
peak RSS (``VmHWM``), median step seconds, open seconds, and whether the targets read
equal the values written. ``--mode contrastive`` runs the same steps with the contrastive loss
only and no teacher rows read (the step-time baseline).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import REPO_ROOT, machine_info, write_results  # noqa: E402


def stream_rows(n_rows: int, batch: int, steps: int, seed: int, samples_per_tar: int,
                buffer: int = 1000) -> list[np.ndarray]:
    """Image rows of ``steps`` batches as the training stream yields them: tar shards in random
    order, each read in order through a shuffle buffer of ``buffer`` rows."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for shard in rng.permutation(-(-n_rows // samples_per_tar)):
        start = int(shard) * samples_per_tar
        stop = min(start + samples_per_tar, n_rows)
        for lo in range(start, stop - buffer + 1, buffer):
            window = rng.permutation(np.arange(lo, lo + buffer))
            out += [window[i:i + batch] for i in range(0, buffer - batch + 1, batch)]
            if len(out) >= steps + 1:
                return out[:steps + 1]
    return out


def _peak_mb() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` of its own address space. (``ru_maxrss`` would
    carry over the RSS of the parent it was forked from, which Linux keeps across ``exec``.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(store: str, n_rows: int, steps: int, batch: int, mode: str, threads: int) -> dict:
    """One measured run in this process (see the module docstring)."""
    from pipeline.losses import build_objective
    from pipeline.students import create_student
    from pipeline.synthetic import SAMPLES_PER_TAR, synthetic_manifest, synthetic_rows
    from pipeline.training.batch import BatchPlan, assemble
    from pipeline.training.targets import open_targets

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    manifest = synthetic_manifest(n_rows)
    t0 = time.perf_counter()
    targets = open_targets([store], manifest)
    open_s = time.perf_counter() - t0
    rss_open = _peak_mb()
    student = create_student("open_clip_tiny")
    losses = [{"name": "contrastive"}] if mode == "contrastive" else \
        [{"name": "contrastive"}, {"name": "feature", "kwargs": {"metric": "cosine"}}, {"name": "similarity_kl"}]
    objective = build_objective(losses, student.embed_dim, targets.dims)
    if mode == "contrastive":  # no teacher rows read at all
        targets.image_emb = targets.text_emb = None
    plan = BatchPlan(targets)
    params = [p for m in (student, objective) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = stream_rows(n_rows, batch, steps, 0, SAMPLES_PER_TAR)
    times, ok, loss = [], True, float("nan")
    for step, rows in enumerate(batches[:steps]):
        t = time.perf_counter()
        if step + 1 < len(batches):
            targets.prefetch(batches[step + 1], batches[step + 1])
        item = {"pixels": torch.randn(len(rows), 3, 64, 64), "captions": [f"a photo {r}" for r in rows],
                "image_rows": torch.from_numpy(rows), "text_rows": torch.from_numpy(rows)}
        distill = assemble(plan, student, item, torch.device("cpu"), amp=False)
        if mode != "contrastive" and step == 0:  # the rows read are the rows written
            ok = bool(np.array_equal(distill.teacher_image_emb.numpy(),
                                     synthetic_rows(rows, 512, "image").astype(np.float32))
                      and np.array_equal(distill.teacher_text_emb.numpy(),
                                         synthetic_rows(rows, 512, "text").astype(np.float32)))
        total, _ = objective(distill)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        loss = total.item()
        times.append(time.perf_counter() - t)
        if step == 0:
            rss_step1 = _peak_mb()
    return {"rows": n_rows, "mode": mode, "steps": steps, "batch": batch,
            "peak_rss_mb": _peak_mb(), "peak_rss_mb_after_open": rss_open,
            "peak_rss_mb_after_step1": rss_step1,
            "step_s": statistics.median(times[1:] or times), "open_s": open_s,
            "targets_equal_written": ok, "loss": loss}


def run_probe(store: Path, n_rows: int, steps: int, batch: int, mode: str, threads: int) -> dict:
    """``probe`` in a fresh Python process (its peak RSS is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", "--store", str(store),
           "--rows", str(n_rows), "--steps", str(steps), "--batch", str(batch), "--mode", mode,
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="bench", choices=["bench", "probe"])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--store")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlm-distill-scale"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mode", default="targets", choices=["targets", "contrastive"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.command == "probe":
        print(json.dumps(probe(args.store, args.rows[0], args.steps, args.batch, args.mode, args.threads)))
        return
    from pipeline.synthetic import write_synthetic_store

    runs = []
    for n in args.rows:
        store = args.work / f"store-{n}.zarr"
        if not (store / "zarr.json").exists():
            t0 = time.perf_counter()
            write_synthetic_store(store, n)
            print(f"wrote {store} in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in ("targets", "contrastive"):
            runs.append(run_probe(store, n, args.steps, args.batch, mode, args.threads))
            print(json.dumps(runs[-1]), flush=True)
    by = {(r["rows"], r["mode"]): r for r in runs}
    small, large = min(args.rows), max(args.rows)
    summary = {
        "rss_ratio_large_over_small": by[(large, "targets")]["peak_rss_mb"] / by[(small, "targets")]["peak_rss_mb"],
        "step_ratio_targets_over_contrastive": {
            n: by[(n, "targets")]["step_s"] / by[(n, "contrastive")]["step_s"] for n in args.rows},
    }
    print(json.dumps(summary, indent=2))
    write_results("train_scale", {"machine": machine_info("cpu"), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
