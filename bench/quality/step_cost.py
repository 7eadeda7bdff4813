"""Training-step cost of IGU-LoRA (defaults and every ablation) against PEFT LoRA and AdaLoRA.

    python bench/quality/step_cost.py --json bench/results/<date>-step-cost.json

Side by side in one process: every method gets its own MiniLM copy (the glue.py protocol,
SST-2 batches of 32 sentences, max 64 tokens) and they take turns, one block of 4 optimizer steps
each per round (4 = the least common multiple of the ``ig_every`` settings, so a block holds the
same share of scoring steps as a whole run). Steps sit in the budget phase, where IGU-LoRA
scores. Reported: the median over rounds of the per-step time of a block, and its ratio to PEFT
AdaLoRA's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue import ABLATIONS, build, minilm_path, run_args, split_train  # noqa: E402

from igulora.finetune import Batches  # noqa: E402

BLOCK = 4


def variants(names: list[str]) -> dict[str, tuple[str, dict]]:
    """name -> (method, FinetuneArgs overrides)."""
    table = {"lora (PEFT)": ("lora", {}), "adalora (PEFT)": ("adalora", {}), "igu (defaults)": ("igu", {})}
    table.update({f"igu {v}": ("igu", ABLATIONS[v]) for v in names})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated, or '' for none")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    train, _, _ = split_train("sst2")
    total_step = len(train) // 32
    tokenizer = AutoTokenizer.from_pretrained(path)
    runs = {}
    for name, (method, overrides) in variants([v for v in args.ablations.split(",") if v]).items():
        fargs = run_args("sst2", total_step, **overrides)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        module, loss_fn, after_step = build(method, model, fargs, total_step)
        module.train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        runs[name] = (loss_fn, after_step, optimizer)  # the closures keep the module
    batches = Batches(train, tokenizer, fargs)
    first = total_step // 10 + 1  # past tinit: the budget phase
    blocks = [[batches(first + BLOCK * r + i) for i in range(BLOCK)] for r in range(args.rounds + 1)]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r, block in enumerate(blocks):  # round 0 warms up
        for name, (loss_fn, after_step, optimizer) in runs.items():
            start = time.perf_counter()
            for i, batch in enumerate(block):
                loss_fn(batch).backward()
                optimizer.step()
                after_step(first + BLOCK * r + i, optimizer)
                optimizer.zero_grad()
            if r:
                seconds[name].append((time.perf_counter() - start) / BLOCK)
    base = statistics.median(seconds["adalora (PEFT)"])
    records = []
    print(f"{'method':<44} {'median s/step':>13} {'x AdaLoRA':>10}")
    for name, times in seconds.items():
        median = statistics.median(times)
        records.append({"method": name, "median_s_per_step": median, "ratio_to_adalora": median / base})
        print(f"{name:<44} {median:>13.3f} {median / base:>10.2f}")
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "command": "python " + " ".join(sys.argv),
            "rounds": args.rounds,
            "block_steps": BLOCK,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
