"""Why the orthogonality term slows learning: it fills Adam's second moments of A and B first.

    python bench/quality/orth_adam.py [--task subj] [--lr 5e-3] [--steps 40]

At AdaLoRA's init (E = 0, A, B ~ N(0, 0.02)) the task gives A and B no gradient, so for the first
steps their Adam second moments see only the regulariser's gradient, which pulls the rows of A
to unit norm. The task gradient that arrives once E is nonzero is then small against sqrt(v), and
Adam moves A and B by that ratio of the lr until v decays (beta2 = 0.999: ~1000 steps, longer than
these runs). The fix, ``orth_reg_start="tinit"``, adds the term once the initial phase has grown
E, so that v holds the task's gradients first. For each glue.py IGU method (igu: weight 0;
igu-orth: 0.25 from step 0; igu-orth-late: 0.25 from tinit), IGU-LoRA on MiniLM with the
glue.py protocol (seed 0, average rank 2), every 10 steps: the RMS of the task-only gradient of
every A and B over Adam's bias-corrected sqrt(v) (median over matrices), the mean row norm of A
and the training loss of the last 10 steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue import (
    DEFAULTS_BUDGET,
    IGU_METHODS,
    TASKS,
    build,
    epoch_steps,
    method_overrides,
    minilm_path,
    run_args,
    split_train,
)  # noqa: E402

from igulora.finetune import Batches, warmup_linear_schedule  # noqa: E402

BETA2 = 0.999  # torch.optim.AdamW's default


def task_over_sqrt_v(igu, optimizer, loss_fn, batch, steps: int) -> float:
    """Median over A and B matrices of RMS(task-only gradient of ``batch``) / RMS(sqrt(v))."""
    weight, igu.igu_config.orth_reg_weight = igu.igu_config.orth_reg_weight, 0.0
    loss_fn(batch).backward()
    igu.igu_config.orth_reg_weight = weight
    ratios = []
    for layer in igu.adapters.values():
        for p in (layer.lora_A, layer.lora_B):
            if p.grad is None:  # an adapter the budget has emptied
                continue
            v = optimizer.state[p]["exp_avg_sq"] / (1 - BETA2**steps)
            ratios.append(float(p.grad.pow(2).mean().sqrt() / v.mean().sqrt()))
    optimizer.zero_grad()
    return statistics.median(ratios)


def measure(task: str, lr: float, method: str, steps: int, train, tokenizer) -> list[dict[str, float]]:
    """``method`` (of IGU_METHODS) at the #20 budget; every 10 steps: the step, the term's first
    step, task gradient / sqrt(v), A's mean row norm, the loss of the last 10 steps."""
    from transformers import AutoModelForSequenceClassification

    total_step = epoch_steps(task, train)
    args = run_args(task, total_step, lr=lr, **method_overrides(method, DEFAULTS_BUDGET, {}))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    igu, loss_fn, after_step = build(method, model, args, total_step, DEFAULTS_BUDGET)
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=args.lr)
    scheduler = warmup_linear_schedule(optimizer, args)
    batches = Batches(train, tokenizer, args)
    losses, rows = [], []
    for step in range(steps):
        loss_fn(batches(step)).backward()
        optimizer.step()
        scheduler.step()
        after_step(step, optimizer)
        optimizer.zero_grad()
        losses.append(float(igu.last_loss))
        if (step + 1) % 10 == 0:
            a_matrices = [layer.lora_A.detach() for layer in igu.adapters.values()]
            norms = [float(a.norm(dim=1).mean()) for a in a_matrices if len(a)]  # emptied ones: no rows
            rows.append(
                {
                    "step": step + 1,
                    "orth_from": igu.igu_config.orth_reg_from if igu.igu_config.orth_reg_weight else "-",
                    "ratio": task_over_sqrt_v(igu, optimizer, loss_fn, batches(step + 1), step + 1),
                    "row_norm": statistics.mean(norms),
                    "loss": statistics.mean(losses[-10:]),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="subj", choices=tuple(TASKS))
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    train, _, _ = split_train(args.task)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    print(f"{args.task}, lr {args.lr:g}, seed 0, average rank {DEFAULTS_BUDGET:g}")
    print("method | term from step | step | task grad RMS / sqrt(v) | mean row norm of A | loss, last 10")
    for method in IGU_METHODS:
        for m in measure(args.task, args.lr, method, args.steps, train, tokenizer):
            cells = (
                method,
                m["orth_from"],
                m["step"],
                f"{m['ratio']:.3f}",
                f"{m['row_norm']:.2f}",
                f"{m['loss']:.3f}",
            )
            print(" | ".join(map(str, cells)), flush=True)


if __name__ == "__main__":
    main()
