"""What each CPU speed-up of the quick demo buys: the demo student's training step and the vision
teacher's forward, each timed with and without it, interleaved (the order rotates every repeat,
so drift in machine load hits all variants alike); medians are reported.

Training step of the demo student (params.yaml's ``train``: inherited from ``aligned``, batch 64,
the demo's image size), one synthetic batch of real captions:

- ``before``: contiguous (NCHW) pixels, AdamW's per-tensor loop, every caption padded to the
  context length -- the step as it was;
- ``+ fused AdamW``: ``make_optimizer``'s fused kernel;
- ``+ channels-last``: pixels laid out NHWC (``pipeline.devices.channels_last``);
- ``+ trimmed padding``: the batch's columns after its longest caption cut (the step as it is).

Vision teacher (EfficientNet-Lite0 at 224 px): ms per image at batch 32 and 8, NCHW and NHWC.

    python benchmarks/bench_cpu_step.py                 # needs `make demo`'s models/align
    python benchmarks/bench_cpu_step.py --repeats 10 --threads 2

Prints Markdown tables and writes ``benchmarks/results/bench_cpu_step.json``.
"""
from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from _common import machine_info, markdown_table, median, write_results

from pipeline.devices import channels_last
from pipeline.teachers import create_teacher
from pipeline.training.schedule import make_optimizer
from stages.train.run import build_student, load_train_config

CAPTIONS = ["grinning face with big eyes", "a hash key emoji, from symbols: keycap",
            "woman in lotus position: medium-dark skin tone, from people & body: person-activity",
            "red apple", "flag: United Kingdom", "cat with wry smile, from smileys & emotion: cat-face"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="the demo's train section")
    p.add_argument("--repeats", type=int, default=6, help="timed rounds (each times every variant)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


@contextmanager
def untrimmed(student: torch.nn.Module) -> Iterator[None]:
    """The student without its padding cut (every caption at the context length)."""
    trim = getattr(student, "_trim", None)
    if trim is not None:
        student._trim = lambda tokens: tokens
    try:
        yield
    finally:
        if trim is not None:
            del student._trim


def step_variants(params: str) -> dict[str, tuple]:
    """Name -> (student, optimizer, pixels layout fn, trimmed) for the four step variants."""
    cfg = load_train_config(params)
    base = build_student(cfg).train()
    variants = {}
    for name, fused, nhwc, trim in (("before", False, False, False), ("+ fused AdamW", True, False, False),
                                    ("+ channels-last", True, True, False), ("+ trimmed padding", True, True, True)):
        student = copy.deepcopy(base)
        opt = make_optimizer([student], cfg.lr, cfg.weight_decay)
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=cfg.lr, foreach=False)  # the per-tensor loop
        variants[name] = (student, opt, nhwc, trim)
    return variants


def time_step(student: torch.nn.Module, opt: torch.optim.Optimizer, nhwc: bool, trim: bool,
              pixels: torch.Tensor, tokens: torch.Tensor) -> float:
    if not nhwc:  # what the tower saw before: NCHW pixels (its own conversion bypassed)
        pixels = pixels.contiguous()
    t0 = time.perf_counter()
    with (nullcontext() if trim else untrimmed(student)):
        vision = student.vision
        feat = vision(channels_last(pixels) if nhwc else pixels)
        image = student._head(student.image_proj, feat, True)
        text = student.encode_text(tokens)
    loss = (image @ text.T).logsumexp(1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def teacher_forward(repeats: int) -> dict[str, float]:
    """ms per image of EfficientNet-Lite0's features at batch 32 and 8, NCHW and NHWC."""
    net = create_teacher("efficientnet_lite").net.eval()
    images = torch.randn(64, 3, 224, 224)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for batch in (32, 8):
                for nhwc in (False, True):
                    x = channels_last(images) if nhwc else images
                    t0 = time.perf_counter()
                    for i in range(0, len(x), batch):
                        net.extract_features(x[i:i + batch])
                    if rep:  # the first round warms up
                        times.setdefault(f"batch {batch}, {'NHWC' if nhwc else 'NCHW'}", []).append(
                            (time.perf_counter() - t0) / len(x) * 1e3)
    return {k: median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = step_variants(args.params)
    student = next(iter(variants.values()))[0]
    size = student.image_size
    pixels = torch.randn(64, 3, size, size)
    tokens = student.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(64)])
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.repeats + 1):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            t = time_step(*variants[name], pixels, tokens)
            if rep:  # the first round warms up
                times[name].append(t)
    step_ms = {k: median(v) * 1e3 for k, v in times.items()}
    before = step_ms["before"]
    print(f"Training step of the demo student (batch 64, {size} px), median of {args.repeats}:\n")
    print(markdown_table(["variant", "ms per step", "÷ before"],
                         [[k, f"{v:.0f}", f"{v / before:.2f}"] for k, v in step_ms.items()]))
    teacher_ms = teacher_forward(args.repeats)
    ref = teacher_ms["batch 32, NCHW"]
    print("\nEfficientNet-Lite0 features at 224 px, ms per image:\n")
    print(markdown_table(["batch, layout", "ms per image", "÷ batch 32 NCHW"],
                         [[k, f"{v:.1f}", f"{v / ref:.2f}"] for k, v in teacher_ms.items()]))
    path = write_results("bench_cpu_step", {"machine": machine_info("cpu"), "repeats": args.repeats,
                                            "image_size": size, "step_ms": step_ms,
                                            "teacher_ms_per_image": teacher_ms}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
