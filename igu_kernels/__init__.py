"""Kernels behind igulora: one dispatcher over the eager reference, Triton and C++."""

from igu_kernels.dispatch import (
    adapted_linear,
    available_backends,
    batched_ig_lora_delta,
    element_score,
    fuses_base,
    lora_delta,
    score_update,
    triplet_scores,
)

__all__ = [
    "available_backends",
    "batched_ig_lora_delta",
    "element_score",
    "fuses_base",
    "lora_delta",
    "adapted_linear",
    "score_update",
    "triplet_scores",
]
