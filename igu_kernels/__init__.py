"""Kernels behind igulora: one dispatcher over the eager reference (and, later, Triton/C++)."""

from igu_kernels.dispatch import (
    available_backends,
    batched_ig_lora_delta,
    element_score,
    lora_delta,
    score_update,
    triplet_scores,
)

__all__ = [
    "available_backends",
    "batched_ig_lora_delta",
    "element_score",
    "lora_delta",
    "score_update",
    "triplet_scores",
]
