"""Launch configurations of the Triton kernels: autotuned on a GPU, fixed in the interpreter.

A kernel module declares, for each kernel, the ``triton.Config`` list per activation dtype the
autotuner may pick from (a config that fits bf16 can spill in fp32 IEEE), the tuning key, and
the one configuration the interpreter runs (autotuning means nothing there). The compile audit
reads the same declarations (``Tuned.configs_for``), so every configuration a GPU can pick is
compiled and inspected on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import triton

from igu_kernels.dispatch import interpreting

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Tuned:
    """One kernel with its launch space. ``tuned[grid](*args, **constexprs)`` launches it;
    ``grid`` is a function of the chosen configuration's constexprs (``meta``)."""

    kernel: triton.runtime.JITFunction
    configs: dict[str, Sequence[triton.Config]]  # by activation dtype name
    key: Sequence[str]
    dtype_arg: str  # the pointer whose element type names the dtype
    interpreter: dict
    restore: Sequence[str] = field(default=())  # pointers the kernel updates in place

    def configs_for(self, dtype: str) -> list[triton.Config]:
        return list(self.configs[dtype])

    def smallest(self, name: str) -> int:
        """The smallest value of a tuned constexpr this launch can get (to size per-block outputs)."""
        if interpreting():
            return self.interpreter[name]
        return min(c.kwargs[name] for cs in self.configs.values() for c in cs)

    def chosen(self) -> dict:
        """The configuration the autotuner picked per tuning key in this process (GPU only)."""
        return dict(self._autotuner.cache) if "_autotuner" in self.__dict__ else {}

    @functools.cached_property
    def _autotuner(self):
        def by_dtype(configs, named_args, **kwargs):
            dtype = DTYPE_NAMES[named_args[self.dtype_arg].dtype]
            allowed = {repr(c) for c in self.configs[dtype]}
            return [c for c in configs if repr(c) in allowed]

        every = list({repr(c): c for cs in self.configs.values() for c in cs}.values())
        return triton.autotune(
            configs=every,
            key=list(self.key),
            prune_configs_by={"early_config_prune": by_dtype},
            restore_value=list(self.restore) or None,
        )(self.kernel)

    def __getitem__(self, grid: Callable[[dict], tuple[int, ...]]):
        if interpreting():
            meta = self.interpreter
            return functools.partial(self.kernel[grid(meta)], **meta)
        return self._autotuner[grid]
