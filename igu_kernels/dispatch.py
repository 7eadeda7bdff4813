"""The one entry point igulora calls for every op.

``IGULORA_BACKEND`` picks the implementation:

- ``auto`` (default): Triton for CUDA tensors when triton is installed; the C++ ops for CPU
  tensors when they build (compiled once, cached); the eager reference otherwise;
- ``triton``: the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (slow, for tests);
- ``cpp``: the C++ CPU ops (``csrc/``); an error if they cannot be built;
- ``eager``: the PyTorch reference in ``igu_kernels.reference``.

An op a backend does not implement (the C++ backend has no low-rank linear) runs on the
reference, and so do fp64 on Triton (the kernels compute in fp32) and adapters of more than
``lora_linear.MAX_RANK`` ranks (no larger tile is compiled and audited).
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


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1): CPU tensors, correctness only."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends that can run in this process (``triton`` needs a GPU or the interpreter).

    Builds the C++ ops on the first call if needed (cached afterwards).
    """
    from igu_kernels import cpp

    usable = triton_installed() and (torch.cuda.is_available() or interpreting())
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
        if not (tensor.is_cuda or interpreting()):
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


def check_lora_inputs(x, A, E, B, mask, row_vectors=()) -> None:
    """Clear errors for inputs the ops cannot take, naming the argument and the shapes."""
    r, d_in = A.shape if A.dim() == 2 else (None, None)
    problems = []
    if A.dim() != 2 or E.shape != (r,) or B.dim() != 2 or B.shape[1] != r:
        problems.append(
            f"expected A (r, in), E (r,), B (out, r); got A {tuple(A.shape)}, E {tuple(E.shape)}, "
            f"B {tuple(B.shape)}"
        )
    elif x.shape[-1] != d_in:
        problems.append(f"x has {x.shape[-1]} features on its last dim but A expects in={d_in}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (r,)):
        problems.append(f"mask must be a bool tensor of shape ({r},), got {mask.dtype} {tuple(mask.shape)}")
    for name, vec in row_vectors:
        if vec.dim() != 1 or vec.shape[0] != x.shape[0]:
            problems.append(
                f"{name} must have one entry per row of x (dim 0 = {x.shape[0]}), got {tuple(vec.shape)}"
            )
    tensors = {
        "x": x,
        "A": A,
        "E": E,
        "B": B,
        **({"mask": mask} if mask is not None else {}),
        **dict(row_vectors),
    }
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        problems.append(
            f"tensors are on different devices: {', '.join(f'{k}={v}' for k, v in devices.items())}"
        )
    for name in ("x", "A", "E", "B"):
        if not tensors[name].is_floating_point():
            problems.append(f"{name} must be floating point, got {tensors[name].dtype}")
    if problems:
        raise ValueError("igu_kernels low-rank linear: " + "; ".join(problems))


def _lora(op: str, u: torch.Tensor, A: torch.Tensor) -> ModuleType:
    impl = _implementation(op, "lora_linear", u)
    return reference if impl is not reference and A.shape[0] > impl.MAX_RANK else impl


def fuses_base(u: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether ``adapted_linear`` runs on the Triton kernels for these tensors: then handing it
    the base weight instead of the base output saves a pass over the input gradient."""
    return _lora("adapted_linear", u, A) is not reference


def adapted_linear(
    u, base, A, E, B, mask, scaling, *, scale=1.0, plan=None, ig_buffers=None, weight=None, bias=None
):
    """The adapted layer: ``base + s * ((u A^T) * (E m) * c) B^T`` in the base's dtype.

    ``base`` is the base layer's output (..., out); or None with ``weight`` (and ``bias``) of a
    plain linear base given, and the op computes ``u W^T + b`` itself (the Triton kernels then add
    the adapter's input gradient into the base's in place). ``plan`` = (row_scale, train_coef,
    ig_coef) per row of ``u`` (dim 0) for a batched IG step, with ``ig_buffers``; None for one
    node of scale ``scale`` (c = alpha^3; 1 for training).
    """
    rows = () if plan is None else tuple(zip(("row_scale", "train_coef", "ig_coef"), plan))
    check_lora_inputs(u, A, E, B, mask, rows)
    expected = (*u.shape[:-1], B.shape[0])
    if base is None and weight is None:
        raise ValueError(
            "igu_kernels.adapted_linear: give the base output (base=) or the base weight (weight=)"
        )
    if base is not None and tuple(base.shape) != expected:
        raise ValueError(
            f"igu_kernels.adapted_linear: base has shape {tuple(base.shape)}, expected {expected}"
        )
    return _lora("adapted_linear", u, A).adapted_linear(
        u,
        base,
        A,
        E,
        B,
        mask,
        scaling,
        scale=scale,
        plan=plan,
        ig_buffers=ig_buffers,
        weight=weight,
        bias=bias,
    )


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    check_lora_inputs(x, A, E, B, mask)
    return _lora("lora_delta", x, A).lora_delta(x, A, E, B, mask, scaling, scale)


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    rows = (("row_scale", row_scale), ("train_coef", train_coef), ("ig_coef", ig_coef))
    check_lora_inputs(u, A, E, B, mask, rows)
    impl = _lora("batched_ig_lora_delta", u, A)
    return impl.batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers)


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps, out=None):
    if not (ig.shape == ibar.shape == ubar.shape) or (out is not None and out.shape != ibar.shape):
        shapes = f"ig {tuple(ig.shape)}, ibar {tuple(ibar.shape)}, ubar {tuple(ubar.shape)}"
        raise ValueError(f"igu_kernels.score_update: shapes differ: {shapes}")
    impl = _implementation("score_update", "score", ibar)
    return impl.score_update(ig, ibar, ubar, beta1=beta1, beta2=beta2, score=score, eps=eps, out=out)


def element_score(ibar, ubar, *, score, eps):
    return reference.element_score(ibar, ubar, score=score, eps=eps)


def triplet_scores(score_A, score_E, score_B):
    return _implementation("triplet_scores", "score", score_A).triplet_scores(score_A, score_E, score_B)
