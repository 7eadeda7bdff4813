"""Autocast behaviour of igulora's ops: they pick their own precision.

Every op casts its inputs itself and accumulates in fp32 (fp64 for fp64 inputs), so autocast
(``torch.autocast``, ``Trainer(bf16=True)``) must not re-cast the matmuls inside it. This is
``torch.amp.custom_fwd`` / ``custom_bwd`` without input casts, for whichever device the tensors
are on (``custom_fwd`` takes one device type; the same Function runs on CPU and CUDA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def autocast_off(fn: F) -> F:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Decorates an autograd Function's ``forward`` and ``backward`` (the backward runs in the
    autograd engine, whose autocast state is not the forward's) and plain eager ops alike.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is None or not torch.is_autocast_enabled(tensor.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
