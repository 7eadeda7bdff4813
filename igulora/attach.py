"""``IGUModel.attach``: the allocation step as an optimizer hook, so no loop can forget it."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# allocate(optimizer, loss_scale, step_skipped): IGUModel's allocation for the step just taken
Allocate = Callable[[torch.optim.Optimizer, float, bool], object]


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer | None = None) -> bool | None:
    """Whether ``scaler.step`` found inf/NaN gradients for ``optimizer`` (any optimizer when None);
    None when it has no record (before ``scaler.step``, after ``scaler.update``)."""
    states = scaler._per_optimizer_states  # the scaler keeps no public record
    if optimizer is None:
        chosen = list(states.values())
    else:
        chosen = [states[id(optimizer)]] if id(optimizer) in states else []
    flags = [flag for state in chosen for flag in state["found_inf_per_device"].values()]
    return any(bool(flag.item()) for flag in flags) if flags else None


class StepAttachment:
    """Calls ``allocate`` once per optimizer step attempt.

    ``Optimizer.register_step_post_hook`` fires inside ``optimizer.step()`` only when the step
    runs (not for Accelerate's micro-batches that do not sync). With an enabled ``GradScaler``
    the hook reads the scale of this step's backward (``update()`` comes later) and whether the
    scaler found inf/NaN (a fused optimizer still runs its step then, skipping the update inside);
    ``scaler.update`` is wrapped so that a step the scaler skipped without running the optimizer
    is still seen, as a skipped score update, before the scaler forgets it.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, allocate: Allocate
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach(optimizer): {type(optimizer).__name__} is not a torch.optim.Optimizer (nor "
                "Accelerate's wrapper of one); call igu.update_and_allocate(step) after its steps instead"
            )
        self.scaler, self.allocate = scaler, allocate
        self.stepped = False  # the optimizer's hook ran since the last scaler.update
        self.hook = optimizer.register_step_post_hook(self._after_step)
        self.replaced_update = None
        if scaler is not None:
            self.replaced_update = vars(scaler).get("update")  # an earlier wrapper, if any
            original = scaler.update

            def update(new_scale=None) -> None:
                if not self.stepped and found_inf(scaler, optimizer):
                    self.allocate(optimizer, scaler.get_scale(), True)
                self.stepped = False
                original(new_scale)

            scaler.update = update

    def _after_step(self, optimizer, args, kwargs) -> None:
        scale, skipped = 1.0, False
        if self.scaler is not None:
            scale, skipped = self.scaler.get_scale(), bool(found_inf(self.scaler, optimizer))
            self.stepped = True
        self.allocate(optimizer, scale, skipped)

    def remove(self) -> None:
        self.hook.remove()
        if self.scaler is None:
            return
        if self.replaced_update is None:
            del self.scaler.update
        else:
            self.scaler.update = self.replaced_update


class ForgottenAllocationGuard:
    """Raises from inside ``optimizer.step()`` once any optimizer holding ``param`` has stepped it
    more than ``limit`` times before the first allocation (which :meth:`remove` s the guard): a
    loop that never allocates would silently train a fixed-rank adapter.

    A global optimizer hook: it sees every optimizer (fused ones too, which do not bump the
    parameters' version counters), in train and eval mode, whoever calls the model's forward
    (TRL replaces it). It holds no reference to ``owner`` and goes when ``owner`` is collected.
    """

    def __init__(self, owner: object, param: torch.Tensor, limit: int) -> None:
        self.param_id, self.limit, self.steps = id(param), limit, 0
        self.holds: dict[int, bool] = {}  # id(optimizer) -> whether it steps ``param``
        self.handle = register_optimizer_step_post_hook(self)
        weakref.finalize(owner, self.handle.remove)

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        key = id(optimizer)
        if key not in self.holds:
            self.holds[key] = any(id(p) == self.param_id for g in optimizer.param_groups for p in g["params"])
        if not self.holds[key]:
            return
        self.steps += 1
        if self.steps > self.limit:
            raise RuntimeError(
                f"IGU-LoRA: the optimizer stepped the adapters {self.steps} times but "
                f"update_and_allocate() was never called (tinit + delta_t + 1 = {self.limit}), which "
                "would train a fixed-rank adapter. Call igu.attach(optimizer) once, or "
                "igu.update_and_allocate(step) after every optimizer.step(), or train with "
                "IGUTrainer / IGUSFTTrainer (igulora.integrations)"
            )

    def remove(self) -> None:
        self.handle.remove()
