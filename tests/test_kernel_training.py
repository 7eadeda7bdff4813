"""A short IGU-LoRA run of a tiny model: the Triton backend reproduces the eager one."""

from __future__ import annotations

import pytest
import torch
from conftest import short_run_config, tiny_bert, token_batch

pytest.importorskip("triton")
from igulora import get_igu_model  # noqa: E402
from igulora.ig import ADAPTER_PARAMS  # noqa: E402

STEPS = 6


def _run(backend: str, monkeypatch, compact: bool):
    monkeypatch.setenv("IGULORA_BACKEND", backend)
    config = short_run_config(STEPS, tinit=1, ig_steps=3, ig_fraction=0.5, compact=compact)
    igu = get_igu_model(tiny_bert(seed=3), config)
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.5)
    history = []
    for step in range(STEPS):
        igu.training_loss(token_batch(n=4, t=5, seed=step)).backward()
        record = {"grads": {}, "ig": {}}
        for name, layer in igu.adapters.items():
            for p, buf in zip(ADAPTER_PARAMS, layer.ig_buffers or [None] * 3):
                grad = getattr(layer, p).grad  # None on an adapter compacted to 0 ranks
                record["grads"][f"{name}.{p}"] = None if grad is None else grad.clone()
                if buf is not None:
                    record["ig"][f"{name}.{p}"] = buf.clone()
        optimizer.step()
        record["pattern"] = igu.update_and_allocate(step, optimizer=optimizer)
        record["physical_ranks"] = sorted(layer.r for layer in igu.adapters.values())
        optimizer.zero_grad()
        history.append(record)
    return history, igu.rank_pattern


@pytest.mark.parametrize("compact", [False, True], ids=["masked", "compacted"])
def test_triton_training_run_matches_eager(monkeypatch, compact):
    """Masked ranks, or (compacted) the shrinking shapes, down to r = 1 or 0 on some adapter."""
    eager, eager_masks = _run("eager", monkeypatch, compact)
    kernel, kernel_masks = _run("triton", monkeypatch, compact)
    assert kernel_masks == eager_masks
    assert [r["physical_ranks"] for r in kernel] == [r["physical_ranks"] for r in eager]
    assert (min(kernel[-1]["physical_ranks"]) <= 1) == compact
    assert sum(map(sum, kernel_masks.values())) == 2 * 4
    for step, (k, e) in enumerate(zip(kernel, eager)):
        assert k["pattern"] == e["pattern"], step
        assert k["ig"].keys() == e["ig"].keys()
        for name in e["grads"]:
            if e["grads"][name] is None:
                assert k["grads"][name] is None, name
                continue
            torch.testing.assert_close(k["grads"][name], e["grads"][name], rtol=1e-4, atol=1e-6)
        for name in e["ig"]:
            torch.testing.assert_close(k["ig"][name], e["ig"][name], rtol=1e-4, atol=1e-7)
    assert any(r["ig"] for r in eager)
