"""IGUTrainer (Hugging Face) and the guard against a forgotten update_and_allocate()."""

from __future__ import annotations

import pytest
import torch
from conftest import short_run_config, tiny_bert, token_batch

from igulora import get_igu_model

transformers = pytest.importorskip("transformers")
from igulora.trainer import IGUTrainer  # noqa: E402

STEPS = 8


def _config(**kw):
    return short_run_config(STEPS, **kw)


def _dataset(n=64):
    batch = token_batch(n=n, t=6, seed=7)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _args(tmp_path, batch_size, accumulation, **kw):
    """A short constant-lr CPU run of STEPS optimizer steps, nothing saved."""
    return transformers.TrainingArguments(
        **{
            "output_dir": str(tmp_path),
            "max_steps": STEPS,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "report_to": [],
            "save_strategy": "no",
            "logging_strategy": "no",
            "use_cpu": True,
            "seed": 0,
            **kw,
        }
    )


def _train(tmp_path, batch_size, accumulation, **kw):
    igu = get_igu_model(tiny_bert(torch.float64, seed=2), _config(**kw))
    trainer = IGUTrainer(igu, args=_args(tmp_path, batch_size, accumulation), train_dataset=_dataset())
    trainer.train()
    return igu


def test_trainer_allocates_every_step_and_accumulation_matches_a_big_batch(tmp_path):
    accumulated = _train(tmp_path / "a", batch_size=4, accumulation=2)
    big = _train(tmp_path / "b", batch_size=8, accumulation=1)
    assert accumulated.step == STEPS and accumulated.allocator.num_updates == STEPS - 2
    assert sum(accumulated.active_ranks.values()) == 2 * len(accumulated.adapters)
    assert accumulated.rank_pattern == big.rank_pattern
    for (name, p), q in zip(accumulated.named_parameters(), big.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_trainer_rejects_a_plain_model(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="needs an IGUModel"):
        IGUTrainer(tiny_bert(), args=args)


def test_forgetting_update_and_allocate_fails_loudly():
    igu = get_igu_model(tiny_bert(), _config(tinit=2, delta_t=3))
    igu.train()
    optimizer = torch.optim.SGD([p for p in igu.parameters() if p.requires_grad], lr=0.1)
    batch = token_batch()
    with pytest.raises(RuntimeError, match=r"update_and_allocate\(\) was never called"):
        for _ in range(10):
            igu.training_loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert igu._updates_seen == 2 + 3 + 2


def _lm_trainer_run(tmp_path, checkpointing: bool):
    from conftest import lm_batch, tiny_llama

    from igulora import IGULoraConfig, causal_lm_row_loss

    config = IGULoraConfig(init_r=4, target_r=2, total_step=STEPS, tinit=2, tfinal=2, ig_every=1)
    igu = get_igu_model(tiny_llama(seed=3), config)
    batch = lm_batch(n=32, t=8, seed=5)
    args = _args(
        tmp_path,
        2,
        2,
        gradient_checkpointing=checkpointing,
        bf16=True,
        logging_strategy="steps",
        logging_steps=1,
    )
    dataset = [{k: v[i] for k, v in batch.items()} for i in range(32)]
    trainer = IGUTrainer(igu, args=args, train_dataset=dataset, row_loss_fn=causal_lm_row_loss)
    trainer.train()
    return igu, trainer


def test_llm_trainer_with_bf16_checkpointing_and_accumulation(tmp_path):
    peft = pytest.importorskip("peft")
    igu, trainer = _lm_trainer_run(tmp_path / "a", checkpointing=True)
    assert igu.is_gradient_checkpointing and igu.step == STEPS
    assert igu.allocator.num_updates == STEPS - 2
    assert sum(igu.active_ranks.values()) == 2 * len(igu.adapters)  # the final budget
    reference, _ = _lm_trainer_run(tmp_path / "b", checkpointing=False)
    assert igu.rank_pattern == reference.rank_pattern
    for (name, p), q in zip(igu.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # The logged loss is the training loss (node rows excluded): about ln(vocab) here.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and max(losses) < 1.5 * torch.log(torch.tensor(61.0)).item()

    igu.save_pretrained(tmp_path / "adapter")
    from conftest import lm_batch, tiny_llama

    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "adapter").eval()
    batch = lm_batch()
    igu.eval()
    with torch.no_grad():  # igu.model: Accelerate left igu.forward wrapped in bf16 autocast
        torch.testing.assert_close(loaded(**batch).logits, igu.model(**batch).logits, rtol=1e-5, atol=1e-5)
