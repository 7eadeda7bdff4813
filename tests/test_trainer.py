"""IGUTrainer (Hugging Face) and the guard against a forgotten update_and_allocate()."""

from __future__ import annotations

import pytest
import torch
from conftest import short_run_config, tiny_bert, token_batch

from igulora import get_igu_model

transformers = pytest.importorskip("transformers")
from igulora.integrations.trainer import IGUTrainer  # noqa: E402

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
    assert {n: layer.r for n, layer in accumulated.adapters.items()} == accumulated.active_ranks  # compacted
    assert accumulated.rank_pattern == big.rank_pattern
    for (name, p), q in zip(accumulated.named_parameters(), big.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_training_logs_carry_the_allocation_and_the_completeness_check(tmp_path):
    igu = get_igu_model(tiny_bert(torch.float64, seed=2), _config(ig_residual=True))
    args = _args(tmp_path, 8, 1, logging_strategy="steps", logging_steps=1)
    trainer = IGUTrainer(igu, args=args, train_dataset=_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS
    assert [entry["active_rank"] for entry in logs][-1] == sum(igu.active_ranks.values())
    assert logs[0]["rank_budget"] == 4 * len(igu.adapters) and logs[-1]["rank_budget"] == 2 * len(
        igu.adapters
    )
    assert all(entry["ig_nodes"] == igu.igu_config.ig_steps for entry in logs)
    assert logs[-1]["ig_residual"] == igu.last_check.relative_residual  # the last scoring step's
    assert len({entry["ig_residual"] for entry in logs}) > 1  # one check per scoring step


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
    assert igu._guard.steps == 2 + 3 + 2


def _lm_trainer_run(tmp_path, checkpointing: bool):
    from trainer_worker import trainer

    run = trainer(
        str(tmp_path),
        config=dict(total_step=STEPS, ig_window=None),  # every step scores
        max_steps=STEPS,
        gradient_checkpointing=checkpointing,
        bf16=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
    )
    run.train()
    return run.igu, run


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


# -- checkpoints -------------------------------------------------------------------------------

ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "igulora_config.json",
    "igulora_state.safetensors",
}


def _worker(out, *flags):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "trainer_worker.py"
    return subprocess.run([sys.executable, str(script), str(out), *flags], capture_output=True, text=True)


def test_sigkilled_trainer_resumes_exactly_from_an_adapter_only_checkpoint(tmp_path):
    from safetensors.torch import load_file

    full = _worker(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _worker(tmp_path / "run", "--kill-after-save", "6")
    assert killed.returncode == -9 and not (tmp_path / "run" / "checkpoint-12").exists()
    checkpoint = {p.name for p in (tmp_path / "run" / "checkpoint-6").iterdir()}
    assert (
        ADAPTER_FILES | {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= checkpoint
    )
    assert not {"model.safetensors", "pytorch_model.bin"} & checkpoint  # no frozen base weights

    resumed = _worker(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("igulora_state.safetensors", "adapter_model.safetensors"):
        expected = load_file(tmp_path / "full" / "final" / name)
        got = load_file(tmp_path / "run" / "final" / name)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name  # bitwise, masks included


def test_save_model_writes_what_save_pretrained_writes(tmp_path):
    from trainer_worker import trainer

    run = trainer(str(tmp_path / "out"), max_steps=2, save_strategy="no")
    run.train()
    run.save_model(str(tmp_path / "saved"))
    run.igu.save_pretrained(tmp_path / "pretrained")
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert ADAPTER_FILES <= saved and "model.safetensors" not in saved
    for name in ADAPTER_FILES:
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "pretrained" / name).read_bytes()


def test_load_best_model_at_end_restores_the_best_adapter_and_its_masks(tmp_path):
    from conftest import tiny_llama
    from trainer_worker import trainer

    from igulora import IGUModel

    run = trainer(
        str(tmp_path),
        eval_strategy="steps",
        eval_steps=3,
        save_steps=3,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the highest loss: an early checkpoint, not the last
    )
    run.train()
    best = run.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-12")
    assert len(list(tmp_path.glob("checkpoint-*"))) <= 2
    expected = IGUModel.from_pretrained(tiny_llama(seed=3), best)
    assert run.igu.rank_pattern == expected.rank_pattern
    assert sum(run.igu.active_ranks.values()) > 2 * len(run.igu.adapters)  # not the final budget
    for (name, p), q in zip(run.igu.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config=dict(target_r=1)), r"another IGULoraConfig \(target_r: saved 2, this model 1\)"),
        (dict(config=dict(target_modules=["q_proj", "v_proj"])), "target_modules: saved 'all-linear'"),
        (dict(model_seed=None), "other in/out/r"),
    ],
    ids=["config", "targets", "model"],
)
def test_resuming_from_a_mismatched_checkpoint_fails_before_any_change(tmp_path, change, message):
    from trainer_worker import trainer

    source = trainer(str(tmp_path / "source"), max_steps=2, save_steps=2)
    source.train()
    run = trainer(str(tmp_path / "other"), max_steps=2, config=change.get("config"))
    if "model_seed" in change:  # a wider model: same module names, other shapes
        from conftest import tiny_llama

        from igulora import IGULoraConfig, get_igu_model

        wide = tiny_llama(seed=3)
        wide.model.layers[0].mlp.up_proj = torch.nn.Linear(24, 40, bias=False)
        run.igu = get_igu_model(wide, IGULoraConfig(**{**run.igu.igu_config.to_dict()}))
    before = {n: p.detach().clone() for n, p in run.igu.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=message):
        run.train(resume_from_checkpoint=str(tmp_path / "source" / "checkpoint-2"))
    assert all(torch.equal(p, before[n]) for n, p in run.igu.named_parameters() if p.requires_grad)


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path):
    import json

    from trainer_worker import trainer

    run = trainer(str(tmp_path), max_steps=2, save_steps=2)
    run.train()
    meta_path = tmp_path / "checkpoint-2" / "igulora_config.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="unsupported format_version 99"):
        run.igu.load_state(tmp_path / "checkpoint-2")


