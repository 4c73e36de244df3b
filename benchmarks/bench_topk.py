"""Exact top-k of `neighbors` (pipeline.topk.blocked_topk) against faiss IndexFlatIP.

Each measurement runs in a fresh subprocess that builds the same data (seeded, L2-normalised
float32 embeddings), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then times
one call (wall and CPU time of the process) and reads the peak: "peak extra memory" is the peak
RSS during the call minus the RSS before it (the data itself is not counted). Methods run
interleaved, ``--repeats`` times each, in an order reversed every repeat; figures are medians.
On a machine shared with other work the CPU time (all threads of the call) is the steadier
measure of the work done. Methods:

* ``blocked_topk``: ``blocked_topk(x, x, k)`` with the default backend (faiss when installed);
* ``faiss_flat_ip``: ``faiss.IndexFlatIP(D)``, ``add(x)``, ``search(x, k)``;
* ``torch_backend``: ``blocked_topk(..., backend="torch")``, the matmul-block fallback.

All on ``--threads`` threads (torch and faiss/OpenMP alike). The indices of every method are
compared with IndexFlatIP's; rows that differ only in the order of exactly equal
similarities are counted apart (IndexFlatIP leaves ties in heap order; ``blocked_topk`` puts the
lower row first).

Command: ``.venv/bin/python benchmarks/bench_topk.py`` (defaults: N = 50,000, D = 512, k = 32,
threads = torch's default, 3 repeats).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_info, markdown_table, median, write_results  # noqa: E402

METHODS = ("blocked_topk", "faiss_flat_ip", "torch_backend")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _data(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _worker(args: argparse.Namespace) -> None:
    """One timed call in this (fresh) process; prints a JSON line."""
    import faiss
    import torch

    from pipeline.topk import blocked_topk

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = _data(args.n, args.dim, args.seed)
    if args.worker == "faiss_flat_ip":
        def run():
            index = faiss.IndexFlatIP(args.dim)
            index.add(x)
            sims, idx = index.search(x, args.k)
            return idx, sims
    else:
        backend = "auto" if args.worker == "blocked_topk" else "torch"
        def run():
            return blocked_topk(x, x, args.k, backend=backend)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    t0, cpu0 = time.perf_counter(), time.process_time()
    idx, sims = run()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _status_kib("VmHWM")
    np.savez(args.out, idx=idx.astype(np.int64), sims=sims)
    print(json.dumps({"method": args.worker, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_extra_mib": (peak - before) / 1024}))


def _measure(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--out", str(out), "--n", str(args.n),
           "--dim", str(args.dim), "--k", str(args.k), "--threads", str(args.threads),
           "--seed", str(args.seed)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _differences(ours, ref) -> str:
    """Rows whose indices differ from the reference's, and how many of them only in the order
    of exactly equal similarities (same similarity list): IndexFlatIP does not order ties."""
    differ = (ours["idx"] != ref["idx"]).any(axis=1)
    tie_order = differ & (ours["sims"] == ref["sims"]).all(axis=1)
    return f"{int(differ.sum())} ({int(tie_order.sum())} tie order only)"


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    mismatched: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            # the order reverses every repeat (ABBA...), so a load that drifts during the run
            # weighs on every method alike
            for method in (args.methods if rep % 2 == 0 else args.methods[::-1]):
                out = Path(tmp) / f"{method}.npz"
                runs[method].append(_measure(method, args, out))
                print(f"repeat {rep} {method}: {runs[method][-1]}", file=sys.stderr, flush=True)
        if "faiss_flat_ip" in args.methods:
            mismatched = {m: _differences(np.load(Path(tmp) / f"{m}.npz"),
                                          np.load(Path(tmp) / "faiss_flat_ip.npz")) for m in args.methods}
    fields = ("seconds", "cpu_seconds", "peak_extra_mib")
    summary = {m: {f: median([r[f] for r in rs]) for f in fields} for m, rs in runs.items()}
    ref = summary.get("faiss_flat_ip")
    rows = [[m, f"{s['seconds']:.2f} s", f"{s['cpu_seconds']:.2f} s", f"{s['peak_extra_mib']:.0f} MiB",
             f"{s['seconds'] / ref['seconds']:.2f}" if ref else "",
             f"{s['cpu_seconds'] / ref['cpu_seconds']:.2f}" if ref else "",
             mismatched.get(m, "")] for m, s in summary.items()]
    print(markdown_table(["method", "wall time", "CPU time", "peak extra memory", "wall / IndexFlatIP",
                          "CPU / IndexFlatIP", "rows whose indices differ from IndexFlatIP"], rows))
    info = machine_info("cpu") | {"threads": args.threads}
    import faiss

    info["faiss_version"] = faiss.__version__
    path = write_results("bench_topk", {"machine": info, "args": {k: v for k, v in vars(args).items()
                                                                  if k not in ("worker", "out")},
                                        "runs": runs, "summary": summary, "rows_differing": mismatched})
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
