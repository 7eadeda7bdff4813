"""The C++ CPU ops (``csrc/``): compiled once on first use, cached, exposed as torch.ops.igulora.*.

``load()`` returns True when the ops are registered. Without a compiler or ninja it warns once,
says why, and igulora runs on the eager reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "igulora_ops.cpp"
_why_not: str | None = None


def _cpu_signature() -> str:
    """A short hash of the CPU's feature flags: the build uses -march=native, so a cached build
    must never be loaded on a different CPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _build_dir() -> Path:
    root = os.environ.get("IGULORA_CPP_CACHE") or Path.home() / ".cache" / "igulora"
    path = Path(root) / f"torch-{torch.__version__}-cpu-{_cpu_signature()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load() -> bool:
    """Compile (first time only) and load the ops; False with one warning if that is impossible."""
    global _why_not
    if hasattr(torch.ops, "igulora") and hasattr(torch.ops.igulora, "score_update_"):
        return True
    try:
        from torch.utils import cpp_extension

        if not SOURCE.is_file():
            raise FileNotFoundError(f"{SOURCE} is missing")
        cpp_extension.verify_ninja_availability()
        cpp_extension.load(
            name="igulora_cpu_ops",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],  # no FMA: eager-exact
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, loudly once
        last_line = (str(error).strip().splitlines() or [""])[-1][:300]
        _why_not = f"{type(error).__name__}: {last_line}"
        warnings.warn(f"igulora: C++ CPU ops unavailable ({_why_not}); using eager ops", stacklevel=3)
        return False
    _register_fakes()
    return True


def why_not() -> str | None:
    """Why the C++ ops did not load (None if they did or were never tried)."""
    return _why_not


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile and meta tensors can trace through the ops."""

    @torch.library.register_fake("igulora::score_update_")
    def _(ig, ibar, ubar, score, beta1, beta2, eps, snr):
        return None

    @torch.library.register_fake("igulora::triplet_scores")
    def _(score_A, score_E, score_B):
        return score_A.new_empty(score_A.shape[0])


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps, out=None):
    out = torch.empty_like(ibar) if out is None else out
    torch.ops.igulora.score_update_(ig, ibar, ubar, out, beta1, beta2, eps, score == "snr")
    return out


def triplet_scores(score_A, score_E, score_B):
    return torch.ops.igulora.triplet_scores(score_A, score_E, score_B)
