"""Settings of an evaluation (``params.yaml`` section ``evaluate``), read by the evaluation
library (scoring, efficiency probes, reports) and the ``evaluate`` stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import DEVICE_PATTERN, check_settings, setting


@dataclass(frozen=True)
class EvalConfig:
    """Parameters of the ``evaluate`` stage (``params.yaml`` section ``evaluate``)."""

    dataset: str = "data/emoji/test"             # dataset directory of the test split
    student_dir: str = "models/student"          # holds student.json + student.safetensors
    alone_dir: str | None = None                 # the same student trained without a teacher
                                                 # (`distill train --alone`), scored beside it; null = none
    teacher_cache: str | None = "caches/demo_clip/test.zarr"  # same split; null = student only
    teacher: str | None = "demo_clip"            # registry name for efficiency; null = skip it
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_teacher
    ks: tuple[int, ...] = setting((1, 5, 10), minimum=1, min_items=1)  # Recall@K cut-offs (RSUM sums
                                                 # them over both directions)
    curve_max_k: int = setting(50, minimum=1)    # Recall@K curve for K = 1..curve_max_k
    ndcg_k: int = setting(10, minimum=1)         # single-modal NDCG cut-off
    encode_batch_size: int = setting(64, minimum=1)  # images (and texts) per student forward when encoding
    latency_batch_sizes: tuple[int, ...] = setting((1, 64), minimum=1)  # batch sizes timed for the
                                                 # efficiency table
    latency_warmup: int = setting(2, minimum=0)  # untimed calls before timing (allocator, caches)
    latency_repeats: int = setting(5, minimum=1)  # timed calls; the median is reported
    measure_memory: bool = True                  # peak memory via a subprocess per model
    teacher_efficiency_cache: str | None = ".cache/teacher_efficiency"  # the teacher's figures, kept
                                                 # per teacher fingerprint, machine and timing
                                                 # settings and reused; null = measure every time
    device: str = setting("cpu", pattern=DEVICE_PATTERN)  # "cpu", "cuda" or "auto"
    threads: int | None = setting(None, minimum=1)  # torch threads for encoding and timing; null = torch's
                                                 # default, one per core (the report records the count)
    block_rows: int = setting(1024, minimum=1)   # query rows per similarity tile (bounds memory)
    n_examples: int = setting(3, minimum=0)      # test images shown with their top-3 captions
    metrics_path: str = "reports/eval/metrics.json"
    plots_dir: str = "reports/eval/plots"        # recall_at_k.csv (+ _wide.csv for dvc plots)
    report_path: str = "reports/eval/report.md"
    html_path: str = "reports/eval/index.html"   # self-contained HTML report (pictures embedded)
    gallery_captions: int = setting(6, minimum=0)  # test captions shown with their top images
    gallery_images: int = setting(4, minimum=0)  # test images shown with their top captions
    gallery_top: int = setting(5, minimum=1)     # retrieved items shown per query

    def __post_init__(self) -> None:
        check_settings(self, "evaluate")
