"""``train_log.csv``: one row per logged training step (losses, weights, lr, throughput)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.losses import CombinedLoss


class MetricsLog:
    """One row per logged step; on resume, rows after the checkpoint go."""

    def __init__(self, path: Path, columns: list[str], keep_until: int) -> None:
        self.path, self.columns = path, columns
        kept = self._rows_until(keep_until) if keep_until > 0 else []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()

    def _rows_until(self, step: int) -> list[dict[str, str]]:
        """Rows of a previous run up to ``step`` (a killed run may have logged past its checkpoint)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [{c: r.get(c, "") for c in self.columns} for r in rows if int(r["step"]) <= step]

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({c: row.get(c, "") for c in self.columns})
        self._file.flush()  # a killed run keeps every row it logged

    def close(self) -> None:
        self._file.close()


class NoLog:
    """The metrics log of a rank other than 0 (rank 0 writes the one log)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def log_columns(objective: CombinedLoss) -> list[str]:
    """CSV columns: step, epoch, loss, one per loss term, the objective's logged weights and
    learned scalars, lr, logit_scale, samples_per_s."""
    terms = [f"loss_{name}" for name in objective.terms]
    return ["step", "epoch", "loss", *terms, *objective.logged(), "lr", "logit_scale",
            "samples_per_s"]
