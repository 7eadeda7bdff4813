"""TRL's SFTTrainer trains IGU-LoRA (igulora.integrations.trl): end to end on a tiny Llama, a
step equal to the plain loop's in fp64, PEFT loading the result, and padding-free refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
from conftest import char_tokenizer, tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model  # noqa: E402
from igulora.integrations.trainer import IGUCallback  # noqa: E402
from igulora.integrations.trl import IGUSFTTrainer, fused_causal_lm_row_loss  # noqa: E402

SUMS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(6) for b in range(6)]
CHATS = [
    {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(6)
    for b in range(6)
]


def _setup(dtype=torch.float32, **config):
    tokenizer = char_tokenizer()
    model = tiny_llama(dtype, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    defaults = dict(
        target_modules="all-linear", init_r=4, target_r=2, total_step=None, tinit=0.25, tfinal=0.25
    )
    return tokenizer, model, get_igu_model(model, IGULoraConfig(**{**defaults, **config}))


def _args(tmp_path, **overrides) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path / "sft"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        optim="adamw_torch",
    )
    return SFTConfig(**{**defaults, **overrides})


def _ibar(igu) -> torch.Tensor:
    return torch.cat([v.flatten() for v in igu.allocator.ibar.values()])


def test_sft_trainer_end_to_end_reaches_the_budget_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    tokenizer, model, igu = _setup()
    args = _args(tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True)
    assert args.bf16  # TRL's default where the device has it (this CPU does)
    trainer = IGUSFTTrainer(
        model=igu, args=args, train_dataset=Dataset.from_list(SUMS), processing_class=tokenizer
    )
    trainer.train()

    assert igu.igu_config.total_step == 8 and igu.igu_config.tinit == 2  # from max_steps and fractions
    assert igu.step == 8 and igu.allocator.num_updates > 0
    assert _ibar(igu).abs().sum() > 0 and igu.allocator.ibar.keys() == igu.allocator.ubar.keys()
    assert sum(igu.active_ranks.values()) == igu.allocator.target_budget < 4 * len(igu.adapters)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(0 <= entry["mean_token_accuracy"] <= 1 and entry["num_tokens"] > 0 for entry in logs)
    assert logs[-1]["active_rank"] == igu.allocator.target_budget

    trainer.save_model(str(tmp_path / "adapter"))
    batch = tokenizer(["1+2=3", "4+5=9"], return_tensors="pt")
    igu.eval()
    with torch.no_grad():
        ours = igu.model(**batch).logits  # igu.forward keeps Accelerate's bf16 autocast wrapper
        base = tiny_llama(vocab_size=len(tokenizer))
        before = base(**batch).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        theirs = peft(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - before).abs().max() > 1e-4  # the trained adapter changed the model


def test_sft_trainer_takes_conversational_data(tmp_path):
    tokenizer, _, igu = _setup()
    trainer = IGUSFTTrainer(
        model=igu,
        args=_args(tmp_path, max_steps=6),
        train_dataset=Dataset.from_list(CHATS),
        processing_class=tokenizer,
    )
    trainer.train()
    assert igu.step == 6 and _ibar(igu).abs().sum() > 0


class _Recording(IGUSFTTrainer):
    """Keeps a copy of every training micro-batch the Trainer computes a loss on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_sft_trainer_step_equals_the_plain_loop_step_fp64(tmp_path):
    """Three optimizer steps of 2 micro-batches (a scoring step, a pruning step, the final
    budget), with gradient checkpointing and completion-only labels: adapters, masks and EMAs
    equal the plain loop's on the same micro-batches."""
    config = dict(total_step=3, tinit=0, tfinal=1, ig_fraction=0.5)
    tokenizer, _, igu = _setup(torch.float64, **config)
    _, _, plain = _setup(torch.float64, **config)
    args = _args(
        tmp_path,
        max_steps=3,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        bf16=False,
    )
    trainer = _Recording(
        model=igu, args=args, train_dataset=Dataset.from_list(SUMS), processing_class=tokenizer
    )
    trainer.batches = []
    trainer.train()
    assert len(trainer.batches) == 6 and any((b["labels"] == -100).any() for b in trainer.batches)

    add_fused_lm_head(plain, outputs=("log_probs",))  # the per-row loss the trainer uses (next test)
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    plain.train()
    for step in range(3):
        for batch in trainer.batches[2 * step : 2 * step + 2]:
            (plain.training_loss(batch, fused_causal_lm_row_loss) / 2).backward()
        optimizer.step()
        plain.update_and_allocate(step, optimizer=optimizer)
        optimizer.zero_grad()

    assert plain.rank_pattern == igu.rank_pattern and sum(plain.active_ranks.values()) < 4 * len(
        plain.adapters
    )
    for name, layer in plain.adapters.items():
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(
                getattr(igu.adapters[name], p), getattr(layer, p), rtol=1e-10, atol=1e-12
            )
    for key, value in plain.allocator.ibar.items():
        torch.testing.assert_close(igu.allocator.ibar[key], value, rtol=1e-9, atol=1e-15)


