"""The decoder track (issue #36.1): SmolLM2-135M-Instruct with adapters on q, k, v, o, gate, up
and down of all 30 layers (210 linears), SST-2 and RTE framed as generation (``causal.py``), at
an average final rank of 2 per adapted linear: IGU-LoRA at its defaults, PEFT AdaLoRA with and
without its term and PEFT EVA from 8 ranks, PEFT LoRA at r = 2.

    python bench/quality/decoder.py estimate                 # the plan's runs and machine time
    python bench/quality/decoder.py sweep --task sst2        # lr search (seed 0), then seeds 1, 2
    python bench/quality/decoder.py sweep --task rte         # seeds 0-2 at the lr chosen on SST-2
    python bench/quality/decoder.py one '{"task": ...}'      # one cell's run: its record on stdout
    python bench/quality/decoder.py report                   # decoder.md and the rank heatmaps

The protocol, fixed before any run:
- **Data**: glue.py's split of each task (val carved from train, never trained on; the dev file is
  the reported test set). Every method trains on the same fixed subsample, the first
  ``steps x batch`` examples of the carved train (one pass, in a per-seed order), and is scored on
  the first ``val_examples`` / ``dev_examples`` of val / dev (PROTOCOL).
- **Learning rate**: per method, the lr of LR_GRID with the best seed-0 val accuracy on SST-2 (ties:
  the smaller); RTE runs at it (LR_FROM), and every method runs seeds 0-2 at its lr.
- **Records**: ``bench/results/quality/decoder-runs.jsonl``, glue.py's format (one JSON line per
  run, the same keys: task, method, lr, seed, variant, budget, igu_config, val/dev accuracy), each
  run in its own process (``bench/whole_run.py``'s ``run_method``, so the record also has its
  per-phase seconds, peak RSS and memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from causal import CAUSAL_METHODS, igu_lm_config  # noqa: E402
from glue import RESULTS, knobs  # noqa: E402
from report import (  # noqa: E402
    SUMMARY_ANCHORS,
    SUMMARY_FOOTNOTE,
    SUMMARY_HEADER,
    allocation_overlap,
    best_of,
    module_name,
    paired_se,
    search_runs,
    seed_overlap,
    seeds_ahead,
    summary_row,
)
from runs import ensure, load_runs, run_key  # noqa: E402

from bench.whole_run import LABELS, run_method  # noqa: E402
from igulora.plots import layer_grid, rank_panels  # noqa: E402

RUNS = RESULTS / "decoder-runs.jsonl"
REPORT_NAME = "decoder.md"
NAMES = {**LABELS, "eva": "EVA (PEFT, r = 2 redistributed from the inputs)"}
ANCHORS = tuple(SUMMARY_ANCHORS)  # what IGU-LoRA is compared with
BUDGET = 2.0
MODEL_NAME = "SmolLM2-135M-Instruct"
SEEDS = (0, 1, 2)
LR_GRID = (1e-3, 3e-3)
LR_FROM = {"rte": "sst2"}  # a task whose runs take the lr selected on another
# steps x batch training examples; RTE's prompts are about twice SST-2's, hence fewer steps, and
# it selects no lr (no val). Sized so that the whole plan fits about 10 hours here.
PROTOCOL = {
    "sst2": dict(steps=150, batch=8, val_examples=200, dev_examples=300),
    "rte": dict(steps=120, batch=8, val_examples=0, dev_examples=277),
}
# Seconds per run before any record exists: bench/whole_run.py's SmolLM2 runs (2026-12-07, batch
# 8, SST-2: 3.6-4.8 s a step, 0.45 s per dev review), RTE's steps twice as long.
PRIOR_STEP_S = {"igu": 4.8, "adalora-orth": 4.3, "adalora": 4.0, "lora": 3.6, "eva": 3.6}
PRIOR_EVAL_S, PRIOR_LOAD_S = 0.45, 25.0
TOKENS_FACTOR = {"sst2": 1.0, "rte": 2.0}


def spec(task: str, method: str, lr: float, seed: int) -> dict:
    """One run of the track; IGU-LoRA's carry the knobs it will compute with."""
    protocol = PROTOCOL[task]
    one = {
        "track": "decoder",
        "model": "smollm2",
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "variant": "default",
        "budget": BUDGET,
        **protocol,
        "train_examples": protocol["steps"] * protocol["batch"],
    }
    if method == "igu":
        one["igu_config"] = knobs(igu_lm_config(protocol["steps"], BUDGET))
    return one


def selected_lr(runs: list[dict], task: str, method: str) -> float | None:
    """The lr of ``method``'s seed-0 search on ``task`` (or its LR_FROM task); None until complete."""
    search = search_runs(runs, LR_FROM.get(task, task), method, BUDGET)
    return best_of(search)["lr"] if {r["lr"] for r in search} >= set(LR_GRID) else None


def plan(runs: list[dict], task: str, methods) -> list[dict]:
    """Every run of ``task``'s cells: the lr search where the task selects its own lr, then the
    seeds at the selected lr (a placeholder lr of None where the search is unfinished)."""
    todo = []
    for method in methods:
        if task not in LR_FROM:
            todo += [spec(task, method, lr, 0) for lr in LR_GRID]
        lr = selected_lr(runs, task, method)
        seeds = SEEDS if task in LR_FROM else SEEDS[1:]
        todo += [spec(task, method, lr, seed) for seed in seeds]
    return todo


