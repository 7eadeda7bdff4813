"""The number of IG quadrature nodes, chosen online from the completeness residual.

IG along the path ``alpha * theta`` is complete: ``sum(IG) = L(theta) - L(0)``. The quadrature
misses it by the residual ``delta = sum(IG) - (L(theta) - L(0))``, an exact and almost free check
of the node count: ``L(theta)`` is the IG rows' loss in the training forward and ``L(0)`` one
no-grad forward of those rows with every adapter off. ``ig_steps="auto"`` keeps the relative
residual of the last ``WINDOW`` scoring steps, ``sum |delta| / sum |L(theta) - L(0)|``, under
``IGULoraConfig.ig_tolerance``: one more Gauss-Legendre node when it is above, one fewer when it
is under ``tolerance * LOWER_AT``. Each change opens a fresh window, so a count is judged on its
own residuals only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 4  # scoring steps per decision
LOWER_AT = 0.25  # drop a node when the window's residual is under this fraction of the tolerance
START_NODES = 3  # the fixed default's count


@dataclass
class Completeness:
    """One scoring step's check: the IG total, the loss gap it should equal, the node count."""

    step: int
    nodes: int
    ig_total: float
    loss_gap: float  # L(theta) - L(0) on the IG rows

    @property
    def residual(self) -> float:
        return self.ig_total - self.loss_gap

    @property
    def relative_residual(self) -> float:
        return abs(self.residual) / abs(self.loss_gap) if self.loss_gap else float("inf")


@dataclass
class NodeBudget:
    """The node count of ``ig_steps="auto"`` and the residuals it was judged on."""

    tolerance: float
    max_nodes: int
    nodes: int = START_NODES
    window: list[tuple[float, float]] = field(default_factory=list)  # (|residual|, |gap|)

    def observe(self, check: Completeness) -> int:
        """Fold one scoring step's check in; returns the node count for the next scoring step."""
        self.window.append((abs(check.residual), abs(check.loss_gap)))
        if len(self.window) < WINDOW:
            return self.nodes
        residual, gap = (sum(column) for column in zip(*self.window))
        relative = residual / gap if gap else float("inf")
        if relative > self.tolerance and self.nodes < self.max_nodes:
            self.nodes += 1
        elif relative < self.tolerance * LOWER_AT and self.nodes > 1:
            self.nodes -= 1
        self.window = []
        return self.nodes

    def state_dict(self) -> dict:
        return {"nodes": self.nodes, "window": [list(w) for w in self.window]}

    def load_state_dict(self, state: dict) -> None:
        self.nodes = int(state["nodes"])
        self.window = [tuple(w) for w in state["window"]]
