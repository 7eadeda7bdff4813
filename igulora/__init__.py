"""igulora: adaptive-rank LoRA fine-tuning with Integrated-Gradients importance (IGU-LoRA)."""

from igulora.allocator import RankAllocator
from igulora.config import IGULoraConfig
from igulora.ig import (
    IGResult,
    causal_lm_row_loss,
    integrated_gradients,
    mean_loss,
    path_point,
    sequence_classification_row_loss,
)
from igulora.layer import IGULoraLinear
from igulora.model import IGUModel, get_igu_model
from igulora.quadrature import quadrature

__version__ = "0.1.0"

__all__ = [
    "IGResult",
    "IGULoraConfig",
    "IGULoraLinear",
    "IGUModel",
    "RankAllocator",
    "causal_lm_row_loss",
    "get_igu_model",
    "integrated_gradients",
    "mean_loss",
    "path_point",
    "quadrature",
    "sequence_classification_row_loss",
]