def run_seconds(runs: list[dict], one: dict) -> float:
    """A run's expected wall time: the median of its cell's recorded runs, else the prior."""
    recorded = [r["wall_s"] for r in runs if (r["task"], r["method"]) == (one["task"], one["method"])]
    if recorded:
        return statistics.median(recorded)
    steps = one["steps"] * PRIOR_STEP_S[one["method"]] * TOKENS_FACTOR[one["task"]]
    evals = (one["val_examples"] + one["dev_examples"]) * PRIOR_EVAL_S * TOKENS_FACTOR[one["task"]]
    return PRIOR_LOAD_S + steps + evals


def estimate(runs: list[dict], methods) -> str:
    recorded = {run_key(r) for r in runs}
    lines, total = [], 0.0
    for task in PROTOCOL:
        todo = [s for s in plan(runs, task, methods) if s["lr"] is None or run_key(s) not in recorded]
        seconds = sum(run_seconds(runs, s) for s in todo)
        total += seconds
        lines.append(f"{task}: {len(todo)} runs left, about {seconds / 3600:.1f} h")
    return "\n".join(
        [*lines, f"all: about {total / 3600:.1f} h of machine time (2 cores, one run at a time)"]
    )


def sweep(task: str, methods, path: Path) -> None:
    """Run ``task``'s cells until none is left (the search first, so the seeds know their lr)."""
    while True:
        runs = load_runs(path)
        recorded, cells = {run_key(r) for r in runs}, plan(runs, task, methods)
        ready = [s for s in cells if s["lr"] is not None]
        if all(run_key(s) in recorded for s in ready):
            if len(ready) < len(cells):
                raise SystemExit(f"{task} needs the lr search of {LR_FROM.get(task, task)} first")
            return
        ensure(ready, path, script=Path(__file__))


def final_cell(runs: list[dict], task: str, method: str) -> list[dict]:
    """``method``'s runs on ``task`` at its selected lr, by seed; [] before its search is done."""
    lr = selected_lr(runs, task, method)
    return sorted(
        (r for r in runs if (r["task"], r["method"], r["lr"]) == (task, method, lr)), key=lambda r: r["seed"]
    )


