"""Allocation controls (issue #36.2): plain PEFT LoRA retrained with fixed per-module ranks
(``rank_pattern``), so that runs differ in their allocation alone, without the training dynamics
of pruning. Does the allocation matter on MiniLM, and does IG's beat the gradient's?

    python bench/quality/controls.py run --task sst2 --budget 2     # 5 patterns x 5 seeds
    python bench/quality/controls.py report                         # controls.md beside report.md

At an average rank ``b`` per adapted linear (36 b ranks over MiniLM's 36 encoder linears, each
module at most INIT_MULTIPLE x b, the adaptive methods' starting rank), the patterns are:

- ``igu``: IGU-LoRA's final ranks in glue.py's seed-0 run at budget b (``igu-orth``, the defaults'
  cell of the budget sweep, at its selected lr);
- ``adalora``: PEFT AdaLoRA's with its term (``adalora-orth``), likewise;
- ``uniform``: b everywhere;
- ``random``: the total dealt one rank at a time to modules drawn uniformly among those below the
  cap (generator seed RANDOM_SEED);
- ``inverted``: IGU-LoRA's ranks dealt in reverse order (the module it gave the most gets the
  fewest): the same ranks, where IGU-LoRA put the fewest.

Every pattern trains at PEFT LoRA's selected lr at budget b (glue.py's search), seeds 0-4, with
glue.py's protocol otherwise; a module at rank 0 is left unadapted. Records go to
``controls-runs.jsonl`` as method ``lora-pattern``, variant the pattern's name, the pattern itself
in the record (``rank_pattern``), so ``glue.py one RECORD`` re-runs any cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from glue import INIT_MULTIPLE, RESULTS, selected_lr, spec  # noqa: E402
from report import final_runs, module_name, paired_se, rank_overlap, seeds_ahead  # noqa: E402
from runs import ensure, load_runs  # noqa: E402

RUNS = RESULTS / "controls-runs.jsonl"
PATTERNS = ("igu", "adalora", "uniform", "random", "inverted")
SOURCES = {"igu": "igu-orth", "adalora": "adalora-orth"}
SEEDS = (0, 1, 2, 3, 4)
RANDOM_SEED = 36


def source_pattern(runs: list[dict], task: str, method: str, budget: float) -> dict[str, int]:
    """The final ranks per module of ``method``'s seed-0 run at its selected lr."""
    settled = final_runs(runs, task, method, budget)
    if not settled or settled[0]["seed"] != 0:
        raise SystemExit(f"no seed-0 {method} run at budget {budget} on {task}: run glue.py's sweep first")
    return {module_name(n): r for n, r in sorted(settled[0]["active_ranks"].items())}


def random_pattern(names: list[str], total: int, cap: int, seed: int = RANDOM_SEED) -> dict[str, int]:
    generator = torch.Generator().manual_seed(seed)
    ranks = dict.fromkeys(names, 0)
    for _ in range(total):
        open_ = [n for n in names if ranks[n] < cap]
        ranks[open_[int(torch.randint(len(open_), (1,), generator=generator))]] += 1
    return ranks


def inverted_pattern(pattern: dict[str, int]) -> dict[str, int]:
    """``pattern``'s ranks dealt in reverse order: the module it gave the most gets the fewest
    (ties by name), so the same ranks sit where the pattern put the fewest."""
    order = sorted(pattern, key=lambda n: (pattern[n], n))
    return dict(zip(order, sorted(pattern.values(), reverse=True)))


def patterns(runs: list[dict], task: str, budget: float) -> dict[str, dict[str, int]]:
    """The five patterns at average rank ``budget``, each of the same total."""
    igu = source_pattern(runs, task, SOURCES["igu"], budget)
    names, cap = sorted(igu), round(INIT_MULTIPLE * budget)
    total = round(budget * len(names))
    out = {
        "igu": igu,
        "adalora": source_pattern(runs, task, SOURCES["adalora"], budget),
        "uniform": dict.fromkeys(names, int(budget)),
        "random": random_pattern(names, total, cap),
        "inverted": inverted_pattern(igu),
    }
    for name, pattern in out.items():
        if sorted(pattern) != names or sum(pattern.values()) != total:
            raise SystemExit(f"the {name} pattern at budget {budget} on {task} does not hold {total} ranks")
    return out


