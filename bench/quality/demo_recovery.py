"""Planted-rank recovery of ``igulora demo`` under each scoring setting, over seeds.

    python bench/quality/demo_recovery.py --json bench/results/<date>-demo-recovery.json

The demo distils a tiny Llama teacher whose low-rank updates were planted on known modules; the
recovery score is the share of the planted rank that allocation puts on those modules (1 = all).
It isolates allocation quality from downstream accuracy noise, at a few seconds per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from igulora.demo import run_demo  # noqa: E402

SETTINGS = {
    "AdaLoRA score (gradient, product)": dict(ig_rule="gradient", score="product"),
    "gradient, snr": dict(ig_rule="gradient"),
    "IG, product": dict(score="product"),
    "IGU defaults": {},
    "IG, stable_magnitude": dict(score="stable_magnitude"),
    "IG, auto nodes": dict(ig_steps="auto"),
    "orth 0.25 (former default)": dict(orth_reg_weight=0.25),
    "every 1": dict(ig_every=1),
    "fraction 0.25": dict(ig_fraction=0.25),
    "every 1, fraction 0.25": dict(ig_every=1, ig_fraction=0.25),
    "every 4, fraction 0.25": dict(ig_every=4, ig_fraction=0.25),
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
            scores.append(result.recovery)
            records.append(
                {"setting": name, "overrides": overrides, "seed": seed, "recovery": result.recovery}
            )
        print(f"{name:<36} {', '.join(f'{s:.2f}' for s in scores):<22} {statistics.mean(scores):>6.3f}")
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
