"""Whole fine-tuning runs side by side (issue #35.3-4): IGU-LoRA at its defaults, PEFT AdaLoRA
with and without its orthogonality term, PEFT LoRA at the final rank, one after the other.

    python bench/whole_run.py --model minilm --json bench/results/<date>-whole-run-minilm.json
    python bench/whole_run.py --model smollm2 --json bench/results/<date>-whole-run-smollm2.json
    python bench/whole_run.py --model smollm2 --igu-overrides '{"orth_reg_ranks": "live"}' ...

Each method runs in its own child process (this script with ``--child SPEC``, answering one JSON
line), so its peak RSS is its own; the methods see the same data, batches in the same order, the
same seed and the same budget: the adaptive ones go from 8 ranks per adapted linear to 2 on
average (glue.py's budget sweep at average rank 2: tinit 10%, tfinal 20%, deltaT 10, betas 0.85,
every scale lora_alpha / r = 8), LoRA has r = 2.

- ``minilm``: the protocol of ``bench/quality/glue.py`` (its ``build``): MiniLM-L6 on SST-2, its 36
  encoder linears, one epoch of batches of 32, each method at the lr selected for it at budget 2 in
  ``bench/results/quality/runs.jsonl`` (IGU-LoRA at ``igu-orth``'s: the library's term), dev
  accuracy as glue.py reports it. glue.py gives IGU-LoRA deltaT = min(10, steps // 20) (9 at 194
  steps), as in its recorded runs.
- ``smollm2``: SmolLM2-135M-Instruct (``igulora.pretrained.load_smollm2``), every linear of every
  layer adapted (210), SST-2 as generation as in the README's recipe (a chat prompt asking for the
  sentiment, the answer "negative" or "positive", the loss on the answer tokens alone), the first
  steps x batch lines of the train file, one lr for every method. Accuracy: for each of the first
  ``--dev`` dev reviews, the label word with the higher summed log-likelihood after the prompt.

Measured per method: load seconds (backbone, tokenizer, adapters and optimizer, up to the first
step); training seconds per phase of the adaptive schedule, the same integer windows for every
method (initial: step < tinit; budget: up to total - tfinal; final: the rest), each step from
fetching its batch to ``zero_grad``, and their total; the median step per phase; the child's peak
RSS; dev accuracy (evaluation timed apart, outside training). At the end of training (issue #35.4):
the trainable parameters physically present and their bytes, AdamW's state bytes (its moments),
the kept rank triplets and the ranks still held in the parameters (fewer held than ``init_r`` per
linear: IGU-LoRA compacted; at the defaults its term over every rank keeps compaction off). The
table's whole run is load + training; its ratios are to PEFT AdaLoRA with its term (whole run)
and to LoRA (final-phase median step), issue #35's two goals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "quality")]

from glue import (  # noqa: E402
    RESULTS,
    SCALE,
    TASKS,
    active_ranks,
    budget_ranks,
    build,
    epoch_steps,
    load_runs,
    minilm_path,
    peft_build,
    run_args,
    selected_lr,
    split_train,
)

from bench.compaction import LLAMA_LINEARS, state_bytes, trainable  # noqa: E402
from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model  # noqa: E402
from igulora.data import Example, load_examples  # noqa: E402
from igulora.finetune import Batches, FinetuneArgs, evaluate, warmup_linear_schedule  # noqa: E402
from igulora.pretrained import load_smollm2  # noqa: E402

METHODS = ("igu", "adalora-orth", "adalora", "lora")
BUDGET = 2.0  # average final rank per adapted linear
LABELS = {
    "igu": "IGU-LoRA (defaults)",
    "adalora-orth": "AdaLoRA (PEFT, with term)",
    "adalora": "AdaLoRA (PEFT, no term)",
    "lora": f"LoRA (PEFT, r = {budget_ranks(BUDGET)['lora_r']})",
}
GLUE_METHOD = {"igu": "igu-orth", "adalora-orth": "adalora-orth", "adalora": "adalora", "lora": "lora"}
PHASES = ("initial", "budget", "final")
ASK = "Is the sentiment of this movie review positive or negative? Answer in one word.\n\n"
ANSWERS = ("negative", "positive")  # SST-2's labels 0 and 1
ADAPTER_A = ("lora_A", "lora_A.default", "lora_A.default.weight")  # IGU-LoRA, PEFT AdaLoRA, PEFT LoRA


@dataclass
class Run:
    """One method on its backbone, ready to train."""

    module: torch.nn.Module
    loss: Callable[[dict], torch.Tensor]
    after_step: Callable[[int, torch.optim.Optimizer], None]  # the allocator's call
    batches: Callable[[int], dict]  # batch ``step`` of the run
    accuracy: Callable[[], float]  # dev accuracy
    schedule: FinetuneArgs | SimpleNamespace  # warmup and max_steps of the lr schedule


def windows(total: int) -> tuple[int, int]:
    """(tinit, tfinal) of a run of ``total`` steps: glue.py's, for every method."""
    return total // 10, total // 5


