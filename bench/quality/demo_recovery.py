"""Planted-rank recovery of ``igulora demo`` under each scoring setting, over seeds.

    python bench/quality/demo_recovery.py --json bench/results/<date>-demo-recovery.json

The demo distils a tiny Llama teacher whose low-rank updates were planted on known modules; the
recovery score is the share of the planted rank that allocation puts on those modules (1 = all).
It isolates allocation quality from downstream accuracy noise, at a few seconds per run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from igulora.demo import run_demo  # noqa: E402

# The settings studied under the defaults before 2026-12-02, whose score was snr, name it.
_SNR_ERA = {
    "gradient, snr": dict(ig_rule="gradient"),
    "IG, snr (former default)": {},
    "IG, auto nodes": dict(ig_steps="auto"),
    "IG, 3 nodes checked": dict(ig_residual=True),
    # the node budget's trade-off: fixed counts against auto at several tolerances
    **{f"IG, {n} nodes checked": dict(ig_steps=n, ig_residual=True) for n in (1, 2, 4)},
    **{f"IG, auto nodes, tolerance {t:g}": dict(ig_steps="auto", ig_tolerance=t) for t in (0.02, 0.3, 1.0)},
    "orth 0.25 (former default)": dict(orth_reg_weight=0.25),
    "every 1": dict(ig_every=1),
    "fraction 0.25": dict(ig_fraction=0.25),
    "every 1, fraction 0.25": dict(ig_every=1, ig_fraction=0.25),
    "every 4, fraction 0.25": dict(ig_every=4, ig_fraction=0.25),
}
SETTINGS = {
    "AdaLoRA score (gradient, product)": dict(ig_rule="gradient", score="product"),
    "IG, product": dict(score="product"),
    "IGU defaults (IG, stable_magnitude)": {},
    **{(n if "snr" in n else f"{n}, snr"): dict(overrides, score="snr") for n, overrides in _SNR_ERA.items()},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", help="names separated by ; (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    records = []
    print(f"{'setting':<36} {'recovery by seed':<22} {'mean':>6}")
    chosen = args.settings.split(";") if args.settings else list(SETTINGS)
    for name, overrides in ((n, SETTINGS[n]) for n in chosen):
        scores = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                result = run_demo(out, seed=seed, progress=False, overrides=overrides)
                with open(Path(out) / "metrics.csv", newline="") as f:  # the checked scoring steps
                    checked = [row for row in csv.DictReader(f) if row["ig_nodes"]]
                nodes = [float(row["ig_nodes"]) for row in checked]
            scores.append(result.recovery)
            record = {"setting": name, "overrides": overrides, "seed": seed, "recovery": result.recovery}
            if nodes:
                record["mean_ig_nodes"] = statistics.mean(nodes)
                record["median_ig_residual"] = statistics.median(float(row["ig_residual"]) for row in checked)
            records.append(record)
        mine = [r for r in records if r["setting"] == name and "mean_ig_nodes" in r]
        checks = ""
        if mine:
            nodes = statistics.mean(r["mean_ig_nodes"] for r in mine)
            residual = statistics.median(r["median_ig_residual"] for r in mine)
            checks = f"  (IG nodes {nodes:.2f} on average, relative residual {residual:.3f})"
        by_seed = ", ".join(f"{s:.2f}" for s in scores)
        print(f"{name:<36} {by_seed:<22} {statistics.mean(scores):>6.3f}{checks}")
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
