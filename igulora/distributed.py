"""What igulora needs of torch.distributed: IG averaged over ranks, full tensors from shards."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the ranks of the default process group (if any), in one
    flattened all-reduce, so every rank scores the same IG and keeps identical masks."""
    if world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2-sharded parameter (a DTensor; a collective: every rank
    must call it), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