class _CountingTrainer(transformers.Trainer):
    """A user's Trainer subclass with behaviour of its own (it counts its training steps)."""

    def training_step(self, *args, **kwargs):
        self.counted = getattr(self, "counted", 0) + 1
        return super().training_step(*args, **kwargs)


def test_any_trainer_subclass_trains_through_the_mixin_like_igu_trainer(tmp_path):
    """igu_trainer(MyTrainer) keeps MyTrainer's behaviour and gives IGUTrainer's run exactly;
    total_step comes from max_steps and fractional phases resolve against it."""
    from igulora import IGULoraConfig
    from igulora.integrations.trainer import igu_trainer

    reference = _train(tmp_path / "ref", batch_size=8, accumulation=1)
    c = reference.igu_config
    fractions = dict(tinit=c.tinit / STEPS, tfinal=c.tfinal / STEPS, total_step=None)
    igu = get_igu_model(tiny_bert(torch.float64, seed=2), IGULoraConfig(**{**c.to_dict(), **fractions}))
    trainer = igu_trainer(_CountingTrainer)(igu, args=_args(tmp_path / "sub", 8, 1), train_dataset=_dataset())
    assert type(trainer).__name__ == "IGU_CountingTrainer"
    trainer.train()
    assert trainer.counted == STEPS and igu.igu_config == reference.igu_config
    assert igu.rank_pattern == reference.rank_pattern
    for (name, p), q in zip(igu.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


def test_a_run_with_total_step_from_max_steps_resumes_exactly(tmp_path):
    """total_step=None and fractional phases: the Trainer sets them from max_steps, the checkpoint
    records them, and a fresh unresolved model resumes from it to the uninterrupted run."""
    from trainer_worker import STEPS as LM_STEPS
    from trainer_worker import trainer

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    unset = dict(total_step=None, tinit=1 / 6, tfinal=1 / 6)
    full = trainer(str(tmp_path / "full"), config=unset)
    full.train()
    assert (full.igu.igu_config.total_step, full.igu.igu_config.tinit) == (LM_STEPS, 2)
    trainer(str(tmp_path / "run"), [StopAt()], config=unset).train()
    resumed = trainer(str(tmp_path / "run"), config=unset)
    assert resumed.igu.igu_config.total_step is None
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert resumed.igu.igu_config == full.igu.igu_config and resumed.igu.step == LM_STEPS
    assert resumed.igu.rank_pattern == full.igu.rank_pattern
    for (name, p), q in zip(resumed.igu.named_parameters(), full.igu.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name
