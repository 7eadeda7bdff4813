"""RankAllocator: EMAs and scores in closed form, the cubic budget, exact budgets, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igulora import IGULoraConfig, get_igu_model
from igulora.ig import ADAPTER_PARAMS as PARAMS


def _igu(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    defaults = dict(target_modules="all-linear", init_r=4, target_r=2, total_step=20, tinit=2, tfinal=4)
    return get_igu_model(model, IGULoraConfig(**{**defaults, **kw}))


def _feed(igu, values):
    """Put ``values[name]`` (one tensor per adapter param) into the IG buffers."""
    for name, layer in igu.adapters.items():
        layer.ig_buffers = tuple(values[f"{name}.{p}"].clone() for p in PARAMS)


def _random_ig(igu, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.{p}": torch.randn(getattr(layer, p).shape, generator=g)
        for name, layer in igu.adapters.items()
        for p in PARAMS
    }


def test_cubic_budget_schedule():
    igu = _igu(delta_t=3)
    alloc = igu.allocator
    b0, bT = 3 * 4, 3 * 2
    assert (alloc.init_budget, alloc.target_budget) == (b0, bT)
    assert alloc.budget_schedule(0) == (b0, False) and alloc.budget_schedule(2) == (b0, False)
    for step in range(3, 17):
        budget, now = alloc.budget_schedule(step)
        assert budget == int((b0 - bT) * (1 - (step - 2) / (20 - 4 - 2)) ** 3 + bT)
        assert now == (step % 3 == 0)
    assert alloc.budget_schedule(17) == (bT, True)


def test_ema_recursions_and_scores_in_closed_form():
    closed_forms = {
        "snr": lambda i, u: (i + 1e-3) / (u + 1e-3),
        "product": lambda i, u: i * u,
        "stable_magnitude": lambda i, u: i * i / (i + u + 1e-3),
    }
    for score, closed_form in closed_forms.items():
        igu = _igu(score=score, beta1=0.7, beta2=0.6, score_eps=1e-3)
        seq = [_random_ig(igu, s) for s in range(3)]
        ibar = {k: torch.zeros_like(v) for k, v in seq[0].items()}
        ubar = {k: torch.zeros_like(v) for k, v in seq[0].items()}
        for values in seq:
            _feed(igu, values)
            assert igu.allocator.update_scores()
            for k, v in values.items():
                ibar[k] = 0.7 * ibar[k] + 0.3 * v.abs()
                ubar[k] = 0.6 * ubar[k] + 0.4 * (v.abs() - ibar[k]).abs()
        for k in ibar:
            torch.testing.assert_close(igu.allocator.ibar[k], ibar[k])
            torch.testing.assert_close(igu.allocator.ubar[k], ubar[k])
            torch.testing.assert_close(igu.allocator.scores[k], closed_form(ibar[k], ubar[k]))
        triplets = igu.allocator.triplet_scores()
        for name in igu.adapters:
            s = {p: igu.allocator.scores[f"{name}.{p}"] for p in PARAMS}
            torch.testing.assert_close(
                triplets[name], s["lora_E"] + s["lora_A"].mean(1) + s["lora_B"].mean(0)
            )


def test_keeps_exactly_the_budget_even_with_ties():
    igu = _igu()
    _feed(igu, {k: torch.ones_like(v) for k, v in _random_ig(igu, 0).items()})
    igu.allocator.update_scores()
    assert len({float(s) for t in igu.allocator.triplet_scores().values() for s in t}) <= 3
    for budget in (0, 1, 5, 7, 12, 50):
        for layer in igu.adapters.values():
            layer.rank_mask.fill_(True)  # each budget from all triplets (pruned ones never return)
        pattern = igu.allocator.mask_to_budget(budget)
        assert sum(sum(m) for m in pattern.values()) == min(budget, 12)


def test_global_threshold_keeps_the_highest_scores():
    igu = _igu()
    _feed(igu, _random_ig(igu, 1))
    igu.allocator.update_scores()
    scores = igu.allocator.triplet_scores()
    pattern = igu.allocator.mask_to_budget(5)
    kept = [float(s) for n in scores for s, m in zip(scores[n], pattern[n]) if m]
    pruned = [float(s) for n in scores for s, m in zip(scores[n], pattern[n]) if not m]
    assert len(kept) == 5 and min(kept) >= max(pruned)
    assert igu.active_ranks == {n: sum(m) for n, m in pattern.items()}
    assert set(igu.allocator.layer_scores()) == set(igu.adapters)


def test_budget_in_parameters():
    igu = _igu(budget_unit="parameters", score="product")  # one SNR update ties every element
    costs = {n: layer.in_features + layer.out_features + 1 for n, layer in igu.adapters.items()}
    assert igu.allocator.init_budget == 4 * sum(costs.values())
    _feed(igu, _random_ig(igu, 2))
    igu.allocator.update_scores()
    scores = igu.allocator.triplet_scores()
    budget = 40
    pattern = igu.allocator.mask_to_budget(budget)
    spent = sum(costs[n] * sum(m) for n, m in pattern.items())
    assert spent <= budget
    ranked = sorted(((float(s), n) for n in scores for s in scores[n]), reverse=True)
    n_kept = sum(sum(m) for m in pattern.values())
    assert spent + costs[ranked[n_kept][1]] > budget  # the next triplet in line would not fit


def test_full_schedule_ends_at_target_and_freezes_masks():
    igu = _igu(delta_t=2)
    for step in range(20):
        _feed(igu, _random_ig(igu, step))
        igu.update_and_allocate(step)
        if step == 16:  # total_step - tfinal: the final allocation
            frozen = igu.rank_pattern
            ibar = {k: v.clone() for k, v in igu.allocator.ibar.items()}
    assert sum(igu.active_ranks.values()) == 3 * 2
    assert igu.rank_pattern == frozen
    assert all(torch.equal(ibar[k], v) for k, v in igu.allocator.ibar.items())


def test_zero_mode_zeroes_pruned_singular_values():
    igu = _igu(prune_mode="zero")
    with torch.no_grad():
        for layer in igu.adapters.values():
            layer.lora_E.fill_(1.0)
    _feed(igu, _random_ig(igu, 0))
    igu.allocator.update_scores()
    igu.allocator.mask_to_budget(6)
    for layer in igu.adapters.values():
        assert torch.equal(layer.lora_E != 0, layer.rank_mask)
        assert layer.forward_mask() is None


def test_non_finite_importance_is_skipped_with_a_warning():
    igu = _igu()
    _feed(igu, _random_ig(igu, 0))
    igu.allocator.update_scores()
    before = {k: v.clone() for k, v in igu.allocator.ibar.items()}
    bad = _random_ig(igu, 1)
    next(iter(bad.values()))[0, 0] = float("nan")
    _feed(igu, bad)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not igu.allocator.update_scores()
    assert igu.allocator.skipped_updates == 1 and igu.allocator.num_updates == 1
    assert all(torch.equal(before[k], v) for k, v in igu.allocator.ibar.items())


def test_gradient_rule_reads_theta_times_grad():
    igu = _igu(ig_rule="gradient", score="product")
    x = torch.randn(7, 6)
    with torch.no_grad():
        for layer in igu.adapters.values():
            layer.lora_E.fill_(0.5)
    igu(x).pow(2).sum().backward()
    assert igu.allocator.update_scores()
    for name, layer in igu.adapters.items():
        for p in PARAMS:
            param = getattr(layer, p)
            torch.testing.assert_close(igu.allocator.ibar[f"{name}.{p}"], 0.15 * (param * param.grad).abs())


def test_state_dict_round_trip():
    igu = _igu()
    for s in range(3):
        _feed(igu, _random_ig(igu, s))
        igu.allocator.update_scores()
    other = _igu()
    other.allocator.load_state_dict(igu.allocator.state_dict())
    for name, t in igu.allocator.triplet_scores().items():
        torch.testing.assert_close(other.allocator.triplet_scores()[name], t)
    assert other.allocator.num_updates == 3
    state = igu.allocator.state_dict()
    state["ibar"]["2.lora_A"] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"ibar\['2.lora_A'\] has shape"):
        other.allocator.load_state_dict(state)


@pytest.mark.parametrize("start, first", [(0, 0), (3, 3), ("tinit", 2)])
def test_orthogonality_term_enters_the_loss_from_orth_reg_start(start, first):
    """The training loss is the task's before step ``first`` and the task's plus the weighted term
    from it on (``"tinit"``: the end of the initial phase, 2 here)."""
    igu = _igu(orth_reg_weight=0.3, orth_reg_start=start, ig_rule="gradient")
    assert igu.igu_config.orth_reg_from == first
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    batch = {"x": x, "y": y}

    def row_loss(module, b):
        return (module(b["x"]) - b["y"]).pow(2).sum(dim=1), torch.full((8,), 3.0)

    for step in range(5):
        igu.step = step
        task = (igu(x) - y).pow(2).mean()
        expected = task + 0.3 * igu.orthogonality_loss() if step >= first else task
        torch.testing.assert_close(igu.training_loss(batch, row_loss), expected)


def test_orthogonality_loss():
    igu = _igu()
    with torch.no_grad():
        for layer in igu.adapters.values():
            q, _ = torch.linalg.qr(torch.randn(max(layer.in_features, layer.out_features), layer.r))
            layer.lora_A.copy_(q[: layer.in_features].t() if layer.in_features >= layer.r else 0)
            layer.lora_B.zero_()
    # B = 0 gives ||B^T B - I|| = sqrt(r) per adapter; orthonormal A rows give 0 where in >= r
    expected = []
    for layer in igu.adapters.values():
        a_term = torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.t() - torch.eye(layer.r))
        expected.append(a_term + layer.r**0.5)
    torch.testing.assert_close(igu.orthogonality_loss(), torch.stack(expected).mean())
