"""The one entry point igulora calls for every op.

``IGULORA_BACKEND`` selects the implementation. Only the eager reference exists so far; the
Triton and C++ backends register here when they land, and ``auto`` will pick among them.
"""

from __future__ import annotations

import os

from igu_kernels import reference

BACKENDS = ("auto", "eager")


def backend() -> str:
    name = os.environ.get("IGULORA_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"IGULORA_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def available_backends() -> list[str]:
    """Backends that can run in this process."""
    return ["eager"]


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    backend()
    return reference.lora_delta(x, A, E, B, mask, scaling, scale)


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    backend()
    return reference.batched_ig_lora_delta(
        u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers
    )


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps):
    backend()
    return reference.score_update(ig, ibar, ubar, beta1=beta1, beta2=beta2, score=score, eps=eps)


def element_score(ibar, ubar, *, score, eps):
    backend()
    return reference.element_score(ibar, ubar, score=score, eps=eps)


def triplet_scores(score_A, score_E, score_B):
    backend()
    return reference.triplet_scores(score_A, score_E, score_B)
