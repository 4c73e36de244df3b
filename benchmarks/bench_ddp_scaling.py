"""Data-parallel training: samples/s of 2 processes against 1, same global batch and steps.

    python benchmarks/bench_ddp_scaling.py                    # CPU, gloo (the demo's stores)
    python benchmarks/bench_ddp_scaling.py --device cuda      # 1 GPU, and --nproc 2 on 2 GPUs

Trains the demo student (params.yaml ``train``, recipe ``--recipe``) for ``--steps`` steps with
``distill train --nproc N`` for N = 1 and 2, interleaved ``--repeats`` times, and reads
``seconds_per_step`` from each run's ``train_summary.json`` (the loop only: not start-up).
On CPU each process gets ``--threads`` torch threads (default 1, so 2 processes use the 2 cores
that a 1-process run with ``--threads 2`` would also get: that run is measured too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import REPO_ROOT, machine_info, write_results  # noqa: E402


def one_run(nproc: int, threads: int, args: argparse.Namespace, work: Path) -> float:
    """Seconds per step of one `distill train --nproc nproc` run."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    out = work / f"n{nproc}-t{threads}"
    params["train"].update(recipe=args.recipe, steps=args.steps, out_dir=str(out), threads=threads,
                           device=args.device, checkpoint_every=10 * args.steps, resume=False,
                           log_every=10)
    path = work / f"params-{nproc}-{threads}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-m", "stages.cli", "train", "--nproc", str(nproc), "-p", str(path),
                    "--no-progress"], check=True, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "train_summary.json").read_text())
    return float(summary["seconds_per_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--recipe", default="baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    batch = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["batch_size"]
    configs = [(1, args.threads), (2, args.threads)]
    if args.device == "cpu":
        configs.append((1, 2 * args.threads))
    times: dict[str, list[float]] = {f"{n}x{t}": [] for n, t in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n, t in (configs if r % 2 == 0 else configs[::-1]):  # interleaved against drift
                times[f"{n}x{t}"].append(one_run(n, t, args, Path(tmp)))
                print(f"{n} process(es) x {t} thread(s): {times[f'{n}x{t}'][-1]:.4f} s/step", flush=True)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    one, two = f"1x{args.threads}", f"2x{args.threads}"
    summary = {"samples_per_s": rate, "two_over_one": rate[two] / rate[one]}
    if args.device == "cpu":
        summary["two_procs_over_one_proc_same_cores"] = rate[two] / rate[f"1x{2 * args.threads}"]
    print(json.dumps(summary, indent=2))
    write_results(f"ddp_scaling_{args.device}", {"machine": machine_info(args.device), "times": times,
                                                 "global_batch": batch, "steps": args.steps,
                                                 "recipe": args.recipe, "summary": summary})


if __name__ == "__main__":
    main()
