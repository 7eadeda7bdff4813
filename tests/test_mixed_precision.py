"""Autocast (bf16) and fp16 loss scaling: the step the fp32 run takes, within the dtype's error."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import (
    lm_batch,
    randomize_adapters,
    relative_error,
    step_gradients,
    tiny_bert,
    tiny_llama,
    token_batch,
)

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model, sequence_classification_row_loss

CASES = {
    "llama": (tiny_llama, causal_lm_row_loss, lm_batch),
    "bert": (tiny_bert, sequence_classification_row_loss, token_batch),
}
BF16_RTOL = 4e-2  # bf16 keeps 8 mantissa bits (unit roundoff 2^-9); a few dozen of them per step
# The Triton kernels also round the fp32 adapter factors and the row factors to bf16 for the
# tensor cores (as eager bf16 LoRA does); the eager reference keeps its products in fp32.
BF16_RTOL_KERNELS = 8e-2


def _igu(factory, **overrides):
    config = dict(
        init_r=3, target_r=1, total_step=10, ig_every=2, ig_window=None, ig_fraction=0.5, ig_steps=2
    )
    igu = get_igu_model(factory(), IGULoraConfig(**{**config, **overrides}))
    randomize_adapters(igu)
    return igu


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("scoring", [True, False], ids=["scoring", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_autocast_step_matches_the_fp32_step(case, scoring, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("IGULORA_BACKEND", backend)
    factory, row_loss_fn, make_batch = CASES[case]
    batch = make_batch()
    fp32 = step_gradients(_igu(factory), batch, row_loss_fn, scoring)
    bf16_region = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    bf16 = step_gradients(_igu(factory), batch, row_loss_fn, scoring, context=bf16_region)
    for result, reference in zip(bf16, fp32):
        if not scoring and result is bf16[1]:
            continue  # no IG buffers on a plain step
        assert all(v.dtype == torch.float32 for v in result.values())  # adapters stay fp32
        error = relative_error(result, reference)
        assert 0 < error < (BF16_RTOL if backend == "eager" else BF16_RTOL_KERNELS)  # > 0: bf16 ran


def _scaled_run(scaler, steps=6, overflow_at=None):
    """A short run with fp16-style loss scaling; ``overflow_at`` puts an inf in one gradient."""
    igu = _igu(tiny_bert, ig_every=1, tinit=1, tfinal=1, modules_to_save=["classifier"])
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.1)
    history = []
    for step in range(steps):
        igu.train()
        loss = igu.training_loss(token_batch(seed=step))
        (loss if scaler is None else scaler.scale(loss)).backward()
        if step == overflow_at:
            next(iter(igu.adapters.values())).lora_A.grad[0, 0] = float("inf")
        if scaler is None:
            optimizer.step()
            igu.update_and_allocate(step)
        else:
            scaler.step(optimizer)
            igu.update_and_allocate(step, grad_scaler=scaler)
            scaler.update()
        optimizer.zero_grad()
        history.append({k: v.clone() for k, v in igu.allocator.ibar.items()})
    return igu, history


def test_grad_scaler_ig_is_unscaled_with_the_gradients():
    plain, plain_history = _scaled_run(None)
    # growth_interval=1: the scale doubles every step, so a scale left in the IG would show.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled, scaled_history = _scaled_run(scaler)
    assert scaler.get_scale() == 2.0**16
    assert plain.rank_pattern == scaled.rank_pattern
    for ours, reference in zip(scaled_history, plain_history):
        for name in reference:  # powers of two scale and unscale exactly
            torch.testing.assert_close(ours[name], reference[name], rtol=1e-6, atol=0)
    for (name, p), q in zip(scaled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_a_step_the_scaler_skips_skips_the_score_update():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    igu, history = _scaled_run(scaler, steps=4, overflow_at=2)
    assert scaler.get_scale() == 2.0**7  # the scaler saw the overflow and backed off
    assert igu.allocator.skipped_updates == 1 and igu.allocator.num_updates == 3  # steps 0, 1, 3
    for name in history[1]:
        assert torch.equal(history[2][name], history[1][name])  # step 2 left the EMAs alone
        assert not torch.equal(history[3][name], history[2][name])


def test_grad_scaler_read_after_update_is_an_error():
    igu = _igu(tiny_bert, ig_every=1)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.1)
    igu.train()
    scaler.scale(igu.training_loss(token_batch())).backward()
    scaler.step(optimizer)
    scaler.update()
    with pytest.raises(RuntimeError, match=r"before scaler.update\(\)"):
        igu.update_and_allocate(0, grad_scaler=scaler)


def test_trainer_fp16_path_unscales_ig_and_skips_what_accelerate_skipped(tmp_path):
    """IGUCallback attaches the allocation to the Trainer's AcceleratedOptimizer and its
    GradScaler (fp16 on a GPU; set by hand here): the IG is unscaled by the scale of the backward,
    and a step the scaler skips leaves the scores alone."""
    from types import SimpleNamespace

    import transformers

    from igulora.integrations.trainer import IGUCallback, IGUTrainer

    batch = token_batch()
    reference = _igu(tiny_bert, ig_every=1)
    reference.train()
    reference.training_loss(batch).backward()
    reference.update_and_allocate(0)

    # masked: step 1's scheduled allocation would compact the EMAs; the skip is about their values
    igu = _igu(tiny_bert, ig_every=1, compact=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = IGUTrainer(igu, args=args)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # as fp16 on a GPU
    trainer.create_optimizer()
    optimizer = trainer.accelerator.prepare(trainer.optimizer)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, IGUCallback))
    callback.on_train_begin(args, SimpleNamespace(max_steps=10), None, optimizer=optimizer)
    igu.train()
    trainer.accelerator.backward(trainer.compute_loss(igu, batch))  # scaled by 2^10
    optimizer.step()
    assert igu.step == 1 and igu.allocator.num_updates == 1
    for name, value in reference.allocator.ibar.items():
        torch.testing.assert_close(igu.allocator.ibar[name], value, rtol=1e-6, atol=0)

    optimizer.zero_grad()
    before = {k: v.clone() for k, v in igu.allocator.ibar.items()}
    trainer.accelerator.backward(trainer.compute_loss(igu, batch) * float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen as the scaler's skip, not as non-finite importance
        optimizer.step()  # the Trainer's fused AdamW runs and skips its update inside
    assert optimizer.optimizer.defaults["fused"] and igu.step == 2
    assert igu.allocator.skipped_updates == 1
    assert all(torch.equal(igu.allocator.ibar[k], v) for k, v in before.items())
