"""Pictures of an allocation: the rank heatmap and the budget / score curves (matplotlib)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

_LAYER = re.compile(r"^(?P<prefix>.*?)\.?(?P<index>\d+)\.(?P<kind>.+)$")


def layer_grid(values: Mapping[str, float]) -> tuple[list[int], list[str], np.ndarray]:
    """Arrange per-module values as (layer index x module type).

    A module name splits at its first numeric component: ``model.layers.3.self_attn.q_proj`` is
    layer 3, type ``self_attn.q_proj``. Modules without one go to layer -1.
    """
    cells: dict[tuple[int, str], float] = {}
    for name, value in values.items():
        match = _LAYER.match(name)
        layer, kind = (int(match["index"]), match["kind"]) if match else (-1, name)
        cells[(layer, kind)] = float(value)
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), value in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = value
    return layers, kinds, grid


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rank_heatmap(
    ranks: Mapping[str, int], path: str | Path, *, planted: Mapping[str, int] | None = None
) -> Path:
    """Save a heatmap of allocated ranks (layers x module types); with ``planted``, a planted-rank
    panel beside it on the same colour scale."""
    panels = {"allocated rank": ranks}
    if planted is not None:
        panels = {"planted rank": {name: planted.get(name, 0) for name in ranks}, **panels}
    return rank_panels(panels, path)


def rank_panels(panels: Mapping[str, Mapping[str, int]], path: str | Path) -> Path:
    """Save one rank heatmap per ``{title: ranks}`` entry, side by side on one colour scale."""
    plt = pyplot()
    vmax = max(max(values.values(), default=0) for values in panels.values()) or 1
    layers, kinds, _ = layer_grid(next(iter(panels.values())))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.5 + 0.9 * len(kinds) * len(panels), 1.5 + 0.4 * len(layers)), squeeze=False
    )
    for ax, (label, values) in zip(axes[0], panels.items()):
        layers, kinds, grid = layer_grid(values)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
        ax.set_ylabel("layer")
        ax.set_title(label)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:g}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(rows: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Save loss, budget / active rank and mean triplet score against the step, and the IG node
    count with its completeness residual where scoring steps checked it."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    checked = [r for r in rows if r.get("ig_nodes", "") != ""]
    fig, axes = plt.subplots(1, 4 if checked else 3, figsize=(17 if checked else 13, 3.4))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set_title("training loss")
    axes[1].plot(steps, [r["budget"] for r in rows], label="budget")
    axes[1].plot(steps, [r["active_rank"] for r in rows], "--", label="active rank")
    axes[1].set_title("rank budget")
    axes[1].legend()
    axes[2].plot(steps, [r["mean_score"] for r in rows])
    axes[2].set_title("mean triplet score")
    if checked:
        check_steps = [r["step"] for r in checked]
        axes[3].step(check_steps, [r["ig_nodes"] for r in checked], where="post", label="nodes")
        axes[3].set_ylabel("Gauss-Legendre nodes")
        residual = axes[3].twinx()
        residual.semilogy(check_steps, [r["ig_residual"] for r in checked], ".", color="C1", ms=3)
        residual.set_ylabel("relative completeness residual", color="C1")
        axes[3].set_title("IG nodes and residual")
    for ax in axes:
        ax.set_xlabel("step")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
