"""The completeness residual of a scoring step, and ig_steps="auto" choosing the node count."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_bert, token_batch

from igulora import IGULoraConfig, get_igu_model, integrated_gradients, mean_loss
from igulora.ig import loss_gap, sequence_classification_row_loss
from igulora.metrics import allocation_metrics
from igulora.model import IGUModel
from igulora.node_budget import LOWER_AT, RETRY, START_NODES, WINDOW, Completeness, NodeBudget

STEPS = 24


def _igu(dropout: float = 0.0, **overrides) -> IGUModel:
    base = dict(
        init_r=3, target_r=1, total_step=STEPS, tinit=2, tfinal=2, ig_every=1, ig_window=None, ig_fraction=1.0
    )
    model = tiny_bert(torch.float64)
    if dropout:
        model.config.hidden_dropout_prob = dropout
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    igu = get_igu_model(model, IGULoraConfig(target_modules=["query", "value"], **{**base, **overrides}))
    randomize_adapters(igu)
    return igu


def _scoring_step(igu: IGUModel, batch, step: int = 0) -> Completeness:
    igu.train()
    igu.training_loss(batch, sequence_classification_row_loss).backward()
    igu.update_and_allocate(step)  # no optimizer step: the check is on the parameters IG saw
    igu.zero_grad()
    return igu.last_check


@pytest.mark.parametrize("nodes", [1, 2, 5])
def test_the_check_is_the_ig_total_and_the_loss_gap_of_the_ig_rows(nodes):
    """Against an independent evaluation: node-by-node IG (integrated_gradients) and two plain
    forwards, at theta and with every adapter off, on the same rows."""
    igu = _igu(ig_steps=nodes, ig_residual=True)
    batch = token_batch(n=6, t=7)
    reference = integrated_gradients(
        igu.model, mean_loss(sequence_classification_row_loss), batch, steps=nodes
    )
    check = _scoring_step(igu, batch)
    assert check.nodes == nodes
    assert check.ig_total == pytest.approx(reference.total, rel=1e-10, abs=1e-12)
    assert check.loss_gap == pytest.approx(reference.loss - reference.baseline_loss, rel=1e-10)
    assert check.residual == pytest.approx(reference.delta, rel=1e-8, abs=1e-12)


def test_enough_nodes_close_the_residual_and_one_does_not():
    batch = token_batch(n=6, t=7)
    residual = {
        n: _scoring_step(_igu(ig_steps=n, ig_residual=True), batch).relative_residual for n in (1, 12)
    }
    assert residual[12] < 1e-9 < 1e-3 < residual[1]


def test_the_check_leaves_the_run_as_it_was_even_with_dropout():
    """L(0)'s extra forward forks the random state: dropout draws, and so every weight, unchanged."""
    batch = token_batch(n=6, t=7)
    weights = []
    for residual in (False, True):
        torch.manual_seed(3)
        igu = _igu(dropout=0.2, ig_residual=residual)
        optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=1e-2)
        for step in range(4):
            igu.training_loss(batch, sequence_classification_row_loss).backward()
            optimizer.step()
            igu.update_and_allocate(step, optimizer=optimizer)
            optimizer.zero_grad()
        assert (igu.last_check is not None) == residual
        weights.append({n: p.detach().clone() for n, p in igu.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_the_loss_gap_draws_the_same_dropout_masks_at_both_ends():
    """With E = 0 the adapters add nothing: the gap is exactly 0 under dropout only if both
    forwards draw the same masks."""
    igu = _igu(dropout=0.3)
    for layer in igu.adapters.values():
        torch.nn.init.zeros_(layer.lora_E)
    igu.train()
    batch = token_batch(n=6, t=7)
    rows = torch.arange(6)
    assert float(loss_gap(igu, sequence_classification_row_loss, batch, rows)) == 0.0
    with torch.no_grad():
        twice = [float(mean_loss(sequence_classification_row_loss)(igu, batch)) for _ in range(2)]
    assert twice[0] != twice[1]  # the dropout is live


def test_accumulated_micro_batches_are_checked_on_their_mean_gap():
    """Two micro-batches, each loss / 2 (HF Trainer, Accelerate): the IG total is their mean."""
    batch = token_batch(n=8, t=7)
    igu = _igu(ig_steps=12, ig_residual=True)
    igu.train()
    for half in (slice(0, 4), slice(4, 8)):
        micro = {k: v[half] for k, v in batch.items()}
        (igu.training_loss(micro, sequence_classification_row_loss) / 2).backward()
    igu.update_and_allocate(0)
    assert igu.last_check.relative_residual < 1e-9


def _check(residual: float, gap: float = 1.0, nodes: int = 3) -> Completeness:
    return Completeness(step=0, nodes=nodes, ig_total=gap + residual, loss_gap=gap)


def _run(budget: NodeBudget, residual_at, windows: int) -> list[int]:
    """The node count after each of ``windows`` windows whose residual is ``residual_at(nodes)``."""
    counts = []
    for _ in range(windows):
        for _ in range(WINDOW):
            budget.observe(_check(residual_at(budget.nodes)))
        counts.append(budget.nodes)
    return counts


def test_the_node_budget_adds_nodes_while_they_cut_the_residual_and_stops_under_tolerance():
    halving = lambda n: 0.5 / 2 ** (n - START_NODES)  # noqa: E731  (a quadrature error)
    budget = NodeBudget(tolerance=0.1, max_nodes=8)
    for _ in range(WINDOW - 1):
        assert budget.observe(_check(0.5)) == START_NODES  # a window is judged whole
    assert _run(budget, halving, 6) == [4, 5, 6, 6, 6, 6]  # 0.0625 < 0.1, not < 0.1 * LOWER_AT
    assert _run(NodeBudget(tolerance=0.1, max_nodes=5), halving, 4) == [4, 5, 5, 5]  # max_nodes
    assert _run(NodeBudget(tolerance=0.1, max_nodes=8), lambda n: 0.1 * LOWER_AT / 2, 6) == [2, 1, 1, 1, 1, 1]


def test_a_node_that_does_not_cut_the_residual_is_taken_back_and_retried_later():
    """A residual that does not fall with more nodes is noise (dropout): the count goes back and
    stays under that ceiling for RETRY windows."""
    budget = NodeBudget(tolerance=0.1, max_nodes=8)
    counts = _run(budget, lambda n: 0.5, 2 + RETRY + 2)
    assert counts[:2] == [START_NODES + 1, START_NODES]
    assert counts[2 : 1 + RETRY] == [START_NODES] * (RETRY - 1)
    assert counts[1 + RETRY :] == [START_NODES + 1, START_NODES, START_NODES]


def test_the_window_weighs_residuals_by_their_gap():
    """sum |delta| / sum |gap|: a step with a tiny gap (its relative residual huge) does not
    decide alone."""
    budget = NodeBudget(tolerance=0.1, max_nodes=8)
    checks = [_check(1e-3, gap=1e-6)] + [_check(0.05, gap=1.0)] * (WINDOW - 1)
    for check in checks:
        budget.observe(check)
    assert checks[0].relative_residual > 100 and budget.nodes == START_NODES


@pytest.mark.parametrize(("tolerance", "expected"), [(1e-12, 6), (1e3, 1)])
def test_auto_climbs_to_close_the_residual_and_falls_when_it_is_loose(tolerance, expected, tmp_path):
    steps = 4 * WINDOW + 2  # three windows to climb from 3 to 6 nodes, one to spare
    igu = _igu(ig_steps="auto", ig_tolerance=tolerance, ig_max_steps=6, total_step=steps)
    batch = token_batch(n=6, t=7)
    rows = []
    for step in range(steps - 2):  # the scoring steps before the final phase
        _scoring_step(igu, batch, step)
        rows.append(allocation_metrics(igu, step, 0.0))
    assert igu.ig_nodes == expected
    nodes = [row["ig_nodes"] for row in rows]
    assert nodes[0] == START_NODES and nodes[-1] == expected
    assert all(abs(b - a) <= 1 for a, b in zip(nodes, nodes[1:]))
    assert all(row["ig_residual"] >= 0 for row in rows)
    igu.save_pretrained(tmp_path)
    again = IGUModel.from_pretrained(tiny_bert(torch.float64), tmp_path)
    assert again.node_budget == igu.node_budget


def test_auto_and_the_residual_refuse_rules_they_cannot_check():
    with pytest.raises(ValueError, match="ig_steps.*'auto'.*trapezoid"):
        IGULoraConfig(total_step=10, ig_steps="auto", ig_rule="trapezoid")
    with pytest.raises(ValueError, match="ig_residual.*alpha = 1"):
        IGULoraConfig(total_step=10, ig_residual=True, ig_rule="trapezoid")
    with pytest.raises(ValueError, match="ig_steps"):
        IGULoraConfig(total_step=10, ig_steps="fast")
    with pytest.raises(ValueError, match="ig_tolerance"):
        IGULoraConfig(total_step=10, ig_steps="auto", ig_tolerance=0)
