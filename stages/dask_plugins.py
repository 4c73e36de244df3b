"""Dask worker plugins of the store runner (imported only when the Dask executor is used)."""
from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class TorchThreads(WorkerPlugin):
    """torch's thread count in every worker process, restarted ones too (the scheduler keeps
    the plugin and applies it to every worker that joins)."""

    name = "vlm-distill-torch-threads"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(self.threads)
