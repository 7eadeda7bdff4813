"""TRL's ``SFTTrainer`` for IGU-LoRA: ``IGUSFTTrainer(model=igu, args=SFTConfig(...), ...)``.

Prompt-completion, conversational and plain-text datasets, completion-only and assistant-only
loss, gradient accumulation and checkpointing work as in ``SFTTrainer``. The batched IG step
runs through TRL's fused LM head (per-token log-probabilities, no full logits), and TRL's own
metrics (``mean_token_accuracy``, ``entropy``, ``num_tokens``) come from the training rows only.
Padding-free batches (``padding_free=True``, or ``packing=True`` with the default ``bfd``
strategy) put a whole batch in one row, where IG rows cannot be chosen per sequence: refused at
construction. ``packing_strategy="wrapped"`` keeps one sequence per row and works.
"""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from igulora.integrations.trainer import IGUTrainerMixin


def fused_causal_lm_row_loss(model, batch):
    """Per-sequence next-token loss through TRL's fused LM head: (summed -log p, label count)."""
    out = model(**{**batch, "use_cache": False, "fused_lm_head": True})
    return -out.log_probs.sum(1), out.label_mask.sum(1).to(out.log_probs.dtype)


class IGUSFTTrainer(IGUTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for an :class:`~igulora.IGUModel` (see :mod:`igulora.integrations.trl`)."""

    def __init__(self, model, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        if self.padding_free:
            option = "packing=True (packing_strategy='bfd')" if self.args.packing else "padding_free=True"
            raise ValueError(
                f"IGUSFTTrainer: SFTConfig {option} flattens each batch into one padding-free row, "
                "and IGU-LoRA chooses its IG rows per sequence (batch row). Set padding_free=False, "
                "or packing_strategy='wrapped' (one packed sequence per row)"
            )
        self.row_loss_fn = self.row_loss_fn or self._recording_row_loss
        self._training_rows: FusedCausalLMOutput | None = None

    def _recording_row_loss(self, model, batch):
        def forward(**kwargs) -> FusedCausalLMOutput:
            self._training_rows = model(**kwargs)
            return self._training_rows

        return fused_causal_lm_row_loss(forward, batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.igu_training_loss(model, inputs)
        if self._training_rows is not None:  # TRL logs its metrics from the training rows' outputs
            n = len(inputs["input_ids"])
            rows = FusedCausalLMOutput(
                **{k: v[:n] if v is not None and v.dim() > 0 else v for k, v in self._training_rows.items()}
            )
            self._training_rows = None
            SFTTrainer.compute_loss(self, lambda **_: rows, inputs, num_items_in_batch=num_items_in_batch)
        return loss
