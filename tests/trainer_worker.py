"""A short IGUTrainer run of a tiny Llama, as its own process (tests/test_trainer.py kills it).

python tests/trainer_worker.py OUT [--kill-after-save STEP] [--resume]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from conftest import lm_batch, tiny_llama  # noqa: E402

from igulora import IGULoraConfig, causal_lm_row_loss, get_igu_model  # noqa: E402
from igulora.integrations.trainer import IGUTrainer  # noqa: E402

STEPS = 12  # budget phase: steps 3 to 10


def dataset(n: int = 48) -> list[dict]:
    batch = lm_batch(n=n, t=8, seed=11)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def trainer(out: str, callbacks=(), config: dict | None = None, **args) -> IGUTrainer:
    base = dict(init_r=4, target_r=2, total_step=STEPS, tinit=2, tfinal=2, ig_every=1, ig_fraction=0.5)
    base["orth_reg_weight"] = 0.0  # no orthogonality term, so that pruned ranks are compacted
    igu = get_igu_model(tiny_llama(seed=3), IGULoraConfig(**{**base, **(config or {})}))
    defaults = dict(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        warmup_steps=2,
        save_strategy="steps",
        save_steps=6,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    training_args = transformers.TrainingArguments(**{**defaults, **args})
    return IGUTrainer(
        igu,
        args=training_args,
        train_dataset=dataset(),
        eval_dataset=dataset(16),
        row_loss_fn=causal_lm_row_loss,
        callbacks=list(callbacks),
    )


class KillAfterSave(transformers.TrainerCallback):
    """SIGKILL this process right after the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-after-save", type=int)
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args()
    callbacks = [KillAfterSave(cli.kill_after_save)] if cli.kill_after_save else []
    run = trainer(cli.out, callbacks)
    run.train(resume_from_checkpoint=True if cli.resume else None)
    run.igu.save_pretrained(Path(cli.out) / "final")


if __name__ == "__main__":
    main()
