"""No host sync per adapter (issue #32): the reads back to the host in one training step do not
grow with the number of adapters, on scoring and plain steps, allocating or not, eager and Triton
backends.

Counted on the CPU with ``bench.host_syncs.count_syncs``: every tensor counts as if it were on a
GPU, so the few reads the allocator makes of its host copies count too (a constant number).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import lm_batch, tiny_llama

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.host_syncs import count_syncs, fused_adamw, training_step  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("scoring", "plain")  # even and odd steps under the default ig_every=2
TINIT = 3  # steps 0-3 do not allocate, later ones do (delta_t=1)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def tiny_igu(layers: int, **config):
    """A tiny Llama with an adapter on each of the 7 projections of each layer."""
    defaults = dict(target_modules=PROJECTIONS, init_r=4, total_step=100, tinit=TINIT)
    igu = get_igu_model(tiny_llama(layers=layers), IGULoraConfig(**{**defaults, **config}))
    igu.train()
    return igu


def step_syncs(igu, counted: range) -> dict[str, Counter]:
    """Reads back in each of the ``counted`` steps (after the steps before them), by step kind."""
    optimizer = fused_adamw(igu)
    batch = lm_batch()
    counts = {}
    for step in range(counted.stop):
        with count_syncs() as syncs:
            training_step(igu, optimizer, batch, causal_lm_row_loss, step)
        if step in counted:
            counts[f"{KINDS[step % 2]}{', allocating' if step > TINIT else ''}"] = syncs
    return counts


def assert_same_counts(small: dict[str, Counter], large: dict[str, Counter], what: str) -> None:
    for name in small:
        assert sum(large[name].values()) == sum(small[name].values()), (
            f"{what}, {name} step: 14 adapters {dict(small[name])}, 28 adapters {dict(large[name])}"
        )


def masked_steady_state(layers: int) -> dict[str, Counter]:
    """One rank of each adapter pruned (masked: AdaLoRA's orthogonality term over every rank keeps
    compaction off) and a budget that keeps the rest, so allocation steps change no mask: a
    scoring and a plain step before ``tinit`` and after, past a warm-up pair."""
    igu = tiny_igu(layers, target_r=3, orth_reg_ranks="all")
    with torch.no_grad():
        for layer in igu.adapters.values():
            layer.rank_mask[0] = False
    return step_syncs(igu, range(2, 6))


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
def test_host_syncs_do_not_grow_with_adapters(backend, monkeypatch):
    monkeypatch.setenv("IGULORA_BACKEND", backend)
    assert_same_counts(masked_steady_state(2), masked_steady_state(4), backend)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
def test_allocation_host_syncs_do_not_grow_with_adapters(backend, compact, monkeypatch):
    """Allocation steps that prune, masked or compacted: the Triton op's operands are rebuilt
    for each changed mask without reading it back."""
    monkeypatch.setenv("IGULORA_BACKEND", backend)

    def counts(layers: int) -> dict[str, Counter]:
        igu = tiny_igu(layers, target_r=2, orth_reg_ranks="live" if compact else "all")  # the term on
        pruned = step_syncs(igu, range(TINIT + 1, TINIT + 3))
        assert sum(igu.active_ranks.values()) < 4 * len(igu.adapters)
        return pruned

    assert_same_counts(counts(2), counts(4), "compacted" if compact else "masked")


def test_count_syncs_sees_reads_back_and_nothing_else():
    x = torch.tensor([1.0, -2.0, 3.0])
    with count_syncs() as counts:
        y = (x * 2 + 1).relu().sum(0)
        float(y), bool(x.all()), x.tolist()
        x.nonzero(), x[x > 0], torch.equal(x, y)
    assert counts == {
        "_local_scalar_dense": 2,
        "Tensor.tolist": 1,
        "nonzero": 1,
        "index (bool index)": 1,
        "equal": 1,
    }
