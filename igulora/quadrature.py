"""Quadrature rules on [0, 1] for the IG path integral (method.md, section 2).

Every rule returns nodes ``alpha_j`` in (0, 1] and weights ``w_j``. The node at alpha = 0 never
appears: every adapter gradient vanishes there, so it contributes nothing (the rules that have it,
trapezoid and Gauss-Lobatto, keep the other weights of the rule on [0, 1]). A node at alpha = 1 is
free in training: it is the training batch's own gradient (:mod:`igulora.ig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RULES = ("trapezoid", "gauss_legendre", "gauss_lobatto", "riemann_middle", "stochastic", "gradient")


@dataclass(frozen=True)
class Quadrature:
    alphas: tuple[float, ...]
    weights: tuple[float, ...]

    def __iter__(self):
        return iter(zip(self.alphas, self.weights))

    def weight_at_one(self) -> float:
        """Weight of the node alpha = 1 (0 when the rule has none)."""
        return sum(w for a, w in self if a == 1.0)


def _trapezoid_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook composite trapezoid with n intervals, node 0 dropped."""
    alphas = np.arange(1, n + 1) / n
    weights = np.full(n, 1.0 / n)
    weights[-1] = 1.0 / (2 * n)
    return alphas, weights


def _gauss_lobatto(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-point Gauss-Lobatto rule on [-1, 1] (exact to degree 2n - 3): the endpoints and the
    roots of P'_{n-1}, weights 2 / (n (n - 1) P_{n-1}(x)^2)."""
    legendre = np.polynomial.legendre.Legendre.basis(n - 1)
    x = np.concatenate(([-1.0], np.sort(legendre.deriv().roots().real), [1.0]))
    return x, 2.0 / (n * (n - 1) * legendre(x) ** 2)


def quadrature(
    rule: str,
    steps: int,
    *,
    grid: int = 20,
    generator: torch.Generator | None = None,
) -> Quadrature:
    """Nodes and weights of ``rule``.

    - ``trapezoid``: ``steps`` intervals (``steps`` nodes once alpha = 0 is dropped).
    - ``gauss_legendre``: ``steps`` Gauss-Legendre nodes mapped to [0, 1].
    - ``gauss_lobatto``: the ``steps + 1``-point Gauss-Lobatto rule on [0, 1], alpha = 0 dropped:
      ``steps`` nodes, the last at alpha = 1, so ``steps - 1`` cost IG rows (2: Simpson's
      {1/2, 1}; 3: exact to degree 5 like 3 Gauss-Legendre nodes, with one row block fewer).
    - ``riemann_middle``: ``steps`` midpoints.
    - ``stochastic``: ``steps`` nodes drawn with replacement from the ``grid``-interval trapezoid
      grid with probability proportional to their weight, each weighted so that the estimate is an
      unbiased estimate of the full trapezoid sum. Draws use ``generator``.
    - ``gradient``: one node at alpha = 1 (AdaLoRA's sensitivity).
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if rule == "gradient":
        return Quadrature((1.0,), (1.0,))
    if rule == "trapezoid":
        alphas, weights = _trapezoid_grid(steps)
    elif rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (x + 1.0) / 2.0, w / 2.0
    elif rule == "gauss_lobatto":
        x, w = _gauss_lobatto(steps + 1)
        alphas, weights = (x[1:] + 1.0) / 2.0, w[1:] / 2.0
    elif rule == "riemann_middle":
        alphas, weights = (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    else:  # stochastic
        grid_alphas, grid_weights = _trapezoid_grid(grid)
        total = grid_weights.sum()
        probs = torch.as_tensor(grid_weights / total, dtype=torch.float64)
        draws = torch.multinomial(probs, steps, replacement=True, generator=generator)
        counts = np.bincount(draws.numpy(), minlength=grid)
        keep = counts > 0
        # Importance weight w_j / (M p_j) = total / M for every draw; repeated draws add up.
        alphas, weights = grid_alphas[keep], counts[keep] * total / steps
    return Quadrature(tuple(float(a) for a in alphas), tuple(float(w) for w in weights))