def test_fused_row_loss_equals_the_full_logits_row_loss_fp64():
    """TRL's chunked fused LM head gives igulora's per-sequence causal LM loss and token count
    (to fp32 rounding: TRL computes the log-probabilities in fp32 even for an fp64 model)."""
    tokenizer, model, igu = _setup(torch.float64, total_step=4)
    add_fused_lm_head(igu, outputs=("log_probs",))
    batch = dict(tokenizer(["1+2=3", "4+5=9 ok", "0+0=0"], return_tensors="pt", padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"][:, :3] = -100  # completion-only
    fused, full = fused_causal_lm_row_loss(igu, batch), causal_lm_row_loss(igu, batch)
    assert fused[0].dtype == torch.float32
    torch.testing.assert_close(fused[0].double(), full[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[1], full[1]) and fused[1].min() > 0


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(padding_free=True), "padding_free=True"),
        (dict(packing=True), "packing=True"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor=0.1"),
        (dict(loss_type="dft"), "loss_type='dft'"),
    ],
)
def test_options_the_ig_step_cannot_honour_are_refused_at_construction(tmp_path, options, named):
    tokenizer, _, igu = _setup()
    with pytest.raises(ValueError, match=named):
        IGUSFTTrainer(
            model=igu,
            args=_args(tmp_path, **options),
            train_dataset=Dataset.from_list(SUMS),
            processing_class=tokenizer,
        )


def test_wrapped_packing_keeps_one_sequence_per_row_and_trains(tmp_path):
    tokenizer, _, igu = _setup()
    args = _args(tmp_path, max_steps=6, packing=True, packing_strategy="wrapped", max_length=16)
    IGUSFTTrainer(
        model=igu, args=args, train_dataset=Dataset.from_list(SUMS), processing_class=tokenizer
    ).train()
    assert igu.step == 6 and _ibar(igu).abs().sum() > 0


def test_plain_sft_trainer_with_the_callback_alone_fails_loudly(tmp_path):
    """SFTTrainer's own loss never builds IG rows: the first scoring step says so."""
    tokenizer, _, igu = _setup(total_step=4, tinit=0, tfinal=0)
    trainer = SFTTrainer(
        model=igu,
        args=_args(tmp_path, max_steps=4),
        train_dataset=Dataset.from_list(SUMS),
        processing_class=tokenizer,
        callbacks=[IGUCallback(igu)],
    )
    with pytest.raises(RuntimeError, match="IGUSFTTrainer"):
        trainer.train()


def test_igu_model_looks_like_the_model_it_wraps():
    tokenizer, model, igu = _setup()
    assert igu.config is not None and igu.config.get_text_config() is model.config
    assert isinstance(igu.config, type(model.config)) and igu.config.vocab_size == len(tokenizer)
    assert igu.can_generate() and igu.get_input_embeddings() is model.get_input_embeddings()
    assert igu.name_or_path == model.name_or_path and igu.main_input_name == "input_ids"
    with pytest.warns(DeprecationWarning, match="igu_config"):
        assert igu.config.init_r == igu.igu_config.init_r == 4
    igu.config.use_cache = False  # writes reach the base model's config
    assert model.config.use_cache is False
    prompt = tokenizer(["1+1="], return_tensors="pt")
    out = igu.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 3)
    assert copy.deepcopy(igu.config) == model.config


@pytest.mark.parametrize(
    "module, name",
    [
        ("trl", "DPOTrainer"),
        ("trl", "GRPOTrainer"),
        ("trl", "KTOTrainer"),
        ("trl.experimental.gkd", "GKDTrainer"),
    ],
)
def test_trl_trainers_with_other_objectives_are_refused_by_name(tmp_path, module, name):
    """Preference, RL and distillation trainers (GKD subclasses SFTTrainer with its own loss)."""
    import importlib

    from igulora.integrations.trainer import igu_trainer

    _, _, igu = _setup()
    trainer_class = getattr(importlib.import_module(module), name)
    with pytest.raises(TypeError, match=f"TRL's {name} trains on its own objective"):
        igu_trainer(trainer_class)(igu, args=_args(tmp_path))


def test_plain_sft_trainer_without_any_igu_hook_fails_loudly(tmp_path):
    """TRL replaces the model's forward with its fused head, and its default optimizer is fused
    AdamW (no version bumps): the forgotten-allocation guard still sees every optimizer step."""
    tokenizer, _, igu = _setup(total_step=8, tinit=2, tfinal=2, delta_t=1)
    trainer = SFTTrainer(
        model=igu,
        args=_args(tmp_path, optim="adamw_torch_fused"),
        train_dataset=Dataset.from_list(SUMS),
        processing_class=tokenizer,
    )
    with pytest.raises(RuntimeError, match="update_and_allocate\\(\\) was never called"):
        trainer.train()
    assert igu._guard.steps == 2 + 1 + 1 + 1  # one past tinit + delta_t + 1


def test_peft_config_and_compute_loss_func_are_refused(tmp_path):
    from peft import LoraConfig

    tokenizer, _, igu = _setup()
    data = Dataset.from_list(SUMS)
    with pytest.raises(ValueError, match="peft_config"):
        IGUSFTTrainer(model=igu, args=_args(tmp_path), train_dataset=data, peft_config=LoraConfig())
    with pytest.raises(ValueError, match="compute_loss_func"):
        IGUSFTTrainer(
            model=igu, args=_args(tmp_path), train_dataset=data, compute_loss_func=lambda *a, **k: 0
        )
