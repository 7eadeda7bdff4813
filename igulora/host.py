"""Device values read on the host in one device-to-host copy per call, never one per tensor:
each read back waits for the device to finish its queue (docs/design.md, "Host syncs")."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from igulora.distributed import full_tensor


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened and concatenated on the first one's device (they may live on
    several devices, or be FSDP2 DTensors)."""
    tensors = [full_tensor(t) for t in tensors]
    return torch.cat([t.reshape(-1).to(tensors[0].device) for t in tensors])


def read_back(tensors: Iterable[torch.Tensor]) -> list:
    """Every element of ``tensors`` in order (one per scalar tensor) as Python numbers."""
    tensors = list(tensors)
    return _flat(tensors).tolist() if tensors else []


def read_back_each(tensors: Iterable[torch.Tensor]) -> list[list]:
    """Each tensor's elements as a Python list."""
    tensors = list(tensors)
    values = read_back(tensors)
    bounds = list(itertools.accumulate((t.numel() for t in tensors), initial=0))
    return [values[start:end] for start, end in zip(bounds, bounds[1:])]


def to_host(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened and concatenated into one CPU tensor."""
    return _flat(list(tensors)).cpu()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite."""
    return all(read_back(torch.isfinite(t).all() for t in tensors))
