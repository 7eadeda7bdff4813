"""Markdown tables and rank heatmaps from glue.py's runs (``python bench/quality/glue.py report``)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from igulora.plots import rank_panels  # noqa: E402

METHOD_NAMES = {"lora": "LoRA r=2 (PEFT)", "adalora": "AdaLoRA 6->2 (PEFT)", "igu": "IGU-LoRA 6->2 (igulora)"}


def _acc(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def _module_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def best_of(search: list[dict]) -> dict:
    """The run with the best validation accuracy (ties: the smaller lr)."""
    return max(search, key=lambda r: (r["val_accuracy"], -r["lr"]))


def search_runs(runs: list[dict], task: str, method: str) -> list[dict]:
    """A method's lr search: its default runs on seed 0, by lr."""
    key = (task, method, "default", 0)
    return sorted(
        (r for r in runs if (r["task"], r["method"], r["variant"], r["seed"]) == key), key=lambda r: r["lr"]
    )


def final_runs(runs: list[dict], task: str, method: str) -> list[dict]:
    """A method's default runs at its selected lr (best seed-0 val), by seed; [] before a search."""
    search = search_runs(runs, task, method)
    if not search:
        return []
    lr = best_of(search)["lr"]
    mine = (
        r for r in runs if (r["task"], r["method"], r["variant"], r["lr"]) == (task, method, "default", lr)
    )
    return sorted(mine, key=lambda r: r["seed"])


def paired_difference(runs: list[dict], task: str, method: str, other: str) -> tuple[float, float, int]:
    """Mean and std over the seeds both ran of dev(method) - dev(other), and the number of seeds."""
    ours, theirs = (
        {r["seed"]: r["dev_accuracy"] for r in final_runs(runs, task, m)} for m in (method, other)
    )
    diffs = [ours[s] - theirs[s] for s in sorted(ours.keys() & theirs.keys())]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return (statistics.mean(diffs) if diffs else 0.0), std, len(diffs)


def main_table(runs: list[dict], task: str) -> list[str]:
    """Per method: the lr search on val (seed 0), then dev over seeds at the selected lr."""
    lines = [
        f"### {task}",
        "",
        "| method | val acc. by lr (seed 0) | selected lr | dev acc. (seeds) | dev median | dev mean +- std "
        "| median step (s)* | peak RSS (MB) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for method, label in METHOD_NAMES.items():
        final = final_runs(runs, task, method)
        if not final:
            continue
        search = search_runs(runs, task, method)
        dev = [r["dev_accuracy"] for r in final]
        grid = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in search)
        lines.append(
            f"| {label} | {grid} | {final[0]['lr']:g} | {_acc(dev)} | {statistics.median(dev):.4f} | "
            f"{_mean_std(dev)} | {statistics.median(r['median_step_s'] for r in final):.3f} | "
            f"{max(r['peak_rss_mb'] for r in final):.0f} |"
        )
    lines.append("")
    for other in ("adalora", "lora"):
        mean, std, n = paired_difference(runs, task, "igu", other)
        if n > 1:
            t = mean / (std / n**0.5) if std > 0 else float("nan")
            lines.append(
                f"- paired by seed, IGU-LoRA - {METHOD_NAMES[other]}: dev {mean:+.4f} +- {std:.4f} "
                f"over {n} seeds (t = {t:.2f})"
            )
    return lines + [
        "",
        "*Inside the accuracy runs (1 thread each, two runs sharing the 2 cores): the fair step cost is "
        "the side-by-side table.",
        "",
    ]


def ablation_table(runs: list[dict], task: str, cost: dict[str, float]) -> list[str]:
    """IGU variants next to the defaults at IGU's selected lr: val of seed 0, dev of every seed."""
    igu = [r for r in runs if r["task"] == task and r["method"] == "igu"]
    defaults = [r for r in igu if r["variant"] == "default" and r["seed"] == 0]
    if not defaults or all(r["variant"] == "default" for r in igu):
        return []
    lr = best_of(defaults)["lr"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in sorted(igu, key=lambda r: r["seed"]):
        if r["variant"] != "default" or r["lr"] == lr:
            groups.setdefault((r["variant"], r["lr"]), []).append(r)
    lines = [
        f"### {task}: IGU-LoRA ablations",
        "",
        "| variant | settings | lr | val acc. (seed 0) | dev acc. (seeds) | dev median "
        "| step cost (x PEFT AdaLoRA) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]

    def order(item):  # the defaults first, then by name with numbers in numeric order (gl-2 < gl-16)
        (variant, lr), _ = item
        return variant != "default", [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", variant)], lr

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
    for method in ("adalora", "igu"):
        final = final_runs(runs, task, method)
        if final:
            best = final[0]  # seed 0: the run that selected the lr
            ranks = {_module_name(k): v for k, v in best["active_ranks"].items()}
            panels[f"{METHOD_NAMES[method]}, lr {best['lr']:g}"] = ranks
    if len(panels) < 2:
        return None
    return rank_panels(panels, out / f"{task}-ranks.png")


def write_report(runs: list[dict], out: Path) -> Path:
    """Write ``out/report.md`` (and the heatmaps beside it); print it too."""
    cost_file = max(out.parent.glob("*-step-cost.json"), default=None)
    cost = {}
    if cost_file is not None:
        cost = {r["method"]: r["ratio_to_adalora"] for r in json.loads(cost_file.read_text())["records"]}
    lines = ["## Matched-budget comparison", ""]
    for task in sorted({r["task"] for r in runs}):
        lines += main_table(runs, task)
        image = heatmaps(runs, task, out)
        if image is not None:
            lines += [f"![{task} ranks]({image.name})", ""]
    for task in sorted({r["task"] for r in runs}):
        lines += ablation_table(runs, task, cost)
    if cost_file is not None:
        lines.append(f"Step costs from `{cost_file.name}`.")
    text = "\n".join(lines) + "\n"
    path = out / "report.md"
    path.write_text(text)
    print(text)
    return path
