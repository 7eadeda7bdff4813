"""Integrated gradients: completeness, closed forms, Captum, and the quadrature rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, tiny_bert, token_batch
from torch import nn

from igulora import (
    IGULoraConfig,
    IGULoraLinear,
    get_igu_model,
    integrated_gradients,
    mean_loss,
    quadrature,
    sequence_classification_row_loss,
)
from igulora.ig import adapter_parameters

CLS_LOSS = mean_loss(sequence_classification_row_loss)


def _bert_igu(targets=("query", "value")):
    model = tiny_bert(torch.float64)
    igu = get_igu_model(
        model, IGULoraConfig(target_modules=list(targets), init_r=3, target_r=1, total_step=10)
    )
    randomize_adapters(igu)
    return igu


@pytest.mark.parametrize("rule", ["trapezoid", "gauss_legendre", "riemann_middle", "stochastic"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_quadrature_weights_cover_unit_interval(rule, steps):
    quad = quadrature(rule, steps, grid=9, generator=torch.Generator().manual_seed(3))
    assert all(0 < a <= 1 for a in quad.alphas)
    full = 1 - 1 / (2 * (9 if rule == "stochastic" else steps)) if rule in ("trapezoid", "stochastic") else 1
    assert sum(quad.weights) == pytest.approx(full)  # trapezoid drops its alpha = 0 node


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_gauss_lobatto_is_exact_to_degree_2_steps_minus_1_with_its_last_node_free(steps):
    """steps + 1 Lobatto points on [0, 1] integrate alpha^d exactly for d <= 2 (steps + 1) - 3; the
    dropped alpha = 0 node adds nothing there (d >= 1), and the last node is alpha = 1, the training
    batch's own gradient: steps - 1 nodes cost IG rows, one fewer than Gauss-Legendre of that degree."""
    quad = quadrature("gauss_lobatto", steps)
    assert len(quad.alphas) == steps and quad.alphas[-1] == 1.0 and all(0 < a < 1 for a in quad.alphas[:-1])
    assert quad.weight_at_one() == pytest.approx(1 / (steps * (steps + 1)))  # 2 / (n (n - 1)), halved
    for degree in range(1, 2 * steps):
        assert sum(w * a**degree for a, w in quad) == pytest.approx(1 / (degree + 1), rel=1e-12), degree
    too_high = 2 * steps
    assert sum(w * a**too_high for a, w in quad) != pytest.approx(1 / (too_high + 1), rel=1e-9)
    if steps == 2:  # Simpson's rule, alpha = 0 dropped
        assert quad.alphas == (0.5, 1.0) and quad.weights == pytest.approx((2 / 3, 1 / 6))


def test_gauss_lobatto_ig_agrees_with_a_fine_gauss_legendre_rule():
    """4 Lobatto nodes (exact to degree 7) give the IG that 16 Gauss-Legendre nodes give."""
    igu, batch = _bert_igu(), token_batch()
    lobatto = integrated_gradients(igu, CLS_LOSS, batch, steps=4, rule="gauss_lobatto")
    fine = integrated_gradients(igu, CLS_LOSS, batch, steps=16, rule="gauss_legendre")
    for name in fine.attributions:
        torch.testing.assert_close(lobatto.attributions[name], fine.attributions[name], rtol=1e-3, atol=1e-9)


def test_stochastic_rule_is_unbiased_for_the_trapezoid_grid():
    grid, draws = 8, 4000
    exact = dict(quadrature("trapezoid", grid))
    gen = torch.Generator().manual_seed(0)
    mean = {a: 0.0 for a in exact}
    for _ in range(draws):
        for a, w in quadrature("stochastic", 3, grid=grid, generator=gen):
            mean[a] += w / draws
    for a, w in exact.items():
        # each draw's weight on node a has std <= total weight; 5 sigma of the mean
        assert abs(mean[a] - w) < 5 * 1.0 / np.sqrt(draws), a


