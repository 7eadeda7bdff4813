"""Property tests (hypothesis): kernels = eager on random shapes and masks, exact budgets,
byte-stable save -> load -> save."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_three_way, tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igu_kernels import cpp, reference
from igulora import IGULoraConfig, IGUModel, get_igu_model
from igulora.ig import ADAPTER_PARAMS

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def lora_case(draw):
    n, t = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d_in, d_out, r = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 6))
    mask = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=r, max_size=r)))
    seed = draw(st.integers(0, 2**16))
    return n, t, d_in, d_out, r, mask, seed


@SETTINGS
@given(lora_case())
def test_triton_low_rank_linear_equals_eager(case):
    pytest.importorskip("triton")
    from igu_kernels import lora_linear

    n, t, d_in, d_out, r, mask, seed = case
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, t, d_in, generator=g, dtype=torch.float64)
    params = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((r, d_in), (r,), (d_out, r))]
    vectors = [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3)]
    gy = torch.randn(n, t, d_out, generator=g, dtype=torch.float64)
    mask = None if mask is None else torch.tensor(mask)

    def run(impl, dtype):
        x = u.to(dtype).requires_grad_()
        A, E, B = (p.to(dtype).requires_grad_() for p in params)
        buffers = tuple(torch.zeros_like(p) for p in (A, E, B))
        y = impl.batched_ig_lora_delta(x, A, E, B, mask, 0.5, *(v.to(dtype) for v in vectors), buffers)
        (y * gy.to(y.dtype)).sum().backward()
        return [y.detach(), x.grad, A.grad, E.grad, B.grad, *buffers]

    for k, e, x in zip(
        run(lora_linear, torch.float32), run(reference, torch.float32), run(reference, torch.float64)
    ):
        assert_three_way(k, e, x)


@SETTINGS
@given(st.integers(0, 3000), st.sampled_from(["snr", "product", "stable_magnitude"]), st.integers(0, 2**16))
def test_cpp_and_triton_score_updates_equal_eager(n, mode, seed):
    g = torch.Generator().manual_seed(seed)
    ig, ibar, ubar = torch.randn(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g)
    kw = dict(beta1=0.8, beta2=0.6, score=mode, eps=1e-6)
    exact = reference.score_update(ig.double(), ibar.double(), ubar.double(), **kw)
    eager = reference.score_update(ig, ibar.clone(), ubar.clone(), **kw)
    impls = [cpp] if cpp.load() else []
    try:
        from igu_kernels import score

        impls.append(score)
    except ImportError:
        pass
    for impl in impls:
        assert_three_way(impl.score_update(ig, ibar.clone(), ubar.clone(), **kw), eager, exact)


@SETTINGS
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.integers(0, 30),
    st.sampled_from(["triplets", "parameters"]),
    st.integers(0, 2**16),
)
def test_allocator_keeps_exactly_the_budget(ranks, budget, unit, seed):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(3 + i, 2 + i) for i in range(len(ranks))]
    model = torch.nn.Sequential(*layers)
    config = IGULoraConfig(
        target_modules="all-linear", init_r=max(ranks), target_r=0, total_step=10, budget_unit=unit
    )
    igu = get_igu_model(model, config)
    for layer in igu.adapters.values():  # integer-valued importance: many exact ties
        layer.ig_buffers = tuple(torch.randint(0, 3, getattr(layer, p).shape).float() for p in ADAPTER_PARAMS)
    igu.allocator.update_scores()
    scale = 1 if unit == "triplets" else 8
    pattern = igu.allocator.mask_to_budget(budget * scale)
    costs = {n: igu.allocator.triplet_cost(layer) for n, layer in igu.adapters.items()}
    spent = sum(costs[n] * sum(m) for n, m in pattern.items())
    total = sum(costs[n] * layer.r for n, layer in igu.adapters.items())
    if unit == "triplets":
        assert spent == min(budget, total)
    else:
        assert spent <= budget * scale
        scores = igu.allocator.triplet_scores()
        kept_min = min(
            (float(scores[n][k]) for n, m in pattern.items() for k, on in enumerate(m) if on), default=None
        )
        pruned = [
            (float(scores[n][k]), costs[n]) for n, m in pattern.items() for k, on in enumerate(m) if not on
        ]
        if kept_min is not None:  # a strictly better pruned triplet would have come first in line
            assert all(s <= kept_min for s, _ in pruned)


@SETTINGS
@given(st.integers(0, 2**16), st.lists(st.booleans(), min_size=3, max_size=3))
def test_save_load_save_is_byte_stable(tmp_path_factory, seed, mask):
    torch.manual_seed(seed)
    config = IGULoraConfig(
        target_modules=["query", "value"], modules_to_save=["classifier"], init_r=3, target_r=1, total_step=10
    )
    igu = get_igu_model(tiny_bert(), config)
    with torch.no_grad():
        for layer in igu.adapters.values():
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.normal_()
            layer.rank_mask.copy_(torch.tensor(mask))
            layer.ig_buffers = tuple(torch.randn_like(getattr(layer, p)) for p in ADAPTER_PARAMS)
    igu.allocator.update_scores()
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    if not any(mask):
        with pytest.raises(RuntimeError, match="pruned to rank 0"):
            igu.save_pretrained(first)
        return
    igu.save_pretrained(first)
    IGUModel.from_pretrained(tiny_bert(), first).save_pretrained(second)
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name