def control_specs(runs: list[dict], task: str, budget: float, names, seeds) -> list[dict]:
    lr = selected_lr(runs, task, "lora", budget)
    chosen = patterns(runs, task, budget)
    return [
        {**spec(task, "lora-pattern", lr, seed, name, budget), "rank_pattern": chosen[name]}
        for seed in seeds
        for name in names
    ]


def reproduced(uniform: list[dict], lora: list[dict]) -> str:
    """The uniform pattern (PEFT LoRA built from a rank_pattern) against glue.py's LoRA runs at the
    same rank, lr and seed (PEFT LoRA built from ``r``), seed by seed: the same run by two paths,
    expected to match to float rounding, which training can grow. The gap is the noise floor of the
    pattern differences."""
    plain = {(r["lr"], r["seed"]): r for r in lora}
    paired = [(r, plain[r["lr"], r["seed"]]) for r in uniform if (r["lr"], r["seed"]) in plain]
    if not paired:
        return "uniform against glue.py's LoRA runs: no seed run by both at one lr"
    gaps = ", ".join(
        f"seed {ours['seed']}: dev {ours['dev_accuracy'] - theirs['dev_accuracy']:+.4f}, "
        f"final loss {ours['final_loss'] / theirs['final_loss'] - 1:+.1e}"
        for ours, theirs in paired
    )
    return f"uniform - glue.py's LoRA runs (the same rank, lr and seed; the noise floor): {gaps}"


def report(controls: list[dict], runs: list[dict]) -> list[str]:
    """Per task and budget: each pattern's dev accuracy over seeds and the paired differences."""
    lines = ["# Allocation controls (issue #36.2)", "", __doc__.split("\n\n")[0], ""]
    cells = sorted({(r["task"], r["budget"]) for r in controls})
    for task, budget in cells:
        chosen = patterns(runs, task, budget)
        of = {
            n: [r for r in controls if (r["task"], r["budget"], r["variant"]) == (task, budget, n)]
            for n in PATTERNS
        }
        lines += [
            f"## {task}, average rank {budget:g}",
            "",
            "| pattern | overlap with igu | dev (seeds) | dev median | pattern - uniform (paired +- s.e.) "
            "| seeds ahead |",
            "| --- | ---: | --- | ---: | --- | ---: |",
        ]
        for name in PATTERNS:
            done = sorted(of[name], key=lambda r: r["seed"])
            dev = [r["dev_accuracy"] for r in done]
            median = f"{statistics.median(dev):.4f}" if dev else ""
            versus = (
                (paired_se(done, of["uniform"]), seeds_ahead(done, of["uniform"]))
                if name != "uniform"
                else ("", "")
            )
            seeds = ", ".join(f"{d:.3f}" for d in dev)
            overlap = f"{rank_overlap(chosen['igu'], chosen[name]):.2f}"
            lines.append("| " + " | ".join((name, overlap, seeds, median, *versus)) + " |")
        igu_vs_adalora = paired_se(of["igu"], of["adalora"]) or "fewer than 2 paired seeds"
        ahead = seeds_ahead(of["igu"], of["adalora"])
        lines += [
            "",
            f"- igu - adalora (paired +- s.e.): {igu_vs_adalora}, igu ahead on {ahead} seeds",
            f"- {reproduced(of['uniform'], final_runs(runs, task, 'lora', budget))}",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("run", "report"))
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument(
        "--runs", type=Path, default=RESULTS / "runs.jsonl", help="glue.py's runs (sources, lr)"
    )
    parser.add_argument("--controls", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    if args.experiment == "run":
        seeds = [int(s) for s in args.seeds.split(",")]
        ensure(control_specs(runs, args.task, args.budget, args.patterns.split(","), seeds), args.controls)
    else:
        out = args.controls.with_name("controls.md")
        out.write_text("\n".join(report(load_runs(args.controls), runs)) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
