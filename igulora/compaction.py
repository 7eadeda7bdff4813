"""Physical rank compaction: pruned triplets leave the parameters, the optimizer state and the
allocator's EMAs, so a step costs what the active ranks cost (docs/design.md, "Compaction").

Exact because in ``prune_mode="mask"`` a pruned triplet never returns (the allocator ranks only
active triplets, and a masked triplet gets no gradient): the compacted run computes what the
masked run computes on its active ranks, step for step. ``lora_A`` and ``lora_E`` hold ranks on
dim 0, ``lora_B`` on dim 1; the Parameter objects stay the same (an optimizer holding them stays
valid), their data, gradients and per-parameter optimizer state are sliced.
"""

from __future__ import annotations

import torch
from torch import nn

RANK_DIM = {"lora_A": 0, "lora_E": 0, "lora_B": 1}
# Optimizers whose per-parameter state is elementwise (same shape as the parameter): slicing it
# is exactly what the optimizer would have held for the kept ranks.
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def take_ranks(tensor: torch.Tensor, param: str, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(RANK_DIM[param], index)


def scatter_ranks(tensor: torch.Tensor, param: str, index: torch.Tensor, r: int) -> torch.Tensor:
    """``tensor``'s ranks put back at ``index`` of an ``r``-rank tensor of zeros."""
    dim = RANK_DIM[param]
    shape = list(tensor.shape)
    shape[dim] = r
    return tensor.new_zeros(shape).index_copy_(dim, index, tensor)


def unwrap_optimizer(optimizer):
    """The torch optimizer under wrappers that keep it as ``.optimizer`` (Accelerate's
    AcceleratedOptimizer, itself an Optimizer subclass)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unknown_optimizer(optimizer) -> str | None:
    """Why ``optimizer``'s state cannot be sliced exactly, or None when it can."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, ELEMENTWISE_OPTIMIZERS):
        return None
    known = ", ".join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)
    name = type(inner).__name__
    return f"the optimizer {name} keeps state igulora does not know how to slice (known: {known})"


@torch.no_grad()
def slice_parameter(param: nn.Parameter, name: str, index: torch.Tensor, optimizer=None) -> None:
    """Keep ranks ``index`` of ``param`` in place: its data, its gradient and, with ``optimizer``,
    every state tensor of the parameter's shape (Adam's moments, SGD's momentum)."""
    old_shape = param.shape
    if optimizer is not None:
        state = unwrap_optimizer(optimizer).state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = take_ranks(value, name, index)
    grad = None if param.grad is None else take_ranks(param.grad, name, index)
    replace_data(param, take_ranks(param.data, name, index))
    param.grad = grad


def replace_data(param: nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` for data of another shape (the gradient is dropped)."""
    param.grad = None  # a gradient must match the data's shape when assigned
    # Autograd caches the parameter's gradient accumulator, with the shape it had, for as long as
    # a graph holds it (a loop's last ``loss``, say); only a change of dtype drops that cache.
    param.data = data.to(torch.float16 if data.dtype != torch.float16 else torch.float32)
    param.data = data


def rebuild_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Re-register ``ddp``'s parameters after their shapes changed, in place (the same wrapper
    object, so the training loop's reference stays valid). Every rank compacts identically, so
    the initial broadcast from rank 0 changes nothing. Adapters compacted to 0 ranks take no part
    in the forward: their empty parameters are left out of the reduction."""
    module = ddp.module
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    ignored |= {name for name, p in module.named_parameters() if p.numel() == 0}
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
    ddp.__init__(
        ddp.module,
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        dim=ddp.dim,
        process_group=ddp.process_group,
        bucket_cap_mb=ddp.bucket_bytes_cap / 2**20,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
    )