def test_gradient_rule_is_theta_times_gradient():
    igu = _bert_igu()
    batch = token_batch()
    result = integrated_gradients(igu, CLS_LOSS, batch, steps=1, rule="gradient")
    params = adapter_parameters(igu)
    grads = torch.autograd.grad(CLS_LOSS(igu, batch), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(result.attributions[name], p.detach() * g, rtol=1e-12, atol=0)


def test_closed_form_for_a_loss_linear_in_the_adapter_output():
    """L = <v, y>: the path gradient is alpha^2 * grad(theta), so IG = theta * grad / 3 exactly,
    and 2 Gauss-Legendre nodes integrate it exactly."""
    torch.manual_seed(0)
    layer = IGULoraLinear(nn.Linear(7, 5).double(), r=3, lora_alpha=6)
    randomize_adapters(layer)
    x, v = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def loss_fn(model, batch):
        return (model(batch["x"]) * v).sum()

    result = integrated_gradients(layer, loss_fn, {"x": x}, steps=2, rule="gauss_legendre")
    params = adapter_parameters(layer)
    grads = torch.autograd.grad(loss_fn(layer, {"x": x}), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(result.attributions[name], p.detach() * g / 3, rtol=1e-12, atol=1e-15)
    assert abs(result.delta) < 1e-12


def test_completeness_delta_shrinks_like_one_over_steps_squared_for_trapezoid():
    igu = _bert_igu()
    batch = token_batch()
    deltas = [
        abs(integrated_gradients(igu, CLS_LOSS, batch, steps=n, rule="trapezoid").delta) for n in (8, 16, 32)
    ]
    ratios = [deltas[i] / deltas[i + 1] for i in range(2)]
    assert all(3.0 < r < 5.0 for r in ratios), (deltas, ratios)
    result = integrated_gradients(igu, CLS_LOSS, batch, steps=32, rule="trapezoid")
    assert abs(result.delta) < 1e-2 * abs(result.loss - result.baseline_loss)


def test_gauss_legendre_completeness_converges_fast():
    igu = _bert_igu()
    result = integrated_gradients(igu, CLS_LOSS, token_batch(), steps=16, rule="gauss_legendre")
    assert abs(result.delta) < 1e-9 * max(1.0, abs(result.loss - result.baseline_loss))


def test_stochastic_rule_is_seeded():
    igu = _bert_igu()
    batch = token_batch()
    a = integrated_gradients(igu, CLS_LOSS, batch, steps=3, rule="stochastic", seed=1)
    b = integrated_gradients(igu, CLS_LOSS, batch, steps=3, rule="stochastic", seed=1)
    c = integrated_gradients(igu, CLS_LOSS, batch, steps=3, rule="stochastic", seed=2)
    assert a.total == b.total and a.total != c.total


def test_matches_captum_integrated_gradients_on_the_flat_adapter_vector():
    captum_attr = pytest.importorskip("captum.attr")
    igu = _bert_igu()
    batch = token_batch(n=3, t=5)
    params = adapter_parameters(igu)
    names, shapes = list(params), [p.shape for p in params.values()]
    theta = torch.cat([p.detach().flatten() for p in params.values()])[None]

    def forward(flat: torch.Tensor) -> torch.Tensor:
        losses = []
        for row in flat:
            chunks = row.split([s.numel() for s in shapes])
            values = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
            out = torch.func.functional_call(
                igu, values, (), {k: v for k, v in batch.items() if k != "labels"}
            )
            losses.append(torch.nn.functional.cross_entropy(out.logits, batch["labels"]))
        return torch.stack(losses)

    steps = 6
    expected = captum_attr.IntegratedGradients(forward).attribute(
        theta, baselines=torch.zeros_like(theta), method="gausslegendre", n_steps=steps
    )[0]
    result = integrated_gradients(igu, CLS_LOSS, batch, steps=steps, rule="gauss_legendre")
    ours = torch.cat([result.attributions[n].flatten() for n in names])
    assert torch.linalg.norm(ours - expected) <= 1e-6 * torch.linalg.norm(expected)
    assert torch.linalg.norm(expected) > 0
