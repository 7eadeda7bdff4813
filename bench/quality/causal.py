"""Classification as generation on a causal LM, with every linear of its layers adapted: the
SmolLM2 runs of ``bench/whole_run.py`` and the decoder track of ``decoder.py``.

Each example is a chat prompt (the task's question, then its text) answered by its label word;
the loss is on the answer tokens alone, and the prediction is the label word with the highest
summed log-likelihood after the prompt (deterministic, no sampling).

The methods share glue.py's adaptive schedule at an average final rank ``budget`` per adapted
linear from ``INIT_MULTIPLE`` times it (tinit 10%, tfinal 20%, deltaT 10, betas 0.85, every scale
lora_alpha / r = 8): IGU-LoRA at its defaults, PEFT AdaLoRA with and without its term, PEFT LoRA
at the uniform rank, and PEFT's EVA (``init_lora_weights="eva"``): LoRA at the uniform rank whose
ranks are redistributed once, before training, by the explained variance of each layer's inputs
on the first ``EVA_BATCHES`` training batches, up to ``INIT_MULTIPLE`` times the uniform rank (so
every adaptive method may give a linear as many ranks as the others start with).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from glue import INIT_MULTIPLE, SCALE, budget_ranks, peft_build

from bench.compaction import LLAMA_LINEARS
from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model
from igulora.data import Example
from igulora.finetune import Batches

CAUSAL_METHODS = ("igu", "adalora-orth", "adalora", "lora", "eva")
EVA_BATCHES = 8


@dataclass(frozen=True)
class Frame:
    """How a task reads as a chat: the question, then the example's text (a pair as premise and
    hypothesis); ``answers[label]`` is the label's word."""

    ask: str
    answers: tuple[str, ...]

    def prompt(self, example: Example) -> str:
        if example.text_pair is None:
            return self.ask + example.text.strip()
        return f"{self.ask}Premise: {example.text.strip()}\nHypothesis: {example.text_pair.strip()}"


FRAMES = {
    "sst2": Frame(
        "Is the sentiment of this movie review positive or negative? Answer in one word.\n\n",
        ("negative", "positive"),  # SST-2's labels 0 and 1
    ),
    "rte": Frame(
        "Does the premise entail the hypothesis? Answer yes or no.\n\n",
        ("yes", "no"),  # RTE's 0 = entailment, 1 = not_entailment
    ),
}


def windows(total: int) -> tuple[int, int]:
    """(tinit, tfinal) of a run of ``total`` steps: glue.py's, for every method."""
    return total // 10, total // 5


def budget_knobs(budget: float) -> dict:
    """init_r, target_r and lora_alpha of the adaptive methods at an average final rank ``budget``
    (names of IGULoraConfig and FinetuneArgs alike)."""
    init_r = budget_ranks(budget)["init_r"]
    return dict(init_r=init_r, target_r=budget, lora_alpha=SCALE * init_r)


class ChatBatches(Batches):
    """Batches' order (a permutation per epoch, seeded by the run's seed), each example a chat prompt
    and its answer word, right-padded, labelled -100 but on the answer tokens."""

    def __init__(self, examples: list[Example], tokenizer, batch_size: int, seed: int, frame: Frame) -> None:
        super().__init__(
            examples, tokenizer, SimpleNamespace(batch_size=batch_size, seed=seed, group_by_length=False)
        )
        self.frame = frame

    def encode(self, chunk: list[Example], pad: bool = True) -> dict[str, torch.Tensor]:
        return self.encode_pairs([(self.frame.prompt(e), self.frame.answers[e.label]) for e in chunk])

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """(question, answer) pairs as one batch: the chat prompt and the answer tokenized apart
        (no merge across)."""
        tok = self.tokenizer

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        def prompt(text: str) -> str:
            chat = [{"role": "user", "content": text}]
            return tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

        rows = [(ids(prompt(text)), ids(answer)) for text, answer in pairs]
        width = max(len(p) + len(a) for p, a in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), tok.pad_token_id),
            "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
            "labels": torch.full((len(rows), width), -100),
        }
        for i, (p, a) in enumerate(rows):
            batch["input_ids"][i, : len(p) + len(a)] = torch.tensor(p + a)
            batch["attention_mask"][i, : len(p) + len(a)] = 1
            batch["labels"][i, len(p) : len(p) + len(a)] = torch.tensor(a)
        return batch

    @torch.no_grad()
    def accuracy(self, module: torch.nn.Module, examples: list[Example]) -> float:
        """The share of ``examples`` whose label word has the highest summed log-likelihood."""
        was_training = module.training
        module.eval()
        answers, right = self.frame.answers, 0
        for start in range(0, len(examples), self.args.batch_size):
            chunk = examples[start : start + self.args.batch_size]
            batch = self.encode_pairs([(self.frame.prompt(e), a) for e in chunk for a in answers])
            nll, _ = causal_lm_row_loss(module, batch)  # summed over each row's answer tokens
            picks = nll.view(-1, len(answers)).argmin(1).tolist()
            right += sum(pick == e.label for pick, e in zip(picks, chunk))
        module.train(was_training)
        return right / len(examples)


def eva_build(model, budget: float, batches: ChatBatches):
    """PEFT LoRA at the budget's uniform rank with EVA's data-driven initialisation and rank
    redistribution (rho = INIT_MULTIPLE). EVA reads every non-padding token's input (PEFT's label
    mask would leave it one answer token per sequence)."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    r = budget_ranks(budget)["lora_r"]
    config = LoraConfig(
        r=r,
        lora_alpha=SCALE * r,
        target_modules=LLAMA_LINEARS,
        lora_dropout=0.0,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=float(INIT_MULTIPLE), use_label_mask=False),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)  # EVA fills A in afterwards
    data = [batches(step) for step in range(EVA_BATCHES)]  # PEFT cycles them until the SVDs converge
    initialize_lora_eva_weights(peft_model, dataloader=data, show_progress_bar=False)
    return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: None


def igu_lm_config(total: int, budget: float, seed: int = 0, overrides: dict | None = None) -> IGULoraConfig:
    """IGU-LoRA's config on a causal LM: its defaults on glue.py's schedule of ``total`` steps, under
    ``overrides`` (target_modules: the default "all-linear")."""
    tinit, tfinal = windows(total)
    return IGULoraConfig(
        **budget_knobs(budget),
        total_step=total,
        tinit=tinit,
        tfinal=tfinal,
        delta_t=10,
        seed=seed,
        **(overrides or {}),
    )


def causal_build(
    method: str, model, total: int, seed: int, budget: float, igu_overrides: dict, batches: ChatBatches
):
    """(module, loss(batch), after_step(step, optimizer)) of ``method`` on a causal LM."""
    if method == "eva":
        return eva_build(model, budget, batches)
    if method != "igu":
        return peft_build(method, model, total, budget, LLAMA_LINEARS, "CAUSAL_LM")
    igu = get_igu_model(model, igu_lm_config(total, budget, seed, igu_overrides))
    return (
        igu,
        lambda batch: igu.training_loss(batch, causal_lm_row_loss),
        lambda step, optimizer: igu.update_and_allocate(step, optimizer=optimizer),
    )
