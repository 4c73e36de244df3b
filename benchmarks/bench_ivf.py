"""Approximate neighbours (``neighbors.method: ivf``) against exact search: time and recall@k.

    python benchmarks/bench_ivf.py --rows 1000000 --dim 512 --k 32 --queries 4096 \
        --nlist 4096 --nprobe 8 16 32 64 --threads 2

The store: ``--rows`` images with one caption each, written as a teacher store under ``--work``
(float16, the project's writer). Embeddings are clustered as real ones are: ``--clusters``
random unit centres; image row = normalise(centre + noise), the noise as long as the centre
(``--noise 1``: two images of a cluster have cosine about 0.5 and their nearest neighbours are
decided by the noise; ``--noise 2`` with ``--clusters 10000``: cosine about 0.2 within a
cluster of 100, about the largest of a million unrelated rows, so lists mix clusters); caption row = normalise(its image + noise a quarter as long). Direction
``t2i``: ``--queries`` random caption rows against every image row, ``k`` neighbours.

Exact: the stage's own search (``pipeline.knn.exact_topk``: keys read from the store a block at
a time, faiss). Its time is linear in the queries, so a sample of queries times the whole run.
IVF: the stage's own index (``pipeline.knn.IvfIndex``: trained on ``--train-rows`` sampled
keys, every key added block by block), its build timed apart, then searched with each
``nprobe``; recall@k of its lists against the exact ones on the same queries. Both on
``--threads`` threads. The estimate for 10^6 images x 5 * 10^6 captions in four directions is
made from the measured throughputs (stated in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_info, write_results  # noqa: E402


def write_clustered_store(path: Path, n_rows: int, dim: int, clusters: int, noise_len: float = 1.0,
                          seed: int = 0) -> None:
    """The clustered teacher store of the module docstring, one Zarr shard at a time."""
    from pipeline.stores.base import ROW_VALID, Layout, row_units, write_unit
    from pipeline.stores.teacher import create_teacher_store, teacher_store_attrs
    from pipeline.synthetic import synthetic_manifest

    layout = Layout(zstd_level=1)
    manifest = synthetic_manifest(n_rows)
    teacher = {"teacher": "clustered", "clusters": clusters, "noise": noise_len, "seed": seed, "embed_dim": dim}
    modalities = frozenset({"image", "text"})
    attrs = teacher_store_attrs(teacher, manifest.fingerprint, "train", modalities, dim, 100.0,
                                n_rows, n_rows, layout)
    group = create_teacher_store(path, n_images=n_rows, n_texts=n_rows, embed_dim=dim,
                                 modalities=modalities, attrs=attrs, layout=layout)
    centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for start, stop in row_units(n_rows, layout.rows_per_shard):
        rng = np.random.default_rng([seed, start])
        n = stop - start
        noise = noise_len * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        image = unit(centres[rng.integers(0, clusters, n)] + noise)
        text = unit(image + 0.25 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim))
        ids = np.array([f"s/{r:09d}" for r in range(start, stop)])
        write_unit(group, start, stop, {
            "image_emb": image.astype(np.float16), "text_emb": text.astype(np.float16),
            "image_id": ids, "text_id": np.char.add(ids, "#0"),
            "text_to_image": np.arange(start, stop, dtype=np.int32),
            "image_status": np.full(n, ROW_VALID, np.uint8), "text_status": np.full(n, ROW_VALID, np.uint8)})
    group.attrs.update({"complete": True})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0, help="image noise length ÷ its centre's")
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--train-rows", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_ivf"))
    p.add_argument("--write-only", action="store_true", help="write the store, measure nothing")
    args = p.parse_args()

    import torch

    from pipeline.knn import IvfIndex, IvfParams, exact_topk, recall_at_k
    from pipeline.stores.teacher import TeacherCache
    from pipeline.topk import _faiss

    torch.set_num_threads(args.threads)
    _faiss().omp_set_num_threads(args.threads)
    noise_tag = "" if args.noise == 1.0 else f"-n{args.noise:g}"
    store = args.work / f"clustered-{args.rows}-{args.dim}-{args.clusters}{noise_tag}.zarr"
    if not (store / "zarr.json").exists():
        t0 = time.perf_counter()
        write_clustered_store(store, args.rows, args.dim, args.clusters, args.noise)
        print(f"wrote {store} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.write_only:
        return
    cache = TeacherCache.open(store, lazy=True, verify=False)
    rows = np.sort(np.random.default_rng(1).choice(args.rows, args.queries, replace=False))
    queries = np.asarray(cache.text_emb[rows], dtype=np.float32)
    loads = [os.getloadavg()[0]]

    t0 = time.perf_counter()
    exact, _ = exact_topk(queries, cache.image_emb, cache.image_valid, args.k)
    exact_s = time.perf_counter() - t0
    loads.append(os.getloadavg()[0])
    print(f"exact: {exact_s:.1f} s for {args.queries} queries", file=sys.stderr, flush=True)

    params = IvfParams(args.nlist, max(args.nprobe), args.train_rows, 0)
    t0 = time.perf_counter()
    index = IvfIndex.build(cache.image_emb, cache.image_valid, params)
    build_s = time.perf_counter() - t0
    print(f"ivf build: {build_s:.1f} s", file=sys.stderr, flush=True)
    runs = []
    for nprobe in args.nprobe:
        index.index.nprobe = nprobe
        t0 = time.perf_counter()
        approx, _ = index.search(queries, args.k)
        search_s = time.perf_counter() - t0
        loads.append(os.getloadavg()[0])
        runs.append({"nprobe": nprobe, "search_s": search_s, "recall": recall_at_k(approx, exact),
                     "time_ratio": search_s / exact_s,
                     "ratio_with_build": (search_s * args.rows / args.queries + build_s)
                     / (exact_s * args.rows / args.queries)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)

    # four directions, 10^6 images and 5 * 10^6 captions: pairs (exact) and queries (ivf)
    n_img, n_txt = 1_000_000, 5_000_000
    directions = {"i2t": (n_img, n_txt), "t2i": (n_txt, n_img), "i2i": (n_img, n_img), "t2t": (n_txt, n_txt)}
    pairs_per_s = args.queries * args.rows / exact_s * (args.dim / 512)  # at D = 512
    exact_h = sum(q * n for q, n in directions.values()) / pairs_per_s / 3600
    best = min((r for r in runs if r["recall"] >= 0.95), key=lambda r: r["search_s"], default=runs[-1])
    per_query = best["search_s"] / args.queries  # at args.rows keys; list scans grow with the keys
    ivf_h = (sum(q * per_query * n / args.rows for q, n in directions.values())
             + sum(build_s * n / args.rows for n in (n_img, n_txt))) / 3600
    estimate = {"exact_hours": exact_h, "ivf_hours": ivf_h, "ivf_nprobe": best["nprobe"],
                "assumptions": "exact: measured pairs/s, linear in queries x keys; ivf: measured "
                               "seconds per query at this nlist and nprobe, times keys / rows (the "
                               "lists grow with the keys at a fixed nlist), plus one build per key "
                               "set scaled by its rows; one H100: not measured (no GPU lent)"}
    result = {"machine": machine_info("cpu") | {"load_average_during": loads},
              "args": {k: str(v) for k, v in vars(args).items()},
              "exact_s": exact_s, "build_s": build_s, "runs": runs, "estimate": estimate}
    path = write_results("bench_ivf" + noise_tag.replace("-", "_"), result)
    print("| nprobe | recall@%d | ivf search s | exact s | ivf ÷ exact | with build, whole run |" % args.k)
    print("|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['nprobe']} | {r['recall']:.3f} | {r['search_s']:.2f} | {exact_s:.1f} | "
              f"{r['time_ratio']:.3f} | {r['ratio_with_build']:.3f} |")
    print(f"build {build_s:.1f} s; estimate 10^6 images x 5*10^6 captions, 4 directions: exact "
          f"{exact_h:.1f} h, ivf (nprobe {best['nprobe']}) {ivf_h:.2f} h on this CPU")
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
