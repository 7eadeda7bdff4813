"""Hugging Face Trainer integration: the batched IG loss and one allocation per optimizer step."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from igulora.ig import RowLossFn, sequence_classification_row_loss
from igulora.model import IGUModel


class IGUCallback(TrainerCallback):
    """Scores and reallocates ranks after every optimizer step (before gradients are zeroed,
    which the ``gradient`` rule needs). Gradient accumulation is handled: IG adds up over the
    micro-batches of a step and is consumed once."""

    def __init__(self, igu: IGUModel) -> None:
        self.igu = igu

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.igu.update_and_allocate(state.global_step)


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
        self.add_callback(IGUCallback(model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.igu.training_loss(inputs, self.row_loss_fn, module=model)
