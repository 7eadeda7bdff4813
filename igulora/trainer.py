"""Hugging Face Trainer integration: the batched IG loss and one allocation per optimizer step."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from igulora.ig import RowLossFn, sequence_classification_row_loss
from igulora.model import IGUModel


class IGUCallback(TrainerCallback):
    """Scores and reallocates ranks after every optimizer step (before gradients are zeroed,
    which the ``gradient`` rule needs). Gradient accumulation is handled: IG adds up over the
    micro-batches of a step and is consumed once.

    fp16: ``loss_scale`` is the GradScaler's scale of this step's backward (set by
    ``IGUTrainer.compute_loss``: by now Accelerate has updated the scale), and a step Accelerate
    skipped for inf/NaN (``optimizer.step_was_skipped``) skips the score update.
    """

    def __init__(self, igu: IGUModel) -> None:
        self.igu = igu
        self.loss_scale = 1.0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self.igu.update_and_allocate(state.global_step, loss_scale=self.loss_scale, step_skipped=skipped)


class IGUTrainer(Trainer):
    """``Trainer`` for an :class:`IGUModel`.

    Training losses come from :meth:`IGUModel.training_loss` (batched IG rows on scoring steps
    plus the orthogonality regulariser) with ``row_loss_fn``; evaluation uses the model's own
    loss. Under DDP the IG accumulators are all-reduced before scoring.
    """

    def __init__(
        self, model: IGUModel, *args, row_loss_fn: RowLossFn = sequence_classification_row_loss, **kwargs
    ):
        if not isinstance(model, IGUModel):
            raise TypeError(f"IGUTrainer needs an IGUModel (from get_igu_model), got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
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
