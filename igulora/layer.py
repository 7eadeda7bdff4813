"""IGULoraLinear: a frozen Linear (or GPT-2 Conv1D) plus AdaLoRA's SVD-form adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import igu_kernels
from igulora.compaction import RANK_DIM, replace_data, scatter_ranks, slice_parameter
from igulora.distributed import full_tensor


@dataclass
class RowPlan:
    """Per-row node data of one batched IG forward (method.md, section 4).

    ``row_scale`` = alpha^3 of each row's node, ``train_coef`` = 1 on training rows, 0 on IG rows,
    ``ig_coef`` = w / alpha of each row's node. All are (N,) on the model's device.
    """

    row_scale: torch.Tensor
    train_coef: torch.Tensor
    ig_coef: torch.Tensor


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_adaptable(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt are subclasses) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module, read from the layer and not from its
    weight: a quantized weight is packed (a 4-bit (out, in) weight is stored as (out*in/2, 1))."""
    if _is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def quantization(module: nn.Module) -> str | None:
    """The bitsandbytes weight type of a quantized base (``"Params4bit"``, ``"Int8Params"``) or None."""
    weight = module.weight
    kind = type(weight).__name__
    return kind if kind in ("Params4bit", "Int8Params") or not weight.is_floating_point() else None


class IGULoraLinear(nn.Module):
    """``y = base(x) + s * B diag(E * m) A dropout(x)``.

    ``lora_A`` (r x in), ``lora_E`` (r), ``lora_B`` (out x r) are trainable; ``rank_mask`` (r,
    bool buffer) marks kept triplets. The adapter is kept in fp32 (fp64 for an fp64 base) and
    accumulates in it, whatever the base dtype; its output is cast back to the base's dtype.

    ``r`` is the physical rank: ``init_r`` until :meth:`compact_` removes pruned triplets;
    ``rank_index`` holds the ``init_r``-layout index of each physical rank.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init: str = "adalora",
        hard_mask: bool = True,
    ) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(
                f"IGULoraLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}"
            )
        if r < 1:
            raise ValueError(f"r={r} must be >= 1")
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        weight = base_layer.weight
        in_features, out_features = linear_features(base_layer)
        self.in_features, self.out_features, self.r, self.init_r = in_features, out_features, r, r
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # 4/8-bit: fp32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_E = nn.Parameter(torch.empty(r, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=weight.device))
        self.register_buffer("rank_index", torch.arange(r, device=weight.device), persistent=False)
        self.scaling = lora_alpha / r
        self.hard_mask = hard_mask
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.adapter_enabled = True
        # Set by igulora.ig for IG evaluation: one node's alpha^3, or a batched RowPlan.
        self.node_scale: float = 1.0
        self.row_plan: RowPlan | None = None
        self.ig_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.reset_adapter(init)

    def reset_adapter(self, init: str = "adalora") -> None:
        with torch.no_grad():
            if init == "adalora":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_B, std=0.02)
            elif init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.ones_(self.lora_E)
                nn.init.zeros_(self.lora_B)
            else:
                raise ValueError(f"init={init!r} is not one of ('adalora', 'lora')")
            self.rank_mask.fill_(True)

    @property
    def active_rank(self) -> int:
        return int(self.rank_mask.sum())

    def full_rank_mask(self) -> torch.Tensor:
        """The rank mask in the ``init_r`` layout (compacted-away ranks are pruned)."""
        full = torch.zeros(self.init_r, dtype=torch.bool, device=self.rank_mask.device)
        return full.index_copy_(0, self.rank_index, self.rank_mask)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The adapter's state in the ``init_r`` layout (ranks compacted away are zeros); whole
        tensors under FSDP2 (a collective there: every rank calls it)."""
        state = {
            p: scatter_ranks(full_tensor(getattr(self, p).detach()), p, self.rank_index, self.init_r)
            for p in RANK_DIM
        }
        return {**state, "rank_mask": self.full_rank_mask()}

    @torch.no_grad()
    def compact_(self, keep: torch.Tensor, optimizer=None) -> None:
        """Keep physical ranks ``keep`` (indices), in place on the same Parameters, slicing their
        gradients and ``optimizer``'s state with them."""
        for name in RANK_DIM:
            slice_parameter(getattr(self, name), name, keep, optimizer)
        self.rank_mask = self.rank_mask[keep]
        self.rank_index = self.rank_index[keep]
        self.r = keep.numel()

    @torch.no_grad()
    def expand_(self) -> None:
        """Back to all ``init_r`` ranks (those compacted away are zeros and pruned); a no-op on a
        layer that was never compacted (its parameters are left untouched)."""
        if self.r == self.init_r:
            return
        for name, value in self.full_state().items():
            if name == "rank_mask":
                self.rank_mask = value
            else:
                replace_data(getattr(self, name), value)
        self.rank_index = torch.arange(self.init_r, device=self.rank_mask.device)
        self.r = self.init_r

    def forward_mask(self) -> torch.Tensor | None:
        """The mask the forward applies: the rank mask, or None when pruning zeroes E instead."""
        return self.rank_mask if self.hard_mask else None

    def delta_weight(self) -> torch.Tensor:
        """``s * B diag(E m) A`` in the base weight's layout (fp32/fp64)."""
        mask = self.rank_mask.to(self.lora_E.dtype)
        delta = self.scaling * (self.lora_B * (self.lora_E * mask)) @ self.lora_A
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("IGULoraLinear.merge(): adapter is already merged")
        kind = quantization(self.base_layer)
        if kind is not None:
            raise RuntimeError(
                f"IGULoraLinear.merge(): the base {type(self.base_layer).__name__} "
                f"({self.in_features} -> {self.out_features}) holds a quantized {kind} weight; "
                "merging into it would requantize the update away. Save the adapter "
                "(save_pretrained) and merge it into the unquantized base instead"
            )
        weight = self.base_layer.weight
        weight.copy_((weight.to(self.lora_A.dtype) + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("IGULoraLinear.unmerge(): adapter is not merged")
        weight = self.base_layer.weight
        weight.copy_((weight.to(self.lora_A.dtype) - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _owns_base(self, u: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the adapter op may compute a plain nn.Linear base itself (on the Triton kernels,
        fusing the input-gradient add): no dropout between, no hooks, extra arguments or
        sharded/quantized weight that calling the base layer would honour."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not (args or kwargs or base._forward_hooks or base._forward_pre_hooks)
            and isinstance(self.dropout, nn.Identity)
            and type(base.weight) is nn.Parameter
            and igu_kernels.fuses_base(u, self.lora_A)
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or not self.adapter_enabled or self.node_scale == 0.0 or self.r == 0:
            return self.base_layer(x, *args, **kwargs)
        u = self.dropout(x)
        plan = self.row_plan
        if plan is not None and u.shape[0] != plan.row_scale.shape[0]:
            raise ValueError(
                f"IGULoraLinear: input has {u.shape[0]} rows on dim 0 but the batched IG plan "
                f"has {plan.row_scale.shape[0]}; adapted layers need the batch on dim 0, and a "
                "scoring step's plan stays installed until its backward is done "
                "(update_and_allocate, the next training_loss or eval() removes it)"
            )
        own = self._owns_base(u, args, kwargs)
        return igu_kernels.adapted_linear(
            u,
            None if own else self.base_layer(x, *args, **kwargs),
            self.lora_A,
            self.lora_E,
            self.lora_B,
            self.forward_mask(),
            self.scaling,
            scale=self.node_scale,
            plan=None if plan is None else (plan.row_scale, plan.train_coef, plan.ig_coef),
            ig_buffers=None if plan is None else self.ig_buffers,
            weight=self.base_layer.weight if own else None,
            bias=self.base_layer.bias if own else None,
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"active_rank={self.active_rank}, init_r={self.init_r}, scaling={self.scaling:g}"
        )
