"""`distill align`'s head training on the demo caches: seconds per epoch on 1 and 2 torch threads,
and the aligned teacher's retrieval next to the zero-shot `demo_clip`'s.

Needs the demo's caches (`make demo`: caches/effnet and caches/minilm, train/val/test). Runs
``train_heads`` with the ``align`` section of params.yaml but a fixed number of epochs and no early
stopping, ``--repeats`` times per thread count, interleaved (1, 2, 2, 1, ...) so a load that drifts
weighs on both alike; reports the median seconds per epoch and the load average. Then scores, on
the test split, the heads trained with the params as they are (early stopping on val) against
the `demo_clip` cache.

Command: ``.venv/bin/python benchmarks/bench_align.py`` (defaults: 30 epochs, 3 repeats).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
from _common import machine_info, markdown_table, median, write_results  # noqa: E402


def main() -> None:
    from pipeline.config import load_section
    from pipeline.metrics import retrieval_metrics
    from pipeline.stores.teacher import TeacherCache
    from stages.align.run import AlignConfig, paired_features, source_pairs, train_heads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    cfg = load_section(AlignConfig, "align", args.params)
    pairs = source_pairs(cfg)
    train, val = paired_features(pairs[cfg.train_split]), paired_features(pairs[cfg.val_split])
    timing: dict[int, list[float]] = {1: [], 2: []}
    loads = []
    for rep in range(args.repeats):
        for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
            fixed = dataclasses.replace(cfg, threads=threads, epochs=args.epochs, val_split=None)
            t0 = time.perf_counter()
            train_heads(fixed, train, None, progress=False)
            timing[threads].append((time.perf_counter() - t0) / args.epochs)
            loads.append(os.getloadavg()[0])
            print(f"repeat {rep} threads {threads}: {timing[threads][-1] * 1000:.1f} ms/epoch",
                  file=sys.stderr, flush=True)
    heads, info = train_heads(cfg, train, val, progress=False)
    test = pairs.get("test")
    scores = {}
    if test is not None:
        vision, text = TeacherCache.open(test.vision), TeacherCache.open(test.text)
        with torch.no_grad():
            img = heads.image(torch.from_numpy(vision.image_emb)).numpy()
            txt = heads.caption(torch.from_numpy(text.text_emb)).numpy()
        scores["aligned"] = retrieval_metrics(img, txt, text.text_to_image)
        demo = TeacherCache.open("caches/demo_clip/test.zarr") if os.path.exists("caches/demo_clip/test.zarr") else None
        if demo is not None:
            scores["demo_clip"] = retrieval_metrics(demo.image_emb, demo.text_emb, demo.text_to_image)
    rows = [[f"{t}", f"{median(v) * 1000:.1f} ms", f"{median(v) / median(timing[1]):.2f}"] for t, v in timing.items()]
    print(markdown_table(["torch threads", "per epoch (median)", "÷ 1 thread"], rows))
    for name, m in scores.items():
        print(f"{name}: RSUM {m['rsum']:.1f}, i2t R@1 {m['i2t_R@1']:.1f}, t2i R@1 {m['t2i_R@1']:.1f}")
    print(f"early stopping: {info['epochs_run']} epochs run, best epoch {info['best_epoch']}, "
          f"logit scale {info['logit_scale']:.2f}, {info['seconds']:.1f} s")
    path = write_results("bench_align", {
        "machine": machine_info("cpu") | {"load_average_during": loads}, "args": vars(args),
        "seconds_per_epoch": timing, "test_scores": scores,
        "early_stopping": {k: v for k, v in info.items() if k != "history"}})
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
