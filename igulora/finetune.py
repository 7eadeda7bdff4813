"""``igulora finetune``: IGU-LoRA on a local Hugging Face model and local data, resumable.

The loop is plain PyTorch so that a checkpoint holds everything that decides the rest of the
run: adapters, masks and scores (igulora's own save), optimizer, LR schedule, RNG states and the
step. The data order is a function of (seed, epoch), so the step alone says where to continue.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from igulora.config import IGULoraConfig
from igulora.data import Example, load_examples
from igulora.ig import causal_lm_row_loss, sequence_classification_row_loss
from igulora.metrics import COLUMNS, MetricsLogger, allocation_metrics
from igulora.model import IGUModel, get_igu_model
from igulora.plots import rank_heatmap, training_curves
from igulora.pretrained import load_pretrained, split_gguf

TASKS = ("classification", "causal-lm")
STATE_FILE = "training_state.pt"
EVAL_COLUMNS = ("eval_accuracy", "eval_loss", "eval_perplexity")


class FinetuneError(RuntimeError):
    """A run that cannot produce a usable adapter."""


@dataclass
class FinetuneArgs:
    model: str
    data: str
    task: str
    output_dir: str
    max_steps: int
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    eval_data: str | None = None
    eval_every: int = 0
    data_format: str = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"  # of the data files
    batch_size: int = 32
    max_length: int = 64
    group_by_length: bool = False  # batches of similar length (less padding), as HF's Trainer
    lr: float = 5e-3  # selected on SST-2 validation for the E = 0 init (docs/results.md)
    warmup: float = 0.06
    target_modules: str = "all-linear"
    exclude_modules: str | None = None
    init: str = IGULoraConfig.init
    init_r: int = 6
    target_r: float = 2  # average final rank per adapted layer
    lora_alpha: float = 48.0
    rule: str = IGULoraConfig.ig_rule  # the scoring knobs default to the library's
    ig_steps: int | str = IGULoraConfig.ig_steps  # or "auto"
    ig_tolerance: float = IGULoraConfig.ig_tolerance
    ig_residual: bool = IGULoraConfig.ig_residual
    ig_fraction: float = IGULoraConfig.ig_fraction
    ig_every: int = IGULoraConfig.ig_every
    score: str = IGULoraConfig.score
    orth_reg_weight: float = IGULoraConfig.orth_reg_weight
    orth_reg_start: int | str = IGULoraConfig.orth_reg_start
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.max_steps < 1:
            raise ValueError(f"--max-steps {self.max_steps} must be >= 1")
        if self.save_every < 0 or self.eval_every < 0:
            raise ValueError("--save-every and --eval-every must be >= 0")
        try:
            split_gguf(self.model)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--model: {error}") from None


def _target_spec(value: str) -> str | list[str]:
    """``all-linear``; a regex if it holds regex syntax; else comma-separated names or suffixes."""
    if value == "all-linear" or any(c in value for c in "*+?[](){}|^$\\"):
        return value
    return [name for name in value.split(",") if name]


def load_model(args: FinetuneArgs, num_labels: int | None):
    """(tokenizer, model) from ``--model``: a Hugging Face folder or a ``.gguf`` file."""
    from transformers import AutoModelForSequenceClassification

    if args.task == "classification":
        model, tokenizer = load_pretrained(
            args.model, AutoModelForSequenceClassification, num_labels=num_labels
        )
    else:
        model, tokenizer = load_pretrained(args.model)
    return tokenizer, model


def igu_config(args: FinetuneArgs, model) -> IGULoraConfig:
    heads = [h for h in ("classifier", "score") if args.task == "classification" and hasattr(model, h)]
    return IGULoraConfig(
        target_modules=_target_spec(args.target_modules),
        exclude_modules=_target_spec(args.exclude_modules) if args.exclude_modules else None,
        modules_to_save=heads or None,
        init=args.init,
        init_r=args.init_r,
        target_r=args.target_r,
        lora_alpha=args.lora_alpha,
        total_step=args.max_steps,
        tinit=max(0, args.max_steps // 10),
        tfinal=max(0, args.max_steps // 5),
        delta_t=max(1, min(10, args.max_steps // 20)),
        ig_rule=args.rule,
        ig_steps=args.ig_steps,
        ig_tolerance=args.ig_tolerance,
        ig_residual=args.ig_residual,
        ig_fraction=args.ig_fraction,
        ig_every=args.ig_every,
        score=args.score,
        orth_reg_weight=args.orth_reg_weight,
        orth_reg_start=args.orth_reg_start,
        seed=args.seed,
        base_model_name_or_path=str(args.model),
    )


class Batches:
    """Batch ``step`` of the run: epoch e visits a permutation seeded by (seed, e); no state.

    With ``group_by_length`` each run of ``MEGABATCH`` batches of that permutation is sorted by
    token length before it is cut into batches (HF's length-grouped sampling): far less padding.
    """

    MEGABATCH = 50

    def __init__(self, examples: list[Example], tokenizer, args: FinetuneArgs) -> None:
        self.examples, self.tokenizer, self.args = examples, tokenizer, args
        self.per_epoch = max(1, len(examples) // args.batch_size)
        self.lengths = (
            torch.tensor([len(ids) for ids in self.encode(examples, pad=False)["input_ids"]])
            if args.group_by_length
            else None
        )

    def encode(self, chunk: list[Example], pad: bool = True) -> dict[str, torch.Tensor]:
        texts = [e.text for e in chunk]
        if self.args.task == "causal-lm":
            texts = [e.text if e.text_pair is None else f"{e.text}\n{e.text_pair}" for e in chunk]
            pairs = None
        else:
            pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
        batch = dict(
            self.tokenizer(
                texts,
                pairs,
                padding=pad,
                truncation=True,
                max_length=self.args.max_length,
                return_tensors="pt" if pad else None,
            )
        )
        if pad and self.args.task == "classification":
            batch["labels"] = torch.tensor([e.label for e in chunk])
        return batch

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(
            len(self.examples), generator=torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        )
        size = self.args.batch_size
        if self.lengths is not None:
            start = position // self.MEGABATCH * self.MEGABATCH * size
            end = min(start + self.MEGABATCH * size, self.per_epoch * size)  # the epoch's leftover stays out
            group = order[start:end]
            order[start:end] = group[self.lengths[group].argsort(descending=True, stable=True)]
        index = order[position * size : (position + 1) * size]
        return self.encode([self.examples[i] for i in index.tolist()])


@torch.no_grad()
def evaluate(igu: IGUModel, examples: list[Example], batches: Batches) -> dict[str, float]:
    """Accuracy (classification) or mean token loss and perplexity (causal LM)."""
    was_training = igu.training
    igu.eval()
    correct = loss_sum = count = 0.0
    for start in range(0, len(examples), batches.args.batch_size):
        batch = batches.encode(examples[start : start + batches.args.batch_size])
        if batches.args.task == "classification":
            logits = igu(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += float((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        else:
            row_loss, row_count = causal_lm_row_loss(igu, batch)
            loss_sum, count = loss_sum + float(row_loss.sum()), count + float(row_count.sum())
    igu.train(was_training)
    if batches.args.task == "classification":
        return {"eval_accuracy": correct / max(count, 1)}
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def warmup_linear_schedule(optimizer, args: FinetuneArgs):
    warmup = max(1, int(args.warmup * args.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(output_dir: Path, step: int, igu: IGUModel, optimizer, scheduler) -> Path:
    """Write ``checkpoint-{step}`` atomically: built in a temporary folder, then renamed."""
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        igu.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        }
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = [
        p for p in output_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name[11:].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def run_finetune(args: FinetuneArgs) -> dict[str, float]:
    output_dir = Path(args.output_dir)
    load = dict(
        task=args.task,
        data_format=args.data_format,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        encoding=args.encoding,
    )
    train = load_examples(args.data, **load)
    evals = load_examples(args.eval_data, **load) if args.eval_data else []
    num_labels = max(e.label for e in train + evals) + 1 if args.task == "classification" else None
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer, model = load_model(args, num_labels)
    checkpoint = latest_checkpoint(output_dir) if args.resume else None
    if checkpoint is not None:
        igu = IGUModel.from_pretrained(model, checkpoint)
    else:
        igu = get_igu_model(model, igu_config(args, model))
    igu.train()
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=args.lr)
    scheduler = warmup_linear_schedule(optimizer, args)
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
    (output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    metrics = MetricsLogger(
        output_dir / "metrics.csv",
        columns=COLUMNS + EVAL_COLUMNS,
        tensorboard_dir=output_dir / "tensorboard",
        resume_below=start,
    )
    row_loss = sequence_classification_row_loss if args.task == "classification" else causal_lm_row_loss
    batches = Batches(train, tokenizer, args)
    bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        desc="igulora finetune",
        disable=not args.progress,
    )
    skipped = 0
    for step in bar:
        loss = igu.training_loss(batches(step), row_loss)
        loss.backward()
        if igu.finite_step(loss):
            optimizer.step()
        else:
            skipped += 1
            message = f"step {step}: non-finite loss or gradient, optimizer step skipped ({skipped} so far)"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        scheduler.step()
        igu.update_and_allocate(step, optimizer=optimizer)
        optimizer.zero_grad()
        row = allocation_metrics(igu, step, float(igu.last_loss))
        if evals and args.eval_every and (step + 1) % args.eval_every == 0:
            row.update(evaluate(igu, evals, batches))
        metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ranks=row["active_rank"])
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps:
            save_checkpoint(output_dir, step + 1, igu, optimizer, scheduler)
    if skipped and skipped == args.max_steps - start:
        raise FinetuneError(
            f"every one of the {skipped} steps had a non-finite loss or gradient: no adapter was trained "
            "(check the data and lower --lr)"
        )
    final = {"step": args.max_steps, "loss": metrics.rows[-1]["loss"] if metrics.rows else float("nan")}
    final["skipped_steps"] = skipped
    final.update(evaluate(igu, evals, batches) if evals else {})
    metrics.close()
    igu.save_pretrained(output_dir)
    rank_heatmap(igu.active_ranks, output_dir / "rank_heatmap.png")
    if metrics.rows:
        training_curves(metrics.rows, output_dir / "training_curves.png")
    (output_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    return final
