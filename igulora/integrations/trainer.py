"""Hugging Face ``Trainer`` integration: any Trainer subclass trains an :class:`IGUModel`.

``IGUTrainerMixin`` goes in front of a Trainer class (``igu_trainer(MyTrainer)`` builds the
subclass; ``IGUTrainer`` is the one for ``transformers.Trainer``). It gives the Trainer

- the batched IG loss (:meth:`IGUModel.training_loss`) on training steps, whose value is the
  training rows' loss (the orthogonality term and the IG rows only add gradient);
- one allocation per real optimizer step (:class:`IGUCallback`: ``IGUModel.attach`` to the
  Trainer's optimizer, and ``total_step`` from ``max_steps`` when the config left it unset);
- adapter-only checkpoints that resume exactly, and the allocation in the training logs.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import find_labels

from igulora.ig import RowLossFn
from igulora.model import IGUModel


class IGUCallback(TrainerCallback):
    """At the start of training: sets ``total_step`` from the run's ``max_steps`` when the config
    left it None, and attaches the allocation step to the Trainer's optimizer
    (:meth:`IGUModel.attach`: Accelerate's scaler is used under fp16, skipped steps skip the
    score update). Alone, with a Trainer that computes ``model(**batch)`` itself, the first
    scoring step raises: such a Trainer needs :class:`IGUTrainerMixin` to score."""

    def __init__(self, igu: IGUModel) -> None:
        self.igu = igu

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if self.igu.igu_config.total_step is None:
            self.igu.set_total_step(state.max_steps)
        self.igu.attach(optimizer)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.igu.detach()


class IGUTrainerMixin:
    """Put in front of any ``transformers.Trainer`` subclass to train an :class:`IGUModel`:
    ``class MyIGUTrainer(IGUTrainerMixin, MyTrainer)``, or ``igu_trainer(MyTrainer)``.

    ``row_loss_fn`` is the per-row loss of the batched IG step (default: the model's,
    :attr:`IGUModel.row_loss_fn`). Evaluation uses the Trainer's own loss. Checkpoints and
    ``save_model()`` hold what :meth:`IGUModel.save_pretrained` writes, never the frozen base;
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` restore it in place.
    """

    def __init__(self, model: IGUModel, *args, row_loss_fn: RowLossFn | None = None, **kwargs):
        if not isinstance(model, IGUModel):
            raise TypeError(
                f"{type(self).__name__} needs an IGUModel (from get_igu_model), got {type(model).__name__}"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                f"{type(self).__name__}: compute_loss_func replaces the training loss, and IGU-LoRA's "
                "batched IG needs its own; pass a per-row loss as row_loss_fn instead"
            )
        objective = _unsupported_trl_trainer(type(self))
        if objective:
            raise TypeError(
                f"{type(self).__name__}: TRL's {objective} trains on its own objective (preference, "
                "RL or distillation); "
                "IGU-LoRA's batched IG scores a per-row supervised loss (SFT). Use IGUSFTTrainer, or "
                "a loop with igu.training_loss(batch, row_loss_fn) for your own per-row loss"
            )
        super().__init__(model, *args, **kwargs)
        if self.args.label_names is None:  # the Trainer reads them off IGUModel's (*args) forward
            self.label_names = find_labels(type(model.model))  # so evaluation computes the loss
        self.igu = model
        self.row_loss_fn = row_loss_fn
        # training_loss is a per-micro-batch mean: the Trainer divides it by the accumulation steps
        self.loss_is_scaled_for_ga = False
        self.add_callback(IGUCallback(model))

    def igu_training_loss(self, model, inputs, row_loss_fn: RowLossFn | None = None) -> torch.Tensor:
        """The batched IG loss, its value the training rows' loss (what the Trainer logs)."""
        loss = self.igu.training_loss(inputs, row_loss_fn or self.row_loss_fn, module=model)
        return loss - (loss - self.igu.last_loss).detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.igu_training_loss(model, inputs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs carry the allocation beside the loss: the budget, the kept triplets, the
        IG node count and, where scoring steps check it, the last relative completeness residual
        (TensorBoard, W&B and ``state.log_history`` see them)."""
        if "loss" in logs:
            logs = {
                **logs,
                "rank_budget": self.igu.allocator.budget,
                "active_rank": sum(self.igu.active_ranks.values()),
                "ig_nodes": self.igu.ig_nodes,
            }
            if self.igu.last_check is not None:
                logs["ig_residual"] = self.igu.last_check.relative_residual
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.igu.save_pretrained(output_dir)  # every rank that gets here: FSDP2 gathers; rank 0 writes
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.igu.load_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.igu.load_state(self.state.best_model_checkpoint)


def _unsupported_trl_trainer(trainer_class: type) -> str | None:
    """The TRL trainer under ``trainer_class`` when it is not SFT itself (DPO, GRPO, KTO, RLOO, and
    GKD / GOLD, which subclass SFTTrainer with a distillation loss)."""
    trl = [c for c in trainer_class.__mro__ if c.__module__.split(".")[0] == "trl"]
    return trl[0].__name__ if trl and trl[0].__name__ != "SFTTrainer" else None


def igu_trainer(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` with :class:`IGUTrainerMixin` in front: ``igu_trainer(MyTrainer)(igu, ...)``."""
    namespace = {"__doc__": IGUTrainerMixin.__doc__}
    return type(f"IGU{trainer_class.__name__}", (IGUTrainerMixin, trainer_class), namespace)


class IGUTrainer(IGUTrainerMixin, Trainer):
    """``transformers.Trainer`` for an :class:`IGUModel` (see :class:`IGUTrainerMixin`)."""
