"""Per-step training metrics: a CSV file, and TensorBoard when it is installed."""

from __future__ import annotations

import csv
from pathlib import Path

from igulora.model import IGUModel

COLUMNS = ("step", "loss", "budget", "active_rank", "mean_score", "ig_nodes", "ig_residual")


def allocation_metrics(igu: IGUModel, step: int, loss: float) -> dict[str, float]:
    """One metrics row: loss, current budget, kept triplets and the mean kept triplet score; on a
    scoring step that checked completeness, its node count and relative residual."""
    scores = igu.allocator.layer_scores()
    active = sum(igu.active_ranks.values())
    mean_score = sum(scores.values()) / active if scores and active else 0.0
    row = {
        "step": step,
        "loss": loss,
        "budget": igu.allocator.budget,
        "active_rank": active,
        "mean_score": mean_score,
    }
    check = igu.last_check
    if check is not None and check.step == step:
        row.update(ig_nodes=check.nodes, ig_residual=check.relative_residual)
    return row


class MetricsLogger:
    """Appends rows to ``metrics.csv`` (header once) and mirrors them to TensorBoard if available."""

    def __init__(
        self, path: str | Path, columns: tuple[str, ...] = COLUMNS, tensorboard_dir: str | Path | None = None
    ):
        self.path = Path(path)
        self.columns = columns
        self.rows: list[dict[str, float]] = []
        if self.path.exists():  # resuming: earlier rows stay part of the run
            with open(self.path, newline="") as f:
                self.rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the CSV is enough
                pass
            else:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and value != "":
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