def phase(step: int, total: int) -> str:
    tinit, tfinal = windows(total)
    return "initial" if step < tinit else "budget" if step < total - tfinal else "final"


def budget_knobs() -> dict:
    """init_r, target_r and lora_alpha of the adaptive methods (names of IGULoraConfig and
    FinetuneArgs alike)."""
    init_r = budget_ranks(BUDGET)["init_r"]
    return dict(init_r=init_r, target_r=BUDGET, lora_alpha=SCALE * init_r)


# ---- MiniLM: glue.py's protocol -------------------------------------------------------------------


def minilm_run(spec: dict) -> Run:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, _, dev = split_train("sst2")
    overrides = {**budget_knobs(), **spec.get("igu_overrides", {})}  # FinetuneArgs names
    args = run_args("sst2", spec["steps"], seed=spec["seed"], lr=spec["lr"], **overrides)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(spec["seed"])  # the classifier head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    module, loss, after_step = build(GLUE_METHOD[spec["method"]], model, args, spec["steps"], BUDGET)
    batches = Batches(train, tokenizer, args)
    return Run(
        module, loss, after_step, batches, lambda: evaluate(module, dev, batches)["eval_accuracy"], args
    )


# ---- a causal LM: SST-2 as generation -------------------------------------------------------------


class ChatBatches(Batches):
    """Batches' order (a permutation per epoch, seeded by the run's seed), each example a chat prompt
    and its answer word, right-padded, labelled -100 but on the answer tokens."""

    def __init__(self, examples: list[Example], tokenizer, batch_size: int, seed: int) -> None:
        super().__init__(
            examples, tokenizer, SimpleNamespace(batch_size=batch_size, seed=seed, group_by_length=False)
        )

    def encode(self, chunk: list[Example], pad: bool = True) -> dict[str, torch.Tensor]:
        return self.frame([(e.text, ANSWERS[e.label]) for e in chunk])

    def frame(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """(review, answer) pairs as one batch: prompt and answer tokenized apart (no merge across)."""
        tok = self.tokenizer

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        def prompt(text: str) -> str:
            chat = [{"role": "user", "content": ASK + text.strip()}]
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
        """The share of ``examples`` whose label word has the higher summed log-likelihood."""
        was_training = module.training
        module.eval()
        right = 0
        for start in range(0, len(examples), self.args.batch_size):
            chunk = examples[start : start + self.args.batch_size]
            batch = self.frame([(e.text, answer) for e in chunk for answer in ANSWERS])
            nll, _ = causal_lm_row_loss(module, batch)  # summed over each row's answer tokens
            picks = nll.view(-1, len(ANSWERS)).argmin(1).tolist()
            right += sum(pick == e.label for pick, e in zip(picks, chunk))
        module.train(was_training)
        return right / len(examples)


def causal_build(method: str, model, total: int, seed: int, igu_overrides: dict):
    """(module, loss(batch), after_step(step, optimizer)): glue.py's ``build`` for a causal LM with
    every linear of its layers adapted (its PEFT methods are glue.py's own, on LLAMA_LINEARS)."""
    tinit, tfinal = windows(total)
    knobs = budget_knobs()
    if method == "igu":
        config = IGULoraConfig(
            **knobs, total_step=total, tinit=tinit, tfinal=tfinal, delta_t=10, seed=seed, **igu_overrides
        )  # target_modules: the default "all-linear"
        igu = get_igu_model(model, config)
        return (
            igu,
            lambda batch: igu.training_loss(batch, causal_lm_row_loss),
            lambda step, optimizer: igu.update_and_allocate(step, optimizer=optimizer),
        )
    return peft_build(method, model, total, BUDGET, LLAMA_LINEARS, "CAUSAL_LM")


def causal_run(spec: dict, model, tokenizer) -> Run:
    read = TASKS["sst2"]["load"]
    train = load_examples(spec["train_file"], task="classification", **read)[: spec["train_examples"]]
    dev = load_examples(spec["dev_file"], task="classification", **read)[: spec["dev_examples"]]
    torch.manual_seed(spec["seed"])  # the adapters' init
    module, loss, after_step = causal_build(
        spec["method"], model, spec["steps"], spec["seed"], spec.get("igu_overrides", {})
    )
    batches = ChatBatches(train, tokenizer, spec["batch"], spec["seed"])
    schedule = SimpleNamespace(warmup=FinetuneArgs.warmup, max_steps=spec["steps"])
    return Run(module, loss, after_step, batches, lambda: batches.accuracy(module, dev), schedule)


# ---- one method's whole run ---------------------------------------------------------------------


def run_method(spec: dict, load: Callable[[], tuple] | None = None) -> dict:
    """Train ``spec``'s method in this process; its record. ``load``: (model, tokenizer) of a causal
    LM (the tests' tiny one; SmolLM2 by default)."""
    start = time.perf_counter()
    run = minilm_run(spec) if spec["model"] == "minilm" else causal_run(spec, *(load or load_smollm2)())
    run.module.train()
    optimizer = torch.optim.AdamW([p for p in run.module.parameters() if p.requires_grad], lr=spec["lr"])
    scheduler = warmup_linear_schedule(optimizer, run.schedule)
    load_s = time.perf_counter() - start
    seconds: dict[str, list[float]] = {p: [] for p in PHASES}
    losses = []
    for step in range(spec["steps"]):
        start = time.perf_counter()
        loss = run.loss(run.batches(step))
        loss.backward()
        optimizer.step()
        scheduler.step()
        run.after_step(step, optimizer)
        optimizer.zero_grad()
        seconds[phase(step, spec["steps"])].append(time.perf_counter() - start)
        losses.append(float(getattr(run.module, "last_loss", loss.detach())))  # IGU-LoRA: its training rows'
    start = time.perf_counter()
    accuracy = run.accuracy()
    eval_s = time.perf_counter() - start
    kept = active_ranks(run.module)
    held = [p.shape[0] for n, p in run.module.named_parameters() if n.endswith(ADAPTER_A)]
    params = [p for p in run.module.parameters() if p.requires_grad]
    return {
        **spec,
        "load_s": load_s,
        "phase_s": {p: sum(s) for p, s in seconds.items()},
        "training_s": sum(s for times in seconds.values() for s in times),
        "median_step_s": {p: statistics.median(s) if s else None for p, s in seconds.items()},
        "eval_s": eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dev_accuracy": accuracy,
        "final_loss": statistics.mean(losses[-20:]),
        "trainable_params": trainable(run.module),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
        "adamw_state_bytes": state_bytes(optimizer),  # the moments (the scalar step counts left out)
        "adapted_linears": len(held),
        "kept_triplets": sum(kept.values()),
        "held_ranks": sum(held),  # < init_r x adapted_linears: compacted
        "active_ranks": kept,
        "threads": torch.get_num_threads(),
    }


def child(spec: dict) -> dict:
    """``run_method(spec)`` in a child process of its own (its peak RSS is its own)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- report ---------------------------------------------------------------------------------------


def label(record: dict) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in record.get("igu_overrides", {}).items())
    name = LABELS[record["method"]]
    return name.replace(")", f", {overrides})") if overrides else name


COLUMNS = (
    "method", "lr", "load s", "initial s", "budget s", "final s", "training s",
    f"whole run / {LABELS['adalora-orth']}", "final-phase median step / LoRA", "peak RSS MB", "dev acc",
    "trainable params", "AdamW state MB", "kept / held triplets",
)  # fmt: skip


def table(records: list[dict]) -> str:
    """The markdown table of ``records`` (ratios blank where their reference method did not run)."""
    by_method = {r["method"]: r for r in records}

    def ratio(r: dict, ref: str, value: Callable[[dict], float]) -> str:
        return f"{value(r) / value(by_method[ref]):.2f}" if ref in by_method else ""

    def cells(r: dict) -> tuple[str, ...]:
        return (
            label(r), f"{r['lr']:g}", f"{r['load_s']:.1f}", *(f"{r['phase_s'][p]:.1f}" for p in PHASES),
            f"{r['training_s']:.1f}", ratio(r, "adalora-orth", lambda x: x["load_s"] + x["training_s"]),
            ratio(r, "lora", lambda x: x["median_step_s"]["final"]), f"{r['peak_rss_mb']:.0f}",
            f"{r['dev_accuracy']:.4f}", f"{r['trainable_params']:,}", f"{r['adamw_state_bytes'] / 2**20:.2f}",
            f"{r['kept_triplets']} / {r['held_ranks']}",
        )  # fmt: skip

    rows = [COLUMNS, ("---", *["---:"] * (len(COLUMNS) - 1)), *map(cells, records)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write(path: Path, meta: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": records, "table": table(records)}, indent=2) + "\n")


def specs(args: argparse.Namespace) -> list[dict]:
    """One spec per method: what its child runs."""
    common = {"model": args.model, "seed": args.seed}
    if args.model == "minilm":
        steps = args.max_steps or epoch_steps("sst2", split_train("sst2")[0])
        runs = [] if args.lr else load_runs(RESULTS / "runs.jsonl")
        lrs = {m: args.lr or selected_lr(runs, "sst2", GLUE_METHOD[m], BUDGET) for m in args.methods}
    else:
        steps = args.max_steps or args.steps
        common |= {
            "batch": args.batch,
            "train_file": str(TASKS["sst2"]["train"]),
            "dev_file": str(TASKS["sst2"]["dev"]),
            "train_examples": args.train or steps * args.batch,
            "dev_examples": args.dev,
        }
        lrs = dict.fromkeys(args.methods, args.lr or 1e-3)
    out = [{**common, "method": m, "lr": lrs[m], "steps": steps} for m in args.methods]
    for spec in out:
        if spec["method"] == "igu" and args.igu_overrides:
            spec["igu_overrides"] = args.igu_overrides
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, help="for every method (minilm: each its selected lr; smollm2: 1e-3)"
    )
    parser.add_argument(
        "--igu-overrides",
        type=json.loads,
        default={},
        help="JSON merged into IGU-LoRA's config (minilm: FinetuneArgs names, e.g. orth_reg_ranks)",
    )
    parser.add_argument("--max-steps", type=int, help="a shorter run (the schedule follows)")
    parser.add_argument("--steps", type=int, default=200, help="(smollm2) optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="(smollm2) sequences per batch")
    parser.add_argument("--train", type=int, help="(smollm2) the first N train lines (default steps x batch)")
    parser.add_argument("--dev", type=int, default=200, help="(smollm2) the first N dev reviews")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_method(json.loads(args.child))))
        return 0
    records = []
    for spec in specs(args):
        print(f"{label(spec)}: {spec['steps']} steps at lr {spec['lr']:g} ...", file=sys.stderr, flush=True)
        records.append(child(spec))
    print(table(records))
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "command": shlex.join(
                ["python", "bench/whole_run.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "model": args.model,
            "steps": records[0]["steps"],
            "budget": BUDGET,
            "tinit_tfinal": windows(records[0]["steps"]),
            "seed": args.seed,
            "igu_overrides": args.igu_overrides,
        }
        write(args.json, meta, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
