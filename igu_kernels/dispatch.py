"""The one entry point igulora calls for every op.

``IGULORA_BACKEND`` picks the implementation:

- ``auto`` (default): Triton for CUDA tensors when triton is installed, the eager reference
  otherwise;
- ``triton``: the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (slow, for tests);
- ``eager``: the PyTorch reference in ``igu_kernels.reference``.

fp64 always runs on the reference (the kernels compute in fp32).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from igu_kernels import reference

BACKENDS = ("auto", "triton", "eager")


def backend() -> str:
    name = os.environ.get("IGULORA_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"IGULORA_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends that can run in this process (``triton`` needs a GPU or the interpreter)."""
    usable = triton_installed() and (torch.cuda.is_available() or _interpreting())
    return ["eager"] + (["triton"] if usable else [])


def _kernels(module: str) -> ModuleType:
    return importlib.import_module(f"igu_kernels.{module}")


def _implementation(module: str, tensor: torch.Tensor) -> ModuleType:
    """The module implementing an op for ``tensor``, following IGULORA_BACKEND."""
    name = backend()
    if name == "eager" or tensor.dtype == torch.float64:
        return reference
    if name == "triton":
        if not triton_installed():
            raise RuntimeError("IGULORA_BACKEND=triton but triton is not installed (pip install triton)")
        if not (tensor.is_cuda or _interpreting()):
            raise RuntimeError(
                f"IGULORA_BACKEND=triton needs CUDA tensors (got {tensor.device}) or TRITON_INTERPRET=1"
            )
        return _kernels(module)
    return _kernels(module) if tensor.is_cuda and triton_installed() else reference


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    return _implementation("lora_linear", x).lora_delta(x, A, E, B, mask, scaling, scale)


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    impl = _implementation("lora_linear", u)
    return impl.batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers)


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps):
    impl = _implementation("score", ibar)
    return impl.score_update(ig, ibar, ubar, beta1=beta1, beta2=beta2, score=score, eps=eps)


def element_score(ibar, ubar, *, score, eps):
    return reference.element_score(ibar, ubar, score=score, eps=eps)


def triplet_scores(score_A, score_E, score_B):
    return _implementation("score", score_A).triplet_scores(score_A, score_E, score_B)
