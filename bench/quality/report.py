"""Markdown tables and rank heatmaps from glue.py's runs (``python bench/quality/glue.py report``)."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from igulora.config import IGULoraConfig  # noqa: E402
from igulora.node_budget import WINDOW  # noqa: E402
from igulora.plots import pyplot, rank_panels  # noqa: E402

# The 6 -> 2 tables' rows, (method, variant): IGU-LoRA's runs there predate the default score
# and the default orthogonality term.
METHOD_NAMES = {
    ("lora", "default"): "LoRA r=2 (PEFT)",
    ("adalora", "default"): "AdaLoRA 6->2 (PEFT)",
    ("adalora-orth", "default"): "AdaLoRA 6->2 + orth. term (PEFT, task-typed)",
    ("igu", "default"): "IGU-LoRA 6->2 (igulora, no orth. term)",
    ("igu", "ig-snr"): "IGU-LoRA 6->2, snr (the default score until 2026-12-02)",
    ("igu-orth", "default"): "IGU-LoRA 6->2, orth_reg_weight 0.25",
}
IGU_ROWS = (("igu", "default"), ("igu", "ig-snr"))
SCORE_VARIANTS = {
    "ig-snr": "snr (the paper's; the default until 2026-12-02)",
    "ig-product": "product (AdaLoRA's)",
}
IGU_DEFAULTS = "igu-orth"  # the harness method that runs the library's defaults (issue #20)
BUDGET_NAMES = {
    "lora": "LoRA (PEFT)",
    "adalora": "AdaLoRA (PEFT)",
    "adalora-orth": "AdaLoRA + orth. term (PEFT)",
    "igu-orth": "IGU-LoRA (defaults: orth. term 0.25)",
    "igu": "IGU-LoRA, no orth. term",
}
COLLAPSE_MARGIN = 0.03  # the budget plots' axis starts this far below the lowest median


def _acc(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def module_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def best_of(search: list[dict]) -> dict:
    """The run with the best validation accuracy (ties: the smaller lr)."""
    return max(search, key=lambda r: (r["val_accuracy"], -r["lr"]))


def _of(runs: list[dict], task: str, method: str, variant: str, budget: float | None) -> list[dict]:
    key = (task, method, variant, budget)
    return [r for r in runs if (r["task"], r["method"], r["variant"], r.get("budget")) == key]


def search_runs(
    runs: list[dict], task: str, method: str, budget: float | None = None, variant: str = "default"
) -> list[dict]:
    """A method's lr search: its runs of ``variant`` on seed 0 (at ``budget``; None: 6 -> 2), by lr
    (an ablation has one: it runs at the lr its reference's search selected)."""
    return sorted(
        (r for r in _of(runs, task, method, variant, budget) if r["seed"] == 0), key=lambda r: r["lr"]
    )


def lr_searched(runs: list[dict], task: str, method: str, budget: float | None, grid: tuple) -> bool:
    """Whether ``method``'s lr search at ``budget`` has run every lr of ``grid``."""
    return len(search_runs(runs, task, method, budget)) == len(grid)


def final_runs(
    runs: list[dict], task: str, method: str, budget: float | None = None, variant: str = "default"
) -> list[dict]:
    """A method's runs of ``variant`` at its selected lr (best seed-0 val), by seed; [] before a
    search."""
    search = search_runs(runs, task, method, budget, variant)
    if not search:
        return []
    lr = best_of(search)["lr"]
    return sorted(
        (r for r in _of(runs, task, method, variant, budget) if r["lr"] == lr), key=lambda r: r["seed"]
    )


def settled_runs(runs: list[dict], task: str, method: str, budget: float, grid: tuple) -> list[dict]:
    """:func:`final_runs` at ``budget`` once its lr search has run all of ``grid``; [] before (a
    partial search's selected lr may still move)."""
    return final_runs(runs, task, method, budget) if lr_searched(runs, task, method, budget, grid) else []


def paired_difference(
    runs: list[dict],
    task: str,
    method: str,
    other: str,
    budget: float | None = None,
    variant: str = "default",
) -> tuple[float, float, int]:
    """Mean and std over the seeds both ran of dev(method's ``variant``) - dev(other), and the
    number of seeds."""
    ours, theirs = (final_runs(runs, task, m, budget, v) for m, v in ((method, variant), (other, "default")))
    return seed_difference(ours, theirs)


def paired_devs(ours: list[dict], theirs: list[dict]) -> list[tuple[float, float]]:
    """(dev of ours, dev of theirs) on each seed both ran, by seed."""
    mine, other = ({r["seed"]: r["dev_accuracy"] for r in side} for side in (ours, theirs))
    return [(mine[s], other[s]) for s in sorted(mine.keys() & other.keys())]


def seed_difference(ours: list[dict], theirs: list[dict]) -> tuple[float, float, int]:
    """Mean and std of dev(ours) - dev(theirs) over the seeds both ran, and their number."""
    diffs = [a - b for a, b in paired_devs(ours, theirs)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return (statistics.mean(diffs) if diffs else 0.0), std, len(diffs)


def paired_line(difference: tuple[float, float, int]) -> str:
    """'dev +d +- s over n seeds (t = ...)' for a :func:`paired_difference`; '' below 2 seeds."""
    mean, std, n = difference
    if n < 2:
        return ""
    t = mean / (std / n**0.5) if std > 0 else float("nan")
    return f"dev {mean:+.4f} +- {std:.4f} over {n} seeds (t = {t:.2f})"


def paired_se(ours: list[dict], theirs: list[dict]) -> str:
    """'+d +- se (t = ...)': the mean paired dev difference over the seeds both ran and its standard
    error (no t where the differences agree to rounding); '' below 2 seeds."""
    mean, std, n = seed_difference(ours, theirs)
    if n < 2:
        return ""
    se = std / n**0.5
    return f"{mean:+.4f} +- {se:.4f}" + (f" (t = {mean / se:.2f})" if se > 1e-9 else "")


def seeds_ahead(ours: list[dict], theirs: list[dict]) -> str:
    """'k / n': on how many of the seeds both ran ``ours`` has the higher dev accuracy."""
    pairs = paired_devs(ours, theirs)
    return f"{sum(a > b for a, b in pairs)} / {len(pairs)}"


# The IGU-LoRA cell of the summary at a (task, budget): the library's defaults where they ran, else
# the nearest earlier defaults, named.
SUMMARY_IGU = (
    ("igu-orth-live", "window-2", "defaults"),
    ("igu-orth-live", "default", "defaults, but scoring every 2nd step"),
    ("igu-orth", "default", "term over every rank, scoring every 2nd step"),
)
SUMMARY_ANCHORS = {"adalora-orth": "AdaLoRA + term", "adalora": "AdaLoRA", "lora": "LoRA", "eva": "EVA"}
SUMMARY_SEEDS = 3  # a cell shows once it has run this many seeds
SUMMARY_HEADER = [
    "| task | model | avg. rank | IGU-LoRA | " + " | ".join(SUMMARY_ANCHORS.values())
    + " | IGU-LoRA - best anchor (paired +- s.e.) | seeds ahead | IGU-LoRA as run |",
    "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in SUMMARY_ANCHORS) + " | --- | ---: | --- |",
]  # fmt: skip
SUMMARY_FOOTNOTE = "(* the best anchor: the highest median of the anchors run; EVA runs on the decoder only)"


def summary_row(
    task: str, model: str, budget: float, igu: tuple[list[dict], str], anchors: dict[str, list[dict]]
) -> str | None:
    """One row of the practitioner's table: each method's dev median over its runs (cells with
    fewer than SUMMARY_SEEDS seeds stay empty) and IGU-LoRA (its runs, and how it ran) against the
    anchor of best median; None until IGU-LoRA and one anchor have their seeds."""
    ours, how = igu
    complete = {m: c for m, c in anchors.items() if len(c) >= SUMMARY_SEEDS}
    if len(ours) < SUMMARY_SEEDS or not complete:
        return None
    median = {m: statistics.median(r["dev_accuracy"] for r in c) for m, c in complete.items()}
    best = max(median, key=median.get)
    cells = [f"{median[m]:.3f}{'*' * (m == best)}" if m in median else "" for m in SUMMARY_ANCHORS]
    mine = statistics.median(r["dev_accuracy"] for r in ours)
    return (
        f"| {task} | {model} | {budget:g} | {mine:.3f} | " + " | ".join(cells)
        + f" | {paired_se(ours, complete[best])} | {seeds_ahead(ours, complete[best])} | {how} |"
    )  # fmt: skip


def summary_table(runs: list[dict], model: str = "MiniLM-L6") -> list[str]:
    """The practitioner's table of glue.py's runs: per task and average rank, each method at its
    selected lr, IGU-LoRA as the newest defaults that ran (SUMMARY_IGU)."""
    order = ("sst2", "rte", "subj", "cr")
    cells = sorted(
        {(r["task"], r["budget"]) for r in runs if r.get("budget") is not None},
        key=lambda cell: (order.index(cell[0]) if cell[0] in order else len(order), cell),
    )
    lines = list(SUMMARY_HEADER)
    for task, budget in cells:
        igu = next(
            (
                (done, label)
                for m, v, label in SUMMARY_IGU
                if len(done := final_runs(runs, task, m, budget, v)) >= SUMMARY_SEEDS
            ),
            ([], ""),
        )
        anchors = {m: final_runs(runs, task, m, budget) for m in SUMMARY_ANCHORS}
        if row := summary_row(task, model, budget, igu, anchors):
            lines.append(row)
    return lines + ["", SUMMARY_FOOTNOTE, ""]


def main_table(runs: list[dict], task: str) -> list[str]:
    """Per method: the lr search on val (seed 0), then dev over seeds at the selected lr; [] for a
    task without 6 -> 2 runs."""
    if not any(r["task"] == task and r.get("budget") is None for r in runs):
        return []
    lines = [
        f"### {task}",
        "",
        "| method | val acc. by lr (seed 0) | selected lr | dev acc. (seeds) | dev median | dev mean +- std "
        "| median step (s)* | peak RSS (MB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for (method, variant), label in METHOD_NAMES.items():
        final = final_runs(runs, task, method, variant=variant)
        if not final:
            continue
        search = search_runs(runs, task, method, variant=variant)
        dev = [r["dev_accuracy"] for r in final]
        grid = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in search)
        lines.append(
            f"| {label} | {grid} | {final[0]['lr']:g} | {_acc(dev)} | {statistics.median(dev):.4f} | "
            f"{_mean_std(dev)} | {statistics.median(r['median_step_s'] for r in final):.3f} | "
            f"{max(r['peak_rss_mb'] for r in final):.0f} |"
        )
    lines.append("")
    baselines = [m for m, v in METHOD_NAMES if v == "default" and not m.startswith("igu")]
    for ours in IGU_ROWS:
        for other in baselines:
            line = paired_line(paired_difference(runs, task, "igu", other, variant=ours[1]))
            if line:
                lines.append(
                    f"- paired by seed, {METHOD_NAMES[ours]} - {METHOD_NAMES[other, 'default']}: {line}"
                )
    return lines + [
        "",
        "*Inside the accuracy runs (1 thread each, two runs sharing the 2 cores): the fair step cost is "
        "the side-by-side table.",
        "",
    ]


def ablation_table(runs: list[dict], task: str, cost: dict[str, float]) -> list[str]:
    """IGU variants (6 -> 2) next to their references, the defaults and snr (the defaults of the
    ablations' era), each of those at its selected lr: val of seed 0, dev of every seed."""
    igu = [r for r in runs if r["task"] == task and r["method"] == "igu" and r.get("budget") is None]
    references = {v for _, v in IGU_ROWS}
    if all(r["variant"] in references for r in igu):
        return []
    selected = {v: best_of(s)["lr"] for v in references if (s := search_runs(runs, task, "igu", variant=v))}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in sorted(igu, key=lambda r: r["seed"]):
        if r["variant"] not in references or r["lr"] == selected.get(r["variant"]):
            groups.setdefault((r["variant"], r["lr"]), []).append(r)
    lines = [
        f"### {task}: IGU-LoRA ablations",
        "",
        "| variant | settings | lr | val acc. (seed 0) | dev acc. (seeds) | dev median "
        "| step cost (x PEFT AdaLoRA) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]

    def order(item):  # the references first, then by name with numbers in numeric order (gl-2 < gl-16)
        (variant, lr), _ = item
        named = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", variant)]
        return variant not in references, variant != "default", named, lr

    for (variant, lr), group in sorted(groups.items(), key=order):
        first, dev = group[0], [r["dev_accuracy"] for r in group]
        settings = ", ".join(f"{k}={v}" for k, v in first["overrides"].items()) or "library defaults"
        ratio = cost.get("igu (defaults)" if variant == "default" else f"igu {variant}")
        val = f"{first['val_accuracy']:.4f}" if first["seed"] == 0 else ""
        lines.append(
            f"| {variant} | {settings} | {lr:g} | {val} | {_acc(dev)} | {statistics.median(dev):.4f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return lines + [""]


def heatmaps(runs: list[dict], task: str, out: Path) -> Path | None:
    """AdaLoRA's and IGU-LoRA's final ranks (seed 0, selected lr) side by side."""
    panels = {}
    for method, variant in (("adalora", "default"), *IGU_ROWS):
        final = final_runs(runs, task, method, variant=variant)
        if final:
            best = final[0]  # seed 0: the run that selected the lr
            ranks = {module_name(k): v for k, v in best["active_ranks"].items()}
            panels[f"{METHOD_NAMES[method, variant]}, lr {best['lr']:g}"] = ranks
    if len(panels) < 2:
        return None
    return rank_panels(panels, out / f"{task}-ranks.png")


def adapter_parameters(run: dict, shapes: dict[str, tuple[int, int]]) -> int:
    """Trainable adapter parameters at the end of a run: each kept rank of a linear costs
    in + out (+ 1 for E in the SVD form); the classifier head, the same for all, is left out."""
    svd = run["method"] != "lora"
    return sum(r * (sum(shapes[module_name(m)]) + svd) for m, r in run["active_ranks"].items())


@dataclass(frozen=True)
class SweepPlan:
    """What the budget sweep runs (bench/quality/glue.py): ``ranks(budget)`` gives lora_r (None:
    no uniform rank), init_r and target_r, on ``sweep_tasks`` (None: every task with budget
    runs); issue #20's defaults are decided on ``default_tasks`` at ``default_budget``;
    ``majority`` is each task's majority-class share of its reported split; issue #35.2's
    candidates are compared by ``ig_rows``."""

    budgets: tuple[float, ...]
    methods: tuple[str, ...]
    seeds: int
    lr_grid: tuple[float, ...]
    ranks: Callable[[float], dict]
    default_tasks: tuple[str, ...] = ()
    default_budget: float = 2.0
    sweep_tasks: tuple[str, ...] | None = None
    majority: dict[str, float] = field(default_factory=dict)
    ig_cost_variants: dict[str, dict] = field(default_factory=dict)  # issue #35.2's candidates
    ig_rows: Callable[[dict], float] | None = None  # the IG node rows a run evaluated


def budget_table(runs: list[dict], task: str, shapes: dict, plan: SweepPlan) -> list[str]:
    """Per budget and method: the lr search, dev over seeds at the selected lr, the parameters
    at the end, IGU-LoRA's (at the defaults) paired difference; then the points still missing."""
    lines = [
        f"### {task}: accuracy against the budget",
        "",
        "| avg. rank | method | ranks | adapter params (end) | val by lr (seed 0) | lr | dev (seeds) "
        "| dev median | IGU-LoRA (defaults) - method (paired) |",
        "| ---: | --- | --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    missing = []
    for budget in plan.budgets:
        ranks = plan.ranks(budget)
        igu_searched = lr_searched(runs, task, IGU_DEFAULTS, budget, plan.lr_grid)  # to pair with
        for method in plan.methods:
            search, final = search_runs(runs, task, method, budget), final_runs(runs, task, method, budget)
            if method == "lora" and ranks["lora_r"] is None:
                lines.append(f"| {budget:g} | {BUDGET_NAMES[method]} | no uniform rank | | | | | | |")
                continue
            have = {r["seed"] for r in final}
            if len(search) < len(plan.lr_grid):
                missing.append(f"{budget:g} / {method}: lr search ({len(search)} of {len(plan.lr_grid)})")
                continue
            if len(have) < plan.seeds:
                missing.append(
                    f"{budget:g} / {method}: seeds {[s for s in range(plan.seeds) if s not in have]}"
                )
            dev = [r["dev_accuracy"] for r in final]
            shape = f"r = {ranks['lora_r']}" if method == "lora" else f"{ranks['init_r']} -> {budget:g}"
            params = statistics.median(adapter_parameters(r, shapes) for r in final)
            grid = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in search)
            paired = (
                paired_line(paired_difference(runs, task, IGU_DEFAULTS, method, budget))
                if method != IGU_DEFAULTS and igu_searched
                else ""
            )
            lr = final[0]["lr"]
            lines.append(
                f"| {budget:g} | {BUDGET_NAMES[method]} | {shape} | {params:,.0f} | {grid} | {lr:g} "
                f"| {_acc(dev)} | {statistics.median(dev):.4f} | {paired} |"
            )
    lines.append("")
    if missing:
        lines += ["Still missing (budget / method): " + "; ".join(missing) + ".", ""]
    return lines


def score_table(
    runs: list[dict], task: str, budget: float, variants: dict[str, str], grid: tuple
) -> list[str]:
    """IGU-LoRA's element scores at one budget, each at its selected lr: dev by seed, median, and
    the paired difference to the default score (once the default has searched ``grid``)."""
    searched = lr_searched(runs, task, "igu", budget, grid)
    if not searched or not any(final_runs(runs, task, "igu", budget, v) for v in variants):
        return []
    lines = [
        f"### {task}: IGU-LoRA's score at an average rank of {budget:g}",
        "",
        "| score | lr | dev (seeds) | dev median | paired - default |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    rows = {"default": f"{IGULoraConfig.score} (default)", **variants}
    for variant, label in rows.items():
        mine = final_runs(runs, task, "igu", budget, variant)
        if not mine:
            continue
        paired = ""
        if variant != "default":
            mean, std, n = paired_difference(runs, task, "igu", "igu", budget, variant)
            paired = f"{mean:+.4f} +- {std:.4f} over {n} seeds"
        lines.append(
            f"| {label} | {mine[0]['lr']:g} | {_acc(r['dev_accuracy'] for r in mine)} "
            f"| {statistics.median(r['dev_accuracy'] for r in mine):.4f} | {paired} |"
        )
    return lines + [""]


DEFAULT_CELLS = {
    "lora": "LoRA r = 2 (PEFT)",
    "adalora": "AdaLoRA (PEFT)",
    "adalora-orth": "AdaLoRA + orth. term (PEFT)",
    "igu": "IGU-LoRA, orth_reg_weight 0 (the default before the rule)",
    "igu-orth": "IGU-LoRA, orth_reg_weight 0.25 (the default by the rule)",
}
RULE_CELLS = ("igu", "igu-orth")  # the orth_reg_weight candidates, fixed before any run
# issue #20.3's fix, measured where the term helped and where it hurt; not a candidate of the rule
FIX_CELLS = {"igu-orth-late": "IGU-LoRA, orth_reg_weight 0.25 from tinit"}


def median_ranks(medians: dict[str, float]) -> dict[str, float]:
    """Rank 1 for the best median, ties sharing the mean of their places (two equal: 1.5 each)."""
    ordered = sorted(medians.values(), reverse=True)
    places = {}
    for value in set(ordered):
        at = [i + 1 for i, v in enumerate(ordered) if v == value]
        places[value] = statistics.mean(at)
    return {key: places[value] for key, value in medians.items()}


def defaults_section(runs: list[dict], plan: SweepPlan) -> list[str]:
    """Issue #20: every task and setting at one budget point (lr on val, dev over seeds 0 .. n-1,
    paired by seed against IGU-LoRA's defaults, igu-orth since the rule), then the orth_reg_weight
    rule of docs/results-details.md: per task the better median of igu / igu-orth ranks 1, the lower mean
    rank over the tasks wins (a tie keeps 0); undecided until every task has both."""
    tasks, budget = plan.default_tasks, plan.default_budget
    if not tasks:
        return []
    ranks = plan.ranks(budget)
    lines = [
        f"## The defaults on every task (average rank {budget:g}: {ranks['init_r']} -> {budget:g}, "
        f"LoRA r = {ranks['lora_r']})",
        "",
        "| task | setting | lr | dev (seeds) | dev median | IGU-LoRA (defaults) - setting (paired) |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    seeds, missing, rule, fixed = set(range(plan.seeds)), [], {}, []
    for task in tasks:
        igu_searched = lr_searched(runs, task, IGU_DEFAULTS, budget, plan.lr_grid)  # to pair with
        for method, label in {**DEFAULT_CELLS, **FIX_CELLS}.items():
            search = search_runs(runs, task, method, budget)
            final = [r for r in final_runs(runs, task, method, budget) if r["seed"] in seeds]
            if len(search) < len(plan.lr_grid) or {r["seed"] for r in final} != seeds:
                if method in DEFAULT_CELLS:
                    missing.append(f"{task} / {method}")
                continue
            dev = [r["dev_accuracy"] for r in final]
            median = statistics.median(dev)
            if method in RULE_CELLS:
                rule.setdefault(task, {})[method] = median
            if method in FIX_CELLS:
                from_0 = paired_difference(runs, task, method, "igu-orth", budget)
                fixed.append(f"{task} {paired_line(from_0)}")
            paired = (
                paired_line(paired_difference(runs, task, IGU_DEFAULTS, method, budget))
                if method != IGU_DEFAULTS and igu_searched
                else ""
            )
            lines.append(f"| {task} | {label} | {final[0]['lr']:g} | {_acc(dev)} | {median:.4f} | {paired} |")
    lines.append("")
    if missing:
        lines += ["Still missing (task / setting): " + "; ".join(missing) + ".", ""]
    decided = {task: m for task, m in rule.items() if len(m) == 2}
    if decided:
        per_task = {task: median_ranks(m) for task, m in decided.items()}
        mean = {w: statistics.mean(r[w] for r in per_task.values()) for w in ("igu", "igu-orth")}
        verdict = "0.25" if mean["igu-orth"] < mean["igu"] else "0"
        done = len(decided) == len(tasks)
        lines += [
            f"orth_reg_weight, mean rank of the median over {len(decided)} task(s) "
            f"({', '.join(decided)}): 0 -> {mean['igu']:.3g}, 0.25 -> {mean['igu-orth']:.3g}; "
            + (f"the rule sets {verdict}." if done else "undecided until every task has both."),
            "",
        ]
    if fixed:
        lines += ["The term from tinit against from step 0 (paired): " + "; ".join(fixed) + ".", ""]
    return lines


# Issue #35.1's rule (docs/results-details.md, fixed before any run): "live" is non-inferior unless its
# median falls below "all"'s by more than LIVE_MARGIN on two or more tasks, or LIVE_HARD_MARGIN on one.
LIVE_MARGIN, LIVE_HARD_MARGIN = 0.01, 0.02


def live_verdict(shortfall: dict[str, float]) -> str:
    """The orth_reg_ranks rule on each task's median(all) - median(live)."""
    over = [task for task, gap in shortfall.items() if gap > LIVE_MARGIN]
    if len(over) >= 2 or any(gap > LIVE_HARD_MARGIN for gap in shortfall.values()):
        return "all"
    return "live"


def live_ranks_section(runs: list[dict], plan: SweepPlan) -> list[str]:
    """Issue #35.1: per task, igu-orth (the term over all ranks) against igu-orth-live (over the
    kept ranks, which compacts) at igu-orth's selected lr, seeds paired; then the rule's state."""
    budget, seeds = plan.default_budget, set(range(plan.seeds))
    lines, shortfall = [], {}
    for task in plan.default_tasks:
        cells = {m: final_runs(runs, task, m, budget) for m in ("igu-orth", "igu-orth-live")}
        if not cells["igu-orth-live"]:
            continue
        by_seed = {m: {r["seed"]: r for r in cell if r["seed"] in seeds} for m, cell in cells.items()}
        paired = sorted(by_seed["igu-orth"].keys() & by_seed["igu-orth-live"].keys())
        medians = {m: statistics.median(r["dev_accuracy"] for r in by_seed[m].values()) for m in by_seed}
        overlap = [allocation_overlap(by_seed["igu-orth-live"][s], by_seed["igu-orth"][s]) for s in paired]
        if set(paired) == seeds:
            shortfall[task] = medians["igu-orth"] - medians["igu-orth-live"]
        lines.append(
            f"| {task} | {cells['igu-orth-live'][0]['lr']:g} "
            f"| {_acc(r['dev_accuracy'] for r in by_seed['igu-orth'].values())} | {medians['igu-orth']:.4f} "
            f"| {_acc(r['dev_accuracy'] for r in by_seed['igu-orth-live'].values())} "
            f"| {medians['igu-orth-live']:.4f} "
            f"| {paired_line(paired_difference(runs, task, 'igu-orth-live', 'igu-orth', budget))} "
            f"| {_acc(overlap)} |"
        )
    if not lines:
        return []
    missing = [task for task in plan.default_tasks if task not in shortfall]
    verb = "has" if len(missing) == 1 else "have"
    state = (
        f"undecided until {', '.join(missing)} {verb} every seed of both."
        if missing
        else f"the rule sets orth_reg_ranks = '{live_verdict(shortfall)}'."
    )
    return [
        f"## The term over all ranks against the kept ones (issue #35.1, average rank {budget:g})",
        "",
        "| task | lr | all: dev (seeds) | median | live: dev (seeds) | median | live - all (paired) "
        "| allocation overlap (seeds) |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | --- |",
        *lines,
        "",
        "Median shortfall of live (all - live): "
        + ", ".join(f"{task} {gap:+.4f}" for task, gap in shortfall.items())
        + f"; {state}",
        "",
    ]


# Issue #35.2's rule (docs/results-details.md, fixed before any run): a variant qualifies on a task when
# its median dev is within the task's margin of the defaults' and its allocation overlaps the
# paired seed's at least as much as two seeds of the defaults overlap each other.
IG_COST_MARGINS = {"sst2": 0.01, "rte": 0.02}


def seed_overlap(cell: list[dict]) -> float:
    """Mean allocation overlap between the runs of different seeds of one cell (the noise floor)."""
    pairs = [allocation_overlap(a, b) for a in cell for b in cell if a["seed"] != b["seed"]]
    return statistics.mean(pairs)


def ig_cost_section(runs: list[dict], plan: SweepPlan) -> list[str]:
    """Issue #35.2: each of ``plan.ig_cost_variants`` (run on the defaults' method at its lr)
    against that method's cell, seeds paired: dev, overlap with the paired seed, IG node rows
    (``plan.ig_rows(run)``) relative to the defaults'; then the rule's verdict once every task has
    every seed."""
    budget, seeds = plan.default_budget, set(range(plan.seeds))
    variants, rows = plan.ig_cost_variants, plan.ig_rows
    varied = [r for r in runs if r["variant"] in variants and r.get("budget") == budget]
    if not varied or rows is None:
        return []
    method = varied[0]["method"]
    lines, qualifies, cost = [], {v: True for v in variants}, {}
    medians: dict[str, list[float]] = {v: [] for v in variants}
    for task in IG_COST_MARGINS:
        reference = {r["seed"]: r for r in final_runs(runs, task, method, budget) if r["seed"] in seeds}
        if set(reference) != seeds:
            qualifies = {v: None for v in variants}
            continue
        floor, ref_median = (
            seed_overlap(list(reference.values())),
            statistics.median(r["dev_accuracy"] for r in reference.values()),
        )
        ref_rows = statistics.mean(rows(r) for r in reference.values())
        lines.append(
            f"| {task} | defaults ({method}) | {_acc(r['dev_accuracy'] for r in reference.values())} "
            f"| {ref_median:.4f} |  | {floor:.3f} (seed to seed) | 1.00 |  |"
        )
        for variant in variants:
            cell = {r["seed"]: r for r in varied if r["task"] == task and r["variant"] == variant}
            if not cell:
                qualifies[variant] = None
                continue
            dev = [cell[s]["dev_accuracy"] for s in sorted(cell)]
            median = statistics.median(dev)
            overlap = statistics.mean(allocation_overlap(cell[s], reference[s]) for s in cell)
            share = statistics.mean(rows(r) for r in cell.values()) / ref_rows
            cost[variant] = max(cost.get(variant, 0.0), share)
            passed = median >= ref_median - IG_COST_MARGINS[task] and overlap >= floor
            if set(cell) != seeds:
                qualifies[variant] = None
            elif qualifies[variant] is not None:
                qualifies[variant] = qualifies[variant] and passed
            medians[variant].append(median)
            paired = paired_line(paired_difference(runs, task, method, method, budget, variant))
            lines.append(
                f"| {task} | {variant} | {_acc(dev)} | {median:.4f} | {paired} | {overlap:.3f} | {share:.2f} "
                f"| {'yes' if passed else 'no'} |"
            )
    if not lines:
        return []
    if any(q is None for q in qualifies.values()):
        verdict = "undecided until every variant has every seed on both tasks."
    else:
        passing = sorted((cost[v], -statistics.mean(medians[v]), v) for v, q in qualifies.items() if q)
        verdict = (
            f"qualify: {', '.join(v for _, _, v in passing)}; the rule makes {passing[0][2]} the default."
            if passing
            else "none qualifies: the defaults stay."
        )
    return [
        f"## IG node rows where they count (issue #35.2, average rank {budget:g})",
        "",
        "| task | setting | dev (seeds) | dev median | setting - defaults (paired) | allocation overlap "
        "| IG node rows / defaults | within the rule |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- |",
        *lines,
        "",
        verdict,
        "",
    ]


def _saved(fig, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label the figure's one axes, add its legend, write it to ``path`` and close it."""
    ax = fig.axes[0]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _written(fig, path)


def _written(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def budget_plot(runs: list[dict], task: str, shapes: dict, plan: SweepPlan, out: Path) -> Path | None:
    """Dev accuracy (median, min-max over seeds) against the adapter parameters at the end. The
    axis starts COLLAPSE_MARGIN below the lowest median: a seed further down (a run that collapsed
    to the majority class) is a marker on the bottom edge with its value, so the medians stay
    readable."""
    curves = {}
    for method in plan.methods:
        points = []
        for budget in plan.budgets:
            final = settled_runs(runs, task, method, budget, plan.lr_grid)
            if final:
                dev = [r["dev_accuracy"] for r in final]
                x = statistics.median(adapter_parameters(r, shapes) for r in final)
                points.append((x, statistics.median(dev), min(dev), max(dev), budget))
        if points:
            curves[method] = points
    if not curves:
        return None
    floor = min(p[1] for points in curves.values() for p in points) - COLLAPSE_MARGIN
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(plan.methods):
        if method not in curves:
            continue
        x, med, lo, hi, budget = zip(*curves[method])
        shift = [v * (1 + 0.02 * (i - (len(plan.methods) - 1) / 2)) for v in x]  # side by side
        bars = ax.errorbar(
            shift,
            med,
            yerr=[[m - max(a, floor) for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
            marker="o",
            capsize=3,
            label=BUDGET_NAMES[method],
        )
        for xi, low in zip(shift, lo):
            if low < floor:
                ax.plot([xi], [floor], marker="v", color=bars.lines[0].get_color())
                ax.annotate(
                    f"a seed at {low:.3f}",
                    (xi, floor),
                    textcoords="offset points",
                    xytext=(-20, 6),
                    fontsize=7,
                )
        if method == IGU_DEFAULTS:
            for xi, yi, b in zip(shift, med, budget):
                ax.annotate(f"avg r {b:g}", (xi, yi), textcoords="offset points", xytext=(4, -12), fontsize=7)
    share = plan.majority.get(task, 0.0)
    if share > floor:  # the majority class, where it is near the medians (RTE's, not SST-2's)
        ax.axhline(share, color="grey", linestyle="--", linewidth=0.8, label=f"majority class ({share:.3f})")
    ax.set_ylim(bottom=floor - COLLAPSE_MARGIN / 10)
    ax.set_xscale("log")
    return _saved(
        fig,
        out / f"{task}-budget.png",
        "trainable adapter parameters at the end (log)",
        "dev accuracy (median, min-max over seeds)",
        f"MiniLM on {task}: accuracy against the budget",
    )


def budget_loss_plot(runs: list[dict], task: str, plan: SweepPlan, out: Path) -> Path | None:
    """Training loss (10-step means, median over seeds at the selected lr) against the step, one
    panel per budget, beside ln 2 (a binary task's loss at chance): whether a method learned, and
    from when. PEFT AdaLoRA with its term logs the term inside its loss (its first steps sit
    above the panel)."""
    panels = {}
    for budget in plan.budgets:
        curves = {}
        for method in plan.methods:
            final = [r for r in settled_runs(runs, task, method, budget, plan.lr_grid) if "loss_curve" in r]
            if final:
                curves[method] = [statistics.median(step) for step in zip(*(r["loss_curve"] for r in final))]
        if curves:
            panels[budget] = curves
    if not panels:
        return None
    chance = math.log(2)
    width = 3.4 * len(panels)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(width, 3.6), sharey=True, squeeze=False)
    legend = {}  # one entry per method over all panels
    for ax, (budget, curves) in zip(axes[0], panels.items()):
        for method, curve in curves.items():
            steps = [10 * i for i in range(len(curve))]
            (legend[BUDGET_NAMES[method]],) = ax.plot(steps, curve, color=f"C{plan.methods.index(method)}")
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"avg. rank {budget:g}")
        ax.set_xlabel("step")
    bottom = min(min(curve) for curves in panels.values() for curve in curves.values())
    axes[0][0].set_ylim(bottom - 0.02, chance + 0.04)
    axes[0][0].set_ylabel("loss (10-step means, median over seeds)")
    fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3)
    fig.suptitle(f"MiniLM on {task}: training loss at the selected lr (dashed: ln 2)")
    return _written(fig, out / f"{task}-budget-loss.png")


def budget_heatmaps(runs: list[dict], task: str, plan: SweepPlan, out: Path) -> Path | None:
    """Final ranks per layer at the smallest budget (seed 0, selected lr): each adaptive method,
    and the IGU-LoRA score variants that ran there, side by side."""
    budget, panels = min(plan.budgets), {}
    for method in (m for m in plan.methods if m != "lora"):  # the adaptive ones
        final = settled_runs(runs, task, method, budget, plan.lr_grid)
        if final and final[0]["seed"] == 0:
            panels[BUDGET_NAMES[method]] = {module_name(k): v for k, v in final[0]["active_ranks"].items()}
    for variant in SCORE_VARIANTS:
        final = final_runs(runs, task, "igu", budget, variant)
        if final and final[0]["seed"] == 0:
            panels[f"IGU-LoRA, {variant}"] = {module_name(k): v for k, v in final[0]["active_ranks"].items()}
    if len(panels) < 2:
        return None
    return rank_panels(panels, out / f"{task}-budget-{budget:g}-ranks.png")


def rank_overlap(ours: dict[str, int], theirs: dict[str, int]) -> float:
    """Share of ``theirs``' ranks that ``ours`` holds on the same modules: sum of min / sum of theirs."""
    return sum(min(ours.get(m, 0), r) for m, r in theirs.items()) / max(1, sum(theirs.values()))


def allocation_overlap(run: dict, other: dict) -> float:
    """Share of ``other``'s kept ranks that ``run`` keeps on the same modules."""
    ours, theirs = ({module_name(k): v for k, v in r["active_ranks"].items()} for r in (run, other))
    return rank_overlap(ours, theirs)


def window_residuals(checks: list, window: int) -> list[float]:
    """``sum |delta| / sum |gap|`` over consecutive windows of a run's ig_checks
    ([step, nodes, sum(IG), L(theta) - L(0)])."""
    out = []
    for i in range(0, len(checks) - window + 1, window):
        part = checks[i : i + window]
        gap = sum(abs(c[3]) for c in part)
        out.append(sum(abs(c[2] - c[3]) for c in part) / gap if gap else float("inf"))
    return out


def _fixed_count_twin(runs: list[dict], run: dict) -> dict | None:
    """The run of ``run``'s task, budget, lr and seed whose overrides are its own without
    ``ig_steps``: the same settings at the default (fixed) node count."""
    want = {k: v for k, v in run["overrides"].items() if k != "ig_steps"}
    same = ("task", "method", "budget", "lr", "seed")
    return next(
        (r for r in runs if r["overrides"] == want and all(r.get(k) == run.get(k) for k in same)), None
    )


def auto_nodes_section(runs: list[dict], task: str, out: Path, window: int, fixed: int) -> list[str]:
    """ig_steps="auto" against the fixed count of the same settings, seeds and lr: the nodes it
    used, its residual, the IG rows it evaluated, accuracy and allocation."""
    auto = final_runs(runs, task, "igu", variant="gl-auto")
    checked = {r["seed"]: r for r in final_runs(runs, task, "igu", variant="gl-3-checked")}
    if not auto:
        return []
    lines = [
        f'### {task}: `ig_steps="auto"` against {fixed} fixed nodes',
        "",
        "| seed | nodes used (mean, range) | node evaluations vs fixed "
        "| window residual, median (auto / fixed) | dev auto / fixed | allocation overlap |",
        "| ---: | --- | ---: | --- | --- | ---: |",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for run in auto:
        nodes = [c[1] for c in run["ig_checks"]]
        base = _fixed_count_twin(runs, run)
        reference = checked.get(run["seed"])
        ours = statistics.median(window_residuals(run["ig_checks"], window))
        theirs = "-"
        if reference:
            theirs = f"{statistics.median(window_residuals(reference['ig_checks'], window)):.3f}"
        dev = f"{run['dev_accuracy']:.4f} / " + (f"{base['dev_accuracy']:.4f}" if base else "-")
        overlap = f"{allocation_overlap(run, base):.3f}" if base else "-"
        lines.append(
            f"| {run['seed']} | {statistics.mean(nodes):.2f} ({min(nodes)}-{max(nodes)}) "
            f"| {sum(nodes) / (fixed * len(nodes)):.2f} | {ours:.3f} / {theirs} | {dev} | {overlap} |"
        )
        ax.step([c[0] for c in run["ig_checks"]], nodes, where="post", label=f"seed {run['seed']}")
    title = f"{task}: nodes chosen by ig_steps='auto'"
    path = _saved(fig, out / f"{task}-auto-nodes.png", "step", "Gauss-Legendre nodes", title)
    return lines + ["", f"![{path.stem}]({path.name})", ""]


def write_report(
    runs: list[dict], out: Path, shapes: dict | None = None, plan: SweepPlan | None = None
) -> Path:
    """Write ``out/report.md`` (and the heatmaps beside it); print it too. ``shapes`` (module ->
    (in, out)) and ``plan`` (budgets, methods, seeds) add the budget sweep's tables and plots."""
    cost_file = max(out.parent.glob("*-step-cost.json"), default=None)
    cost = {}
    if cost_file is not None:
        cost = {r["method"]: r["ratio_to_adalora"] for r in json.loads(cost_file.read_text())["records"]}
    lines = ["## Summary", "", *summary_table(runs)]
    swept = sorted({r["task"] for r in runs if r.get("budget") is not None})
    if plan and plan.sweep_tasks is not None:  # the defaults' other tasks: in their own table
        swept = [task for task in swept if task in plan.sweep_tasks]
    if swept and shapes and plan:
        lines += ["## Accuracy against the budget", ""]
        for task in swept:
            lines += budget_table(runs, task, shapes, plan)
            lines += score_table(runs, task, min(plan.budgets), SCORE_VARIANTS, plan.lr_grid)
            for image in (
                budget_plot(runs, task, shapes, plan, out),
                budget_loss_plot(runs, task, plan, out),
                budget_heatmaps(runs, task, plan, out),
            ):
                if image is not None:
                    lines += [f"![{image.stem}]({image.name})", ""]
        lines += defaults_section(runs, plan)
        lines += live_ranks_section(runs, plan)
        lines += ig_cost_section(runs, plan)
    lines += ["## Matched-budget comparison", ""]
    for task in sorted({r["task"] for r in runs}):
        lines += main_table(runs, task)
        image = heatmaps(runs, task, out)
        if image is not None:
            lines += [f"![{task} ranks]({image.name})", ""]
    for task in sorted({r["task"] for r in runs}):
        lines += ablation_table(runs, task, cost)
        lines += auto_nodes_section(runs, task, out, WINDOW, IGULoraConfig.ig_steps)
    if cost_file is not None:
        lines.append(f"Step costs from `{cost_file.name}`.")
    text = "\n".join(lines) + "\n"
    path = out / "report.md"
    path.write_text(text)
    print(text)
    return path
