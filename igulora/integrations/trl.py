"""TRL's ``SFTTrainer`` for IGU-LoRA: ``IGUSFTTrainer(model=igu, args=SFTConfig(...), ...)``.

Prompt-completion and conversational datasets, completion-only loss, gradient accumulation and
checkpointing work as in ``SFTTrainer``. The batched IG step runs through TRL's fused LM head
(per-token log-probabilities, no full logits), and TRL's own metrics (``mean_token_accuracy``,
``entropy``, ``num_tokens``) come from the training rows only. Refused at construction, each by
name: padding-free batches (``padding_free=True``, or ``packing=True`` with the default ``bfd``
strategy: a whole batch in one row, where IG rows cannot be chosen per sequence; the ``wrapped``
strategy keeps one sequence per row and works), and the loss options the per-row loss does not
reproduce (label smoothing, ``loss_type`` other than ``nll``, MoE router losses, ``peft_config``).
"""

from __future__ import annotations

import torch
from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from igulora.ig import Batch
from igulora.integrations.trainer import IGUTrainerMixin


def fused_causal_lm_row_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence next-token loss through TRL's fused LM head: (summed -log p, label count)."""
    out = model(**{**batch, "use_cache": False, "fused_lm_head": True})
    return -out.log_probs.sum(1), out.label_mask.sum(1).to(out.log_probs.dtype)


class IGUSFTTrainer(IGUTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for an :class:`~igulora.IGUModel` (see :mod:`igulora.integrations.trl`)."""

    def __init__(self, model, *args, **kwargs) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "IGUSFTTrainer: peft_config would wrap the IGU-LoRA model in PEFT adapters; the "
                "adapters come from get_igu_model(model, IGULoraConfig(...)) instead"
            )
        super().__init__(model, *args, **kwargs)
        refused = _refused_options(self.args, self.padding_free, model)
        if refused:
            raise ValueError(f"IGUSFTTrainer: {refused}")
        self.row_loss_fn = self.row_loss_fn or self._recording_row_loss
        self._training_rows: FusedCausalLMOutput | None = None

    def _recording_row_loss(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        def forward(**kwargs) -> FusedCausalLMOutput:
            self._training_rows = model(**kwargs)
            return self._training_rows

        return fused_causal_lm_row_loss(forward, batch)

    def igu_training_loss(self, model, inputs, row_loss_fn=None) -> torch.Tensor:
        loss = super().igu_training_loss(model, inputs, row_loss_fn)
        if self._training_rows is not None:  # TRL logs its metrics from the training rows' outputs
            n = len(inputs["input_ids"])
            fields = {
                k: v[:n] if v is not None and v.dim() > 0 else v for k, v in self._training_rows.items()
            }
            self._training_rows = None
            SFTTrainer.compute_loss(self, lambda **_: FusedCausalLMOutput(**fields), inputs)
        return loss


def _refused_options(args, padding_free: bool, model) -> str | None:
    """What in ``args`` the batched IG step cannot honour, said with the option's name."""
    if padding_free:
        option = "packing=True (packing_strategy='bfd')" if args.packing else "padding_free=True"
        return (
            f"SFTConfig {option} flattens each batch into one padding-free row, and IGU-LoRA chooses its IG "
            "rows per sequence (batch row). Set padding_free=False, or packing_strategy='wrapped' "
            "(one packed sequence per row)"
        )
    if args.label_smoothing_factor:
        return (
            f"SFTConfig label_smoothing_factor={args.label_smoothing_factor}: the IG step's loss is plain NLL"
        )
    if args.loss_type != "nll":
        return f"SFTConfig loss_type={args.loss_type!r}: the IG step's loss is plain NLL (loss_type='nll')"
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        return "the model's config sets output_router_logits (MoE): the IG step's loss has no router loss"
    return None
