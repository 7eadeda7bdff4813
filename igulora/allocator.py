"""RankAllocator: uncertainty-aware scores and the global rank budget (method.md, section 3)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import igu_kernels
from igulora.compaction import scatter_ranks, take_ranks
from igulora.config import IGULoraConfig
from igulora.distributed import all_reduce_mean, full_tensor
from igulora.host import all_finite, read_back, read_back_each, to_host
from igulora.ig import ADAPTER_PARAMS, adapter_layers
from igulora.layer import IGULoraLinear


def triplet_cost(budget_unit: str, in_features: int, out_features: int) -> int:
    """Budget units one triplet of an ``in_features -> out_features`` adapter costs."""
    return 1 if budget_unit == "triplets" else in_features + out_features + 1


def target_budget(config: IGULoraConfig, features: list[tuple[int, int]]) -> int:
    """The final budget of adapters with these ``(in, out)`` features: ``target_r`` per adapter."""
    return round(sum(config.target_r * triplet_cost(config.budget_unit, i, o) for i, o in features))


class RankAllocator:
    """Smooths per-element importance and prunes triplets to AdaLoRA's cubic budget.

    Call :meth:`update_and_allocate` once per optimizer step, after ``optimizer.step()``. The
    importance of an element is ``|IG|`` from the layers' IG accumulators, or, for
    ``ig_rule="gradient"``, AdaLoRA's ``|theta * grad|`` with the post-step theta and the
    pre-step gradient, exactly as PEFT computes it.
    """

    def __init__(self, model: nn.Module, config: IGULoraConfig) -> None:
        self.config = config
        self.layers: dict[str, IGULoraLinear] = dict(sorted(adapter_layers(model).items()))
        costs = {name: self.triplet_cost(layer) for name, layer in self.layers.items()}
        self.init_budget = sum(layer.init_r * costs[name] for name, layer in self.layers.items())
        features = [(layer.in_features, layer.out_features) for layer in self.layers.values()]
        self.target_budget = target_budget(config, features)
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self.skipped_updates = 0
        self.budget = self.init_budget

    # -- budget -----------------------------------------------------------------------------

    def triplet_cost(self, layer: IGULoraLinear) -> int:
        """Budget units one triplet of ``layer`` costs."""
        return triplet_cost(self.config.budget_unit, layer.in_features, layer.out_features)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget at ``step``, whether to reallocate now): AdaLoRA's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % c.delta_t == 0

    # -- scores -----------------------------------------------------------------------------

    def _importance(self) -> dict[str, torch.Tensor] | None:
        """This step's per-element importance (signed; abs is taken by the score update)."""
        importance = {}
        for name, layer in self.layers.items():
            if self.config.ig_rule == "gradient":
                params = [getattr(layer, p) for p in ADAPTER_PARAMS]
                if any(p.grad is None for p in params):
                    return None
                values = [full_tensor(p.detach() * p.grad) for p in params]
            else:
                if layer.ig_buffers is None:
                    return None
                values = list(layer.ig_buffers)
            importance.update({f"{name}.{p}": v for p, v in zip(ADAPTER_PARAMS, values)})
        return importance

    def update_scores(self, loss_scale: float = 1.0, step_skipped: bool = False) -> bool:
        """Fold this step's importance into the EMAs; False if there was none or it was skipped.

        ``loss_scale``: the factor the backpropagated loss carried (a ``GradScaler``'s scale); the
        IG buffers are divided by it, as ``.grad`` is unscaled before the optimizer step.
        ``step_skipped``: the optimizer step was skipped (inf/NaN gradients), so is this update.
        """
        importance = self._importance()
        for layer in self.layers.values():
            layer.ig_buffers = None  # consumed: the next batched IG step starts from zero
        if importance is None:
            return False
        if step_skipped:
            self.skipped_updates += 1
            return False
        if self.config.ig_rule != "gradient":  # DDP already averaged .grad; IG buffers are local
            all_reduce_mean(list(importance.values()))
            if loss_scale != 1.0:  # .grad was unscaled by the scaler already (the gradient rule)
                importance = {name: value / loss_scale for name, value in importance.items()}
        if not all_finite(importance.values()):
            self.skipped_updates += 1
            warnings.warn(
                f"RankAllocator: non-finite importance, score update skipped "
                f"({self.skipped_updates} skipped so far); EMAs unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        c = self.config
        for name, value in importance.items():
            if name not in self.ibar:
                self.ibar[name] = torch.zeros_like(
                    value, dtype=torch.promote_types(value.dtype, torch.float32)
                )
                self.ubar[name] = torch.zeros_like(self.ibar[name])
            self.scores[name] = igu_kernels.score_update(
                value,
                self.ibar[name],
                self.ubar[name],
                beta1=c.beta1,
                beta2=c.beta2,
                score=c.score,
                eps=c.score_eps,
                out=self.scores.get(name),  # reuse last step's buffer
            )
        self.num_updates += 1
        return True

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_k for every triplet of every layer (empty before the first score update)."""
        if not self.scores:
            return {}
        return {
            name: igu_kernels.triplet_scores(
                self.scores[f"{name}.lora_A"], self.scores[f"{name}.lora_E"], self.scores[f"{name}.lora_B"]
            )
            for name in self.layers
        }

    def layer_scores(self) -> dict[str, float]:
        """Sum of each layer's kept triplet scores (a layer-level view, for reports and plots)."""
        scores = self.triplet_scores()
        sums = read_back((s * self.layers[name].rank_mask).sum() for name, s in scores.items())
        return dict(zip(scores, sums))

    # -- allocation -------------------------------------------------------------------------

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """Kept triplets of every layer in the ``init_r`` layout (compaction does not show)."""
        masks = read_back_each(layer.full_rank_mask() for layer in self.layers.values())
        return dict(zip(self.layers, masks))

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Keep the highest-scoring triplets that fit in ``budget`` (one global threshold).

        Triplets are ranked by score with a stable sort, so ties never prune more than asked:
        in triplets exactly ``min(budget, total)`` are kept; in parameters the longest prefix of
        the ranking that fits. In ``prune_mode="mask"`` only active triplets are candidates: a
        pruned triplet never returns (its frozen weights are stale, and its score would come only
        from EMAs that decay), which is what makes compaction exact.
        """
        scores = self.triplet_scores()
        if not scores:
            raise RuntimeError("RankAllocator.mask_to_budget: no scores yet; call update_scores first")
        names = list(self.layers)
        flat = to_host(scores[n].float() for n in names)
        costs = torch.cat([torch.full((self.layers[n].r,), self.triplet_cost(self.layers[n])) for n in names])
        active = to_host(self.layers[n].rank_mask for n in names)
        if self.config.prune_mode == "mask":
            flat, costs = flat[active], costs[active]
        order = torch.sort(flat, descending=True, stable=True).indices
        n_keep = int((costs[order].cumsum(0) <= budget).sum())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:n_keep]] = True
        if self.config.prune_mode == "mask":
            keep = torch.zeros_like(active).masked_scatter_(active, keep)
        self._set_masks(active, keep)
        self._apply_zero_mode()
        self.budget = budget
        return self.rank_pattern

    def _set_masks(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Give each layer its part of the flat host mask ``new`` where it differs from ``old``,
        in one host-to-device copy: an unchanged mask keeps its version counter, and with it the
        Triton kernels' cached gather of the active ranks."""
        layers = list(self.layers.values())
        sizes = [layer.r for layer in layers]
        pairs = zip(read_back_each(old.split(sizes)), read_back_each(new.split(sizes)))
        changed = [i for i, (before, after) in enumerate(pairs) if before != after]
        if changed:
            masks = new.to(layers[0].rank_mask.device).split(sizes)
            for i in changed:
                layers[i].rank_mask.copy_(masks[i])

    @torch.no_grad()
    def _apply_zero_mode(self) -> None:
        """``prune_mode="zero"``: pruned singular values are set to 0 in place (AdaLoRA)."""
        if self.config.prune_mode == "zero":
            for layer in self.layers.values():
                layer.lora_E.masked_fill_(~layer.rank_mask, 0.0)

    def update_and_allocate(
        self, step: int, loss_scale: float = 1.0, step_skipped: bool = False
    ) -> dict[str, list[bool]] | None:
        """Score update and (on schedule) reallocation for optimizer step ``step``.

        Returns the new rank pattern when masks changed this step, else None. Masks are frozen
        from ``total_step - tfinal`` on. ``loss_scale``, ``step_skipped``: see :meth:`update_scores`.
        """
        c = self.config
        final_start = c.total_step - c.tfinal
        if step < final_start:
            self.update_scores(loss_scale, step_skipped)
            budget, reallocate = self.budget_schedule(step)
            return self.mask_to_budget(budget) if reallocate and self.scores else None
        if step == final_start:
            return self.mask_to_budget(self.target_budget)
        self._apply_zero_mode()
        return None

    # -- compaction and state ---------------------------------------------------------------

    def take_ranks(self, name: str, keep: torch.Tensor) -> None:
        """Keep physical ranks ``keep`` of layer ``name`` in the EMAs and scores."""
        for param in ADAPTER_PARAMS:
            key = f"{name}.{param}"
            for table in (self.ibar, self.ubar, self.scores):
                if key in table:
                    table[key] = take_ranks(table[key], param, keep)

    def _full_layout(self, table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in table.items():
            name, param = key.rsplit(".", 1)
            layer = self.layers[name]
            out[key] = scatter_ranks(value, param, layer.rank_index, layer.init_r)
        return out

    def state_dict(self) -> dict:
        """EMAs in the ``init_r`` layout of every layer (ranks compacted away are zeros)."""
        return {
            "ibar": self._full_layout(self.ibar),
            "ubar": self._full_layout(self.ubar),
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "budget": self.budget,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into layers in the ``init_r`` layout (not compacted)."""
        expected = {
            f"{n}.{p}": getattr(layer, p).shape for n, layer in self.layers.items() for p in ADAPTER_PARAMS
        }
        for key in ("ibar", "ubar"):
            for name, value in state[key].items():
                if name not in expected:
                    raise ValueError(f"RankAllocator.load_state_dict: unknown parameter {name!r} in {key}")
                if value.shape != expected[name]:
                    raise ValueError(
                        f"RankAllocator.load_state_dict: {key}[{name!r}] has shape {tuple(value.shape)}, "
                        f"expected {tuple(expected[name])}"
                    )
        device = next(iter(self.layers.values())).lora_A.device
        self.ibar = {k: v.clone().to(device) for k, v in state["ibar"].items()}
        self.ubar = {k: v.clone().to(device) for k, v in state["ubar"].items()}
        c = self.config
        self.scores = {
            k: igu_kernels.element_score(self.ibar[k], self.ubar[k], score=c.score, eps=c.score_eps)
            for k in self.ibar
        }
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.budget = int(state["budget"])
