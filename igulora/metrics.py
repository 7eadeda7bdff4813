"""Per-step training metrics: a CSV file, and TensorBoard when it is installed."""

from __future__ import annotations

import csv
from pathlib import Path

from igulora.io import atomic_write
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
    """Appends rows to ``metrics.csv`` (header once) and mirrors them to TensorBoard if available.

    An existing file is resumed: its rows of steps below ``resume_below`` (all, if None) stay part
    of the run, each under its column name even if another version wrote other columns."""

    def __init__(
        self,
        path: str | Path,
        columns: tuple[str, ...] = COLUMNS,
        tensorboard_dir: str | Path | None = None,
        resume_below: int | None = None,
    ):
        self.path = Path(path)
        self.columns = columns
        self.rows: list[dict[str, float]] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                written = list(reader)
                header = tuple(reader.fieldnames or ())
            if written and "step" not in header:
                raise ValueError(f"{self.path} has no 'step' column: not a metrics file of a run")
            kept = [row for row in written if resume_below is None or float(row["step"] or 0) < resume_below]
            self.rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in kept]
            if header != columns or len(kept) < len(written):
                self.columns = columns + tuple(c for c in header if c not in columns)
                self._rewrite(kept)
        else:
            self._rewrite([])
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the CSV is enough
                pass
            else:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """The header and ``rows``, replacing the file atomically."""

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self.columns)
                writer.writerows([row.get(c, "") for c in self.columns] for row in rows)

        atomic_write(self.path, write)

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
