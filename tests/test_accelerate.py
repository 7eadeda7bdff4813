"""igu.attach(optimizer): the allocation runs after every optimizer step that really runs.

An Accelerate loop with gradient accumulation (``accumulate``, no update_and_allocate call) keeps
the masks, weights and scores of the plain loop that calls update_and_allocate itself; a step a
GradScaler skips drops its IG; without a hook a forgotten call still raises. The 2-process gloo
case is tests/test_distributed.py's ``accelerate-hook``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import short_run_config, tiny_bert, token_batch

from igulora import get_igu_model

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

STEPS = 6  # tinit=1, tfinal=1: budget steps 2, 3, 4 prune, step 5 sets the final masks
ACCUMULATION = 2
SKIPPED = 1  # the step a GradScaler skips (a scoring step before the first reallocation)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerator keeps its state in process-wide singletons (gradient_accumulation_steps in
    GradientState, the device and mixed precision in AcceleratorState): every test starts and
    leaves with none, as accelerate.test_utils.AccelerateTestCase does."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _igu(dtype=torch.float64, **overrides):
    igu = get_igu_model(tiny_bert(dtype, seed=5), short_run_config(STEPS, tinit=1, tfinal=1, **overrides))
    igu.train()
    return igu


def _optimizer(igu):
    # AdamW: compaction slices its moments, through AcceleratedOptimizer's inner optimizer too
    return torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=0.05)


def _micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    batch = token_batch(8, 6, seed=step)
    size = 8 // ACCUMULATION
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(ACCUMULATION)]


def _loss(igu, batch, step, module=None):
    loss = igu.training_loss(batch, module=module)
    return loss * float("inf") if step == SKIPPED else loss  # inf/NaN gradients and IG buffers


def _snapshot(igu) -> dict:
    allocator = igu.allocator
    return {
        "pattern": igu.rank_pattern,
        "step": igu.step,
        "calls": igu._allocation_calls,
        "updates": (allocator.num_updates, allocator.skipped_updates),
        "physical": {n: layer.r for n, layer in igu.adapters.items()},
        "weights": {n: p.detach().clone() for n, p in igu.named_parameters() if p.requires_grad},
        "emas": {
            f"{table}.{k}": v.clone()
            for table in ("ibar", "ubar", "scores")
            for k, v in getattr(allocator, table).items()
        },
    }


def _assert_same_run(result: dict, reference: dict, rtol=1e-10, atol=1e-12) -> None:
    pattern = reference["pattern"]
    assert sum(map(sum, pattern.values())) < 4 * len(pattern)  # ranks were pruned: masks can differ
    assert any(r < 4 for r in reference["physical"].values())  # and compacted away
    for key in ("pattern", "step", "calls", "updates", "physical"):
        assert result[key] == reference[key], key
    for key in ("weights", "emas"):
        assert result[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            torch.testing.assert_close(result[key][name], value, rtol=rtol, atol=atol, msg=f"{key} {name}")


def _plain_run(attach: bool = False) -> dict:
    """Each micro-batch's loss divided by their number, one optimizer step per batch; with
    ``attach`` the hook allocates, otherwise the loop calls update_and_allocate itself."""
    igu = _igu()
    optimizer = _optimizer(igu)
    if attach:
        igu.attach(optimizer)
    for step in range(STEPS):
        for batch in _micro_batches(step):
            (igu.training_loss(batch) / ACCUMULATION).backward()
        optimizer.step()
        if not attach:
            igu.update_and_allocate(step, optimizer=optimizer)
        optimizer.zero_grad()
    return _snapshot(igu)


def _accelerate_loop(attach: bool):
    """(the model, its step after every micro-batch) of an Accelerate loop that never calls
    update_and_allocate."""
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    igu = _igu()
    model, optimizer = accelerator.prepare(igu, _optimizer(igu))
    if attach:
        igu.attach(optimizer)
    steps_seen = []
    for step in range(STEPS):
        for batch in _micro_batches(step):
            with accelerator.accumulate(model):
                accelerator.backward(igu.training_loss(batch, module=model))
                optimizer.step()
                optimizer.zero_grad()
            steps_seen.append(igu.step)
    return igu, steps_seen


def test_an_accelerate_loop_with_accumulation_and_attach_matches_the_plain_loop():
    igu, steps_seen = _accelerate_loop(attach=True)
    # one allocation per optimizer step, after the micro-batch that syncs gradients
    assert steps_seen == [s + i for s in range(STEPS) for i in range(ACCUMULATION)]
    reference = _plain_run()
    assert reference["calls"] == reference["step"] == STEPS
    _assert_same_run(_snapshot(igu), reference)


def test_a_plain_loop_with_attach_matches_the_explicit_calls():
    _assert_same_run(_plain_run(attach=True), _plain_run(), rtol=0, atol=0)


def _scaled_run(attach: bool, accelerate: bool = False) -> tuple[dict, list[dict]]:
    """fp32 with a GradScaler (doubling every step, so a scale left in the IG would show); step
    SKIPPED's loss is inf. The hook (``attach``; through Accelerate with ``accelerate``) against
    the documented explicit call between scaler.step and scaler.update. Snapshots after each step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    igu = _igu(torch.float32)
    optimizer = _optimizer(igu)
    if accelerate:
        accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
        accelerator.scaler = scaler  # what fp16 on a GPU sets up (CPU fp16 has no scaler)
        model, optimizer = accelerator.prepare(igu, optimizer)
        assert optimizer.scaler is scaler
    if attach:
        igu.attach(optimizer, grad_scaler=None if accelerate else scaler)
    history = []
    for step in range(STEPS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if accelerate:
                for batch in _micro_batches(step):
                    with accelerator.accumulate(model):
                        accelerator.backward(_loss(igu, batch, step, module=model))
                        optimizer.step()
                        optimizer.zero_grad()
                assert optimizer.step_was_skipped == (step == SKIPPED)
            else:
                for batch in _micro_batches(step):
                    scaler.scale(_loss(igu, batch, step) / ACCUMULATION).backward()
                scaler.step(optimizer)
                if not attach:
                    igu.update_and_allocate(step, grad_scaler=scaler, optimizer=optimizer)
                scaler.update()
                optimizer.zero_grad()
        # the skipped step's IG never reached the scores (that would warn: non-finite importance)
        assert not [w for w in caught if "non-finite importance" in str(w.message)]
        history.append(_snapshot(igu))
    assert scaler.get_scale() == 2.0 ** (10 + STEPS - 2)  # doubled every step but one, halved once
    return history[-1], history


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerate"])
def test_a_step_the_grad_scaler_skips_is_a_skipped_score_update(accelerate):
    result, history = _scaled_run(attach=True, accelerate=accelerate)
    reference, reference_history = _scaled_run(attach=False)
    before, skipped, after = history[SKIPPED - 1], history[SKIPPED], history[SKIPPED + 1]
    # one allocation call for the skipped step (the scaler.update wrapper; the optimizer step and
    # its hook never ran), counted as skipped, the EMAs and weights left alone
    assert skipped["step"] == skipped["calls"] == SKIPPED + 1
    assert skipped["updates"] == (before["updates"][0], 1)
    for key in ("emas", "weights"):
        assert before[key].keys() == skipped[key].keys()
        for name, value in before[key].items():
            assert torch.equal(skipped[key][name], value), name
    # the next step scores from its own IG (inf/NaN in it would skip or poison the update)
    assert after["updates"] == (before["updates"][0] + 1, 1)
    assert all(torch.isfinite(v).all() for v in after["emas"].values())
    for ours, theirs in zip(history, reference_history):
        assert ours["step"] == theirs["step"] and ours["updates"] == theirs["updates"]
        assert ours["pattern"] == theirs["pattern"]
        for name, value in theirs["emas"].items():
            torch.testing.assert_close(ours["emas"][name], value, rtol=1e-6, atol=1e-12, msg=name)
    _assert_same_run(result, reference, rtol=1e-6, atol=1e-7)


def _unallocated_steps(igu, optimizer, steps: int, scaler=None) -> None:
    batch = token_batch(4, 6)
    for _ in range(steps):
        loss = igu.training_loss(batch)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()


def test_a_forgotten_call_still_raises_where_no_hook_is_attached():
    igu = _igu()
    optimizer = _optimizer(igu)
    limit = igu.igu_config.tinit + igu.igu_config.delta_t + 1
    with pytest.raises(RuntimeError, match=r"update_and_allocate\(\) was never called"):
        _unallocated_steps(igu, optimizer, limit + 2)
    assert igu._guard.steps == limit + 1

    igu = _igu()
    optimizer = _optimizer(igu)
    igu.attach(optimizer)
    _unallocated_steps(igu, optimizer, STEPS)
    assert igu.step == igu._allocation_calls == STEPS


def test_a_forgotten_call_still_raises_with_accelerate_where_no_hook_is_attached():
    with pytest.raises(RuntimeError, match=r"update_and_allocate\(\) was never called"):
        _accelerate_loop(attach=False)


def test_detach_stops_the_allocation_and_attaching_again_replaces_the_hook():
    scaler = torch.amp.GradScaler("cpu")
    igu = _igu()
    optimizer = _optimizer(igu)
    igu.attach(optimizer, grad_scaler=scaler)
    igu.attach(optimizer, grad_scaler=scaler)  # replaces the first: one allocation per step
    _unallocated_steps(igu, optimizer, 2, scaler)
    assert igu.step == igu._allocation_calls == 2
    assert "update" in vars(scaler)  # the skip wrapper
    igu.detach()
    assert "update" not in vars(scaler) and not optimizer._optimizer_step_post_hooks
    _unallocated_steps(igu, optimizer, 2, scaler)
    assert igu.step == igu._allocation_calls == 2


def test_calling_update_and_allocate_while_attached_raises_instead_of_allocating_twice():
    igu = _igu()
    optimizer = _optimizer(igu)
    igu.attach(optimizer)
    _unallocated_steps(igu, optimizer, 1, None)
    with pytest.raises(RuntimeError, match="already allocates"):
        igu.update_and_allocate(1, optimizer=optimizer)
    assert igu.step == igu._allocation_calls == 1
