"""The one entry point igulora calls for every op.

``IGULORA_BACKEND`` picks the implementation:

- ``auto`` (default): Triton for CUDA tensors when triton is installed; the C++ ops for CPU
  tensors when they build (compiled once, cached); the eager reference otherwise;
- ``triton``: the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (slow, for tests);
- ``cpp``: the C++ CPU ops (``csrc/``); an error if they cannot be built;
- ``eager``: the PyTorch reference in ``igu_kernels.reference``.

An op a backend does not implement (the C++ backend has no low-rank linear) runs on the
reference, and so does fp64 on Triton (the kernels compute in fp32).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from igu_kernels import reference

BACKENDS = ("auto", "triton", "cpp", "eager")
CPP_OPS = ("score_update", "triplet_scores")


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
    """Backends that can run in this process (``triton`` needs a GPU or the interpreter).

    Builds the C++ ops on the first call if needed (cached afterwards).
    """
    from igu_kernels import cpp

    usable = triton_installed() and (torch.cuda.is_available() or _interpreting())
    return ["eager"] + (["triton"] if usable else []) + (["cpp"] if cpp.load() else [])


def _kernels(module: str) -> ModuleType:
    return importlib.import_module(f"igu_kernels.{module}")


def _implementation(op: str, module: str, tensor: torch.Tensor) -> ModuleType:
    """The module implementing ``op`` (whose Triton version lives in ``module``) for ``tensor``."""
    name = backend()
    if name == "eager":
        return reference
    if name == "triton":
        if not triton_installed():
            raise RuntimeError("IGULORA_BACKEND=triton but triton is not installed (pip install triton)")
        if not (tensor.is_cuda or _interpreting()):
            raise RuntimeError(
                f"IGULORA_BACKEND=triton needs CUDA tensors (got {tensor.device}) or TRITON_INTERPRET=1"
            )
        return reference if tensor.dtype == torch.float64 else _kernels(module)
    if name == "cpp":
        if tensor.device.type != "cpu":
            raise RuntimeError(f"IGULORA_BACKEND=cpp runs CPU tensors only, got {tensor.device}")
        return _cpp_or_raise() if op in CPP_OPS else reference
    if tensor.is_cuda:
        return _kernels(module) if triton_installed() and tensor.dtype != torch.float64 else reference
    return _kernels("cpp") if op in CPP_OPS and _kernels("cpp").load() else reference


def _cpp_or_raise() -> ModuleType:
    cpp = _kernels("cpp")
    if not cpp.load():
        raise RuntimeError(f"IGULORA_BACKEND=cpp but the C++ ops are unavailable: {cpp.why_not()}")
    return cpp


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    return _implementation("lora_delta", "lora_linear", x).lora_delta(x, A, E, B, mask, scaling, scale)


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    impl = _implementation("batched_ig_lora_delta", "lora_linear", u)
    return impl.batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers)


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps, out=None):
    impl = _implementation("score_update", "score", ibar)
    return impl.score_update(ig, ibar, ubar, beta1=beta1, beta2=beta2, score=score, eps=eps, out=out)


def element_score(ibar, ubar, *, score, eps):
    return reference.element_score(ibar, ubar, score=score, eps=eps)


def triplet_scores(score_A, score_E, score_B):
    return _implementation("triplet_scores", "score", score_A).triplet_scores(score_A, score_E, score_B)
