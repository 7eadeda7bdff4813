"""The number of IG quadrature nodes, chosen online from the completeness residual.

IG along the path ``alpha * theta`` is complete: ``sum(IG) = L(theta) - L(0)``. The quadrature
misses it by the residual ``delta = sum(IG) - (L(theta) - L(0))``, a cheap check of the node
count: the gap takes two no-grad forwards of the IG rows (:func:`igulora.ig.loss_gap`).
``ig_steps="auto"`` judges a node count on a window of ``WINDOW`` scoring steps by the relative
residual ``sum |delta| / sum |L(theta) - L(0)|`` and, between windows:

- adds a node when it is above ``IGULoraConfig.ig_tolerance``;
- drops one when it is under ``tolerance * LOWER_AT``;
- takes a node back when the last one added did not cut the residual by ``MIN_GAIN``: what is
  left is not quadrature error but noise (dropout draws differ between the nodes' rows), which no
  node count removes. That count is the ceiling for ``RETRY`` windows, then it is tried again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 8  # scoring steps per decision: 4 let dropout noise pass for a 30% gain (docs/results-details.md)
LOWER_AT = 0.25  # drop a node when the window's residual is under this fraction of the tolerance
MIN_GAIN = 0.3  # an added node must cut the window's residual by this fraction to stay
RETRY = 8  # windows under a ceiling before the count above it is tried again
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
    """The node count of ``ig_steps="auto"`` and what it was judged on."""

    tolerance: float
    max_nodes: int
    nodes: int = START_NODES
    window: list[tuple[float, float]] = field(default_factory=list)  # (|residual|, |gap|)
    previous: tuple[int, float] | None = None  # (nodes, residual) of the last window judged
    ceiling: int | None = None  # a count above which nodes did not pay
    under_ceiling: int = 0  # windows judged since the ceiling was set

    def observe(self, check: Completeness) -> int:
        """Fold one scoring step's check in; returns the node count for the next scoring step."""
        self.window.append((abs(check.residual), abs(check.loss_gap)))
        if len(self.window) < WINDOW:
            return self.nodes
        residual, gap = (sum(column) for column in zip(*self.window))
        relative = residual / gap if gap else float("inf")
        self.window = []
        previous, self.previous = self.previous, (self.nodes, relative)
        if self.ceiling is not None:
            self.under_ceiling += 1
            if self.under_ceiling >= RETRY:
                self.ceiling, self.under_ceiling = None, 0
        top = min(self.max_nodes, self.ceiling or self.max_nodes)
        raised = previous is not None and previous[0] == self.nodes - 1
        if raised and relative > self.tolerance and relative > (1 - MIN_GAIN) * previous[1]:
            self.nodes -= 1  # the added node did not pay: what is left is noise
            self.ceiling, self.under_ceiling = self.nodes, 0
        elif relative > self.tolerance and self.nodes < top:
            self.nodes += 1
        elif relative < self.tolerance * LOWER_AT and self.nodes > 1:
            self.nodes -= 1
        return self.nodes

    def state_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "window": [list(w) for w in self.window],
            "previous": list(self.previous) if self.previous else None,
            "ceiling": self.ceiling,
            "under_ceiling": self.under_ceiling,
        }

    def load_state_dict(self, state: dict) -> None:
        self.nodes = int(state["nodes"])
        self.window = [tuple(w) for w in state["window"]]
        self.previous = tuple(state["previous"]) if state.get("previous") else None
        self.ceiling = state.get("ceiling")
        self.under_ceiling = int(state.get("under_ceiling", 0))
