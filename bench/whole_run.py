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
  ``bench/results/quality/runs.jsonl`` (IGU-LoRA, at the library's defaults, at ``igu-orth``'s), dev
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
fetching its batch to ``zero_grad``, and their total (``--profile N``: the last N + 1 steps are
profiled instead, ``bench/step_profile.py``); the median step per phase; the child's peak RSS; dev
accuracy (evaluation timed apart, outside training). At the end of training (issue #35.4): the
trainable parameters physically present and their bytes, AdamW's state bytes (its moments), the kept
rank triplets and the ranks still held in the parameters (fewer held than ``init_r`` per linear:
IGU-LoRA compacted, which its defaults' term over the kept ranks allows). The table's whole run is
load + training; its ratios are to PEFT AdaLoRA with its term (whole run) and to LoRA (final-phase
median step), issue #35's two goals.
"""

from __future__ import annotations

import argparse
import contextlib
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
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "quality")]

from causal import FRAMES, ChatBatches, budget_knobs, causal_build, windows  # noqa: E402
from glue import (  # noqa: E402
    RESULTS,
    TASKS,
    active_ranks,
    budget_ranks,
    build,
    epoch_steps,
    knobs,
    load_runs,
    minilm_path,
    run_args,
    selected_lr,
    split_train,
)

from bench import step_profile  # noqa: E402
from bench.compaction import state_bytes, trainable  # noqa: E402
from igulora.data import Example, load_examples  # noqa: E402
from igulora.finetune import Batches, FinetuneArgs, evaluate, warmup_linear_schedule  # noqa: E402
from igulora.io import write_json  # noqa: E402
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
ADAPTER_A = ("lora_A", "lora_A.default", "lora_A.default.weight")  # IGU-LoRA, PEFT AdaLoRA, PEFT LoRA


@dataclass
class Run:
    """One method on its backbone, ready to train."""

    module: torch.nn.Module
    loss: Callable[[dict], torch.Tensor]
    after_step: Callable[[int, torch.optim.Optimizer], None]  # the allocator's call
    batches: Callable[[int], dict]  # batch ``step`` of the run
    evaluate: Callable[[], dict[str, float]]  # {"dev_accuracy": ...} (and "val_accuracy")
    schedule: FinetuneArgs | SimpleNamespace  # warmup and max_steps of the lr schedule


def phase(step: int, total: int) -> str:
    tinit, tfinal = windows(total)
    return "initial" if step < tinit else "budget" if step < total - tfinal else "final"


# ---- MiniLM: glue.py's protocol -------------------------------------------------------------------


def minilm_run(spec: dict) -> Run:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, _, dev = split_train("sst2")
    overrides = {**budget_knobs(BUDGET), **spec.get("igu_overrides", {})}  # FinetuneArgs names
    args = run_args("sst2", spec["steps"], seed=spec["seed"], lr=spec["lr"], **overrides)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(spec["seed"])  # the classifier head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    module, loss, after_step = build(GLUE_METHOD[spec["method"]], model, args, spec["steps"], BUDGET)
    batches = Batches(train, tokenizer, args)
    return Run(
        module,
        loss,
        after_step,
        batches,
        lambda: {"dev_accuracy": evaluate(module, dev, batches)["eval_accuracy"]},
        args,
    )


# ---- a causal LM: SST-2 as generation -------------------------------------------------------------


def causal_examples(spec: dict) -> tuple[list[Example], dict[str, list[Example]]]:
    """(train, {"val": ..., "dev": ...}) of a causal run: the first ``train_examples`` /
    ``dev_examples`` lines of ``train_file`` / ``dev_file`` (SST-2's format), or glue.py's split of
    ``task`` (its val carved from train), the first ``train_examples`` / ``val_examples`` /
    ``dev_examples`` of each (an empty one left out)."""
    if "train_file" in spec:
        read = TASKS["sst2"]["load"]
        train = load_examples(spec["train_file"], task="classification", **read)
        dev = load_examples(spec["dev_file"], task="classification", **read)
        return train[: spec["train_examples"]], {"dev": dev[: spec["dev_examples"]]}
    train, val, dev = split_train(spec["task"])
    evals = {"val": val[: spec["val_examples"]], "dev": dev[: spec["dev_examples"]]}
    return train[: spec["train_examples"]], {name: examples for name, examples in evals.items() if examples}


def causal_run(spec: dict, model, tokenizer) -> Run:
    train, evals = causal_examples(spec)
    batches = ChatBatches(train, tokenizer, spec["batch"], spec["seed"], FRAMES[spec.get("task", "sst2")])
    torch.manual_seed(spec["seed"])  # the adapters' init
    module, loss, after_step = causal_build(
        spec["method"],
        model,
        spec["steps"],
        spec["seed"],
        spec.get("budget", BUDGET),
        spec.get("igu_overrides", {}),
        batches,
    )
    schedule = SimpleNamespace(warmup=FinetuneArgs.warmup, max_steps=spec["steps"])

    def scores() -> dict[str, float]:
        return {f"{name}_accuracy": batches.accuracy(module, examples) for name, examples in evals.items()}

    return Run(module, loss, after_step, batches, scores, schedule)


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
    profiled = spec.get("profile_steps", 0)  # the last steps, after a warm-up one, under torch's profiler
    first_profiled = spec["steps"] - profiled - 1 if profiled else spec["steps"]
    profiler = (
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=profiled, repeat=1),
        )
        if profiled
        else None
    )
    with contextlib.ExitStack() as stack:
        for step in range(spec["steps"]):
            if step == first_profiled:
                stack.enter_context(profiler)
            start = time.perf_counter()
            batch = run.batches(step)
            with record_function("forward"):
                loss = run.loss(batch)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()
                scheduler.step()
            with record_function("allocator"):  # reads the gradients: before zero_grad
                run.after_step(step, optimizer)
            with record_function("optimizer"):
                optimizer.zero_grad()
            if step < first_profiled:  # profiled steps are not timed
                seconds[phase(step, spec["steps"])].append(time.perf_counter() - start)
            else:
                profiler.step()
            # IGU-LoRA's loss: its training rows'
            losses.append(float(getattr(run.module, "last_loss", loss.detach())))
    start = time.perf_counter()
    accuracy = run.evaluate()
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
        **accuracy,
        "final_loss": statistics.mean(losses[-20:]),
        "trainable_params": trainable(run.module),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
        "adamw_state_bytes": state_bytes(optimizer),  # the moments (the scalar step counts left out)
        "adapted_linears": len(held),
        "kept_triplets": sum(kept.values()),
        "held_ranks": sum(held),  # < init_r x adapted_linears: compacted
        "active_ranks": kept,
        "igu_config": knobs(run.module.config) if hasattr(run.module, "allocator") else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **({"profile": step_profile.summary(profiler.events(), profiled)} if profiled else {}),
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
    """The results file so far (atomic: a stopped run leaves the methods that finished)."""
    write_json(path, {"meta": meta, "records": records, "table": table(records)})


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
    if args.profile:
        if not 0 < args.profile < steps:
            raise SystemExit(f"--profile {args.profile}: between 1 and {steps - 1} of the {steps} steps")
        common["profile_steps"] = args.profile
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
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run the last N steps under torch's profiler, after a warm-up step (none of them timed)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_method(json.loads(args.child))))
        return 0
    todo = specs(args)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": shlex.join(["python", "bench/whole_run.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model,
        "steps": todo[0]["steps"],
        "budget": BUDGET,
        "tinit_tfinal": windows(todo[0]["steps"]),
        "seed": args.seed,
        "igu_overrides": args.igu_overrides,
    }
    records = []
    for spec in todo:
        print(f"{label(spec)}: {spec['steps']} steps at lr {spec['lr']:g} ...", file=sys.stderr, flush=True)
        records.append(child(spec))
        if args.json:
            write(args.json, meta, records)
    print(table(records))
    profiles = {label(r): r["profile"] for r in records if "profile" in r}
    if profiles:
        print(step_profile.table(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