def accuracy_table(runs: list[dict], task: str) -> list[str]:
    """Each method's dev over seeds at its lr, and IGU-LoRA against each anchor (paired, and on how
    many seeds it is ahead); the anchor of best median is named once every anchor has its seeds."""
    cells = {m: final_cell(runs, task, m) for m in NAMES}
    cells = {m: c for m, c in cells.items() if c}
    medians = {m: statistics.median(r["dev_accuracy"] for r in c) for m, c in cells.items()}
    complete = all(len(cells.get(m, ())) >= len(SEEDS) for m in ANCHORS)
    best = max(ANCHORS, key=lambda m: medians[m]) if complete else None
    lines = [
        "| method | lr | dev (seeds) | dev median | IGU-LoRA - it (paired +- s.e.) | seeds ahead "
        "| median run s |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for method, cell in cells.items():
        seeds = ", ".join(f"{r['dev_accuracy']:.3f}" for r in cell)
        name = NAMES[method] + (" (best anchor)" if method == best else "")
        versus = "igu" in cells and method != "igu"
        diff = paired_se(cells["igu"], cell) if versus else ""
        ahead = seeds_ahead(cells["igu"], cell) if versus else ""
        wall = statistics.median(r["wall_s"] for r in cell)
        row = (name, f"{cell[0]['lr']:g}", seeds, f"{medians[method]:.4f}", diff, ahead, f"{wall:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def projection_ranks(run: dict) -> dict[str, int]:
    """Kept ranks per projection kind (q_proj, ..., down_proj), summed over layers."""
    out: dict[str, int] = {}
    for name, rank in run["active_ranks"].items():
        kind = name.rsplit(".", 1)[-1]
        out[kind] = out.get(kind, 0) + rank
    return out


def allocation_section(runs: list[dict], task: str, out: Path) -> list[str]:
    """Issue #36.3: IGU-LoRA's and AdaLoRA's (with its term) final ranks, layers x projections (a
    heatmap of the lowest seed both ran), their overlap on each seed against each method's
    seed-to-seed overlap, and the ranks per projection kind."""
    cells = {m: final_cell(runs, task, m) for m in ("igu", "adalora-orth")}
    if not all(cells.values()):
        return ["(the rank maps wait for IGU-LoRA's and AdaLoRA's runs at their selected lr)"]
    igu, adalora = ({r["seed"]: r for r in c} for c in cells.values())
    shared = sorted(igu.keys() & adalora.keys())
    if not shared:
        return ["(the rank maps wait for a seed both IGU-LoRA and AdaLoRA ran)"]
    first = {"igu": igu[shared[0]], "adalora-orth": adalora[shared[0]]}
    path = rank_panels(
        {
            f"{NAMES[m]}, seed {r['seed']}": {module_name(k): v for k, v in r["active_ranks"].items()}
            for m, r in first.items()
        },
        out / f"decoder-{task}-ranks.png",
    )
    across = ", ".join(f"{allocation_overlap(igu[s], adalora[s]):.2f}" for s in shared)
    noise = {m: f"{seed_overlap(c):.2f}" if len(c) > 1 else "one seed" for m, c in cells.items()}
    kinds = sorted({k for c in cells.values() for r in c for k in projection_ranks(r)})
    layers = len(layer_grid(first["igu"]["active_ranks"])[0])
    lines = [
        f"![ranks]({path.name})",
        "",
        f"- Overlap of IGU-LoRA's kept ranks with AdaLoRA's on the same seed "
        f"(seeds {', '.join(map(str, shared))}): {across}; seed to seed: IGU-LoRA {noise['igu']}, "
        f"AdaLoRA {noise['adalora-orth']}.",
        "",
        "| method | " + " | ".join(kinds) + " | adapters left at rank 0 |",
        "| --- | " + " | ".join("---:" for _ in kinds) + " | ---: |",
    ]
    for method, cell in cells.items():
        per_kind = [projection_ranks(r) for r in cell]
        means = [statistics.mean(p.get(k, 0) for p in per_kind) for k in kinds]
        empty = statistics.mean(sum(v == 0 for v in r["active_ranks"].values()) for r in cell)
        lines.append(f"| {NAMES[method]} | " + " | ".join(f"{m:.0f}" for m in means) + f" | {empty:.0f} |")
    return lines + ["", f"(kept ranks per projection kind over the {layers} layers, mean over the seeds)"]


def summary(runs: list[dict]) -> list[str]:
    """The decoder's rows of docs/results.md's practitioner table (report.summary_row): a task's
    row once every method has SEEDS at its lr (the best anchor is picked among all of them)."""
    rows, waiting = [], []
    for task in PROTOCOL:
        cells = {m: final_cell(runs, task, m) for m in NAMES}
        missing = [NAMES[m] for m, cell in cells.items() if len(cell) < len(SEEDS)]
        if missing:
            waiting.append(f"{task}: waiting for {', '.join(missing)}")
            continue
        anchors = {m: cells[m] for m in SUMMARY_ANCHORS}
        rows.append(summary_row(task, MODEL_NAME, BUDGET, (cells["igu"], "defaults"), anchors))
    notes = [f"({'; '.join(waiting)})", ""] if waiting else []
    return [*SUMMARY_HEADER, *rows, "", *notes, SUMMARY_FOOTNOTE]


def search_table(runs: list[dict], task: str) -> list[str]:
    """The lr search on seed 0: each method's val (and dev) accuracy per lr, the selected one in
    bold; [] for a task that takes its lr from another (LR_FROM)."""
    if task in LR_FROM:
        return []
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}: val / dev" for lr in LR_GRID) + " |",
        "| --- | " + " | ".join("---:" for _ in LR_GRID) + " |",
    ]
    for method, name in NAMES.items():
        search = {
            r["lr"]: f"{r['val_accuracy']:.3f} / {r['dev_accuracy']:.3f}"
            for r in search_runs(runs, task, method, BUDGET)
        }
        chosen = selected_lr(runs, task, method)
        cells = [f"**{search[lr]}**" if lr == chosen else search.get(lr, "") for lr in LR_GRID]
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", "(seed 0; **the lr selected** on val, ties to the smaller)", ""]


def report(runs: list[dict], out: Path) -> list[str]:
    """decoder.md: the summary rows, then per task the lr search, the accuracy table and the
    allocation section (heatmaps beside it)."""
    lines = ["# The decoder track (issue #36.1, #36.3)", "", __doc__.split("\n\n")[0], ""]
    lines += ["## Summary (docs/results.md's rows)", "", *summary(runs), ""]
    for task in PROTOCOL:
        if not any(r["task"] == task for r in runs):
            continue
        lines += [f"## {task}", "", *search_table(runs, task), *accuracy_table(runs, task), ""]
        lines += [*allocation_section(runs, task, out), ""]
    return lines


def train_one(one: dict, load=None) -> dict:
    """One run's record; ``load``: (model, tokenizer) instead of SmolLM2 (the tests' tiny Llama)."""
    return run_method(one, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("estimate", "sweep", "one", "report"))
    parser.add_argument("spec", nargs="?", help="(one) the run as JSON")
    parser.add_argument("--task", choices=tuple(PROTOCOL), default="sst2")
    parser.add_argument("--methods", default=",".join(CAUSAL_METHODS), help="comma-separated")
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if args.experiment == "one":
        print(json.dumps(train_one(json.loads(args.spec))))
    elif args.experiment == "estimate":
        print(estimate(load_runs(args.runs), methods))
    elif args.experiment == "report":
        path = args.runs.parent / REPORT_NAME  # beside its runs file
        path.write_text("\n".join(report(load_runs(args.runs), path.parent)) + "\n")
        print(path)
    else:
        print(estimate(load_runs(args.runs), methods), flush=True)
        sweep(args.task, methods, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
