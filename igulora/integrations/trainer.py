"""Hugging Face Trainer integration: the batched IG loss, one allocation per optimizer step, and
adapter-only checkpoints that resume exactly."""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import find_labels

from igulora.ig import RowLossFn, sequence_classification_row_loss
from igulora.model import IGUModel


class IGUCallback(TrainerCallback):
    """Scores and reallocates ranks after every optimizer step (before gradients are zeroed,
    which the ``gradient`` rule needs). Gradient accumulation is handled: IG adds up over the
    micro-batches of a step and is consumed once. The Trainer's optimizer is passed on, so that
    pruned ranks are compacted away with its state (where compaction runs: orth_reg_weight=0).

    fp16: ``loss_scale`` is the GradScaler's scale of this step's backward (set by
    ``IGUTrainer.compute_loss``: by now Accelerate has updated the scale), and a step Accelerate
    skipped for inf/NaN (``optimizer.step_was_skipped``) skips the score update.
    """

    def __init__(self, igu: IGUModel) -> None:
        self.igu = igu
        self.loss_scale = 1.0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self.igu.update_and_allocate(
            state.global_step, optimizer=optimizer, loss_scale=self.loss_scale, step_skipped=skipped
        )


class IGUTrainer(Trainer):
    """``Trainer`` for an :class:`IGUModel`.

    Training losses come from :meth:`IGUModel.training_loss` (batched IG rows on scoring steps
    plus the orthogonality regulariser) with ``row_loss_fn``; evaluation uses the model's own
    loss. Under DDP the IG accumulators are all-reduced before scoring.

    Checkpoints and ``save_model()`` hold what :meth:`IGUModel.save_pretrained` writes (the PEFT
    adapter and igulora's state: masks, EMAs, step, node generator), never the frozen base;
    ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` restore it in place.
    """

    def __init__(
        self, model: IGUModel, *args, row_loss_fn: RowLossFn = sequence_classification_row_loss, **kwargs
    ):
        if not isinstance(model, IGUModel):
            raise TypeError(f"IGUTrainer needs an IGUModel (from get_igu_model), got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        if self.args.label_names is None:  # the Trainer reads them off IGUModel's (*args) forward
            self.label_names = find_labels(type(model.model))  # so evaluation computes the loss
        self.igu = model
        self.row_loss_fn = row_loss_fn
        # training_loss returns a per-micro-batch mean: let the Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.igu_callback = IGUCallback(model)
        self.add_callback(self.igu_callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 on a GPU
        if scaler is not None and scaler.is_enabled():
            self.igu_callback.loss_scale = scaler.get_scale()  # the scale this backward carries
        return self.igu.training_loss(inputs, self.row_loss_fn, module=model)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs carry the allocation beside the loss: the budget, the kept triplets, the
        IG node count and, where scoring steps check it, the last relative completeness residual
        (TensorBoard, W&B and ``state.log_history`` see them)."""
        if "loss" in logs:
            logs = {
                **logs,
                "rank_budget": self.igu.allocator.budget,
                "active_rank": sum(self.igu.active_ranks.values()),
            }
            logs["ig_nodes"] = self.igu.ig_nodes
            if self.igu.last_check is not None:
                logs["ig_residual"] = self.igu.last_check.relative_residual
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.igu.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.igu.load_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.igu.load_state(self.state.best_model_checkpoint)
