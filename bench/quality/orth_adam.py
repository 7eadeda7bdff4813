"""Why the orthogonality term slows learning: it fills Adam's second moments of A and B first.

    python bench/quality/orth_adam.py [--steps 30]

At AdaLoRA's init (E = 0, A, B ~ N(0, 0.02)) the task gives A and B no gradient, so for the first
steps their Adam second moments see only the regulariser's gradient, which pulls the rows of A
to unit norm. The task gradient that arrives once E is nonzero is then small against sqrt(v), and
Adam moves A and B by that ratio of the lr until v decays (beta2 = 0.999: ~1000 steps, longer than
these runs). For each orthogonality weight: IGU-LoRA on MiniLM with the glue.py SST-2 protocol
(lr 5e-3, seed 0) for --steps steps, then the RMS of the task-only gradient of every A and B
over Adam's bias-corrected sqrt(v) (median over matrices), the mean row norm of A, and the
training loss of the last 10 steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue import build, minilm_path, run_args, split_train  # noqa: E402

from igulora.finetune import Batches, warmup_linear_schedule  # noqa: E402

BETA2 = 0.999  # torch.optim.AdamW's default


def measure(weight: float, steps: int, train, tokenizer) -> dict[str, float]:
    from transformers import AutoModelForSequenceClassification

    total_step = len(train) // 32
    args = run_args("sst2", total_step, lr=5e-3, orth_reg_weight=weight)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    igu, loss_fn, after_step = build("igu", model, args, total_step)
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=args.lr)
    scheduler = warmup_linear_schedule(optimizer, args)
    batches = Batches(train, tokenizer, args)
    losses = []
    for step in range(steps):
        loss_fn(batches(step)).backward()
        optimizer.step()
        scheduler.step()
        after_step(step, optimizer)
        optimizer.zero_grad()
        losses.append(float(igu.last_loss))
    igu.config.orth_reg_weight = 0.0  # the next gradient is the task's alone
    loss_fn(batches(steps)).backward()
    ratios = []
    for layer in igu.adapters.values():
        for p in (layer.lora_A, layer.lora_B):
            v = optimizer.state[p]["exp_avg_sq"] / (1 - BETA2**steps)
            ratios.append(float(p.grad.pow(2).mean().sqrt() / v.mean().sqrt()))
    rows = [float(layer.lora_A.detach().norm(dim=1).mean()) for layer in igu.adapters.values()]
    return {
        "task_grad_over_sqrt_v": statistics.median(ratios),
        "mean_A_row_norm": statistics.mean(rows),
        "loss_last_10": statistics.mean(losses[-10:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--weights", default="0.25,0", help="orthogonality weights to compare")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    train, _, _ = split_train("sst2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    print("orth weight | task grad RMS / sqrt(v), A and B | mean row norm of A | loss, last 10 steps")
    for weight in (float(w) for w in args.weights.split(",")):
        m = measure(weight, args.steps, train, tokenizer)
        print(
            f"{weight:g} | {m['task_grad_over_sqrt_v']:.3f} | {m['mean_A_row_norm']:.2f} | "
            f"{m['loss_last_10']:.3f}"
        )


if __name__ == "__main__":
    main()
