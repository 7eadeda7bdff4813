"""What a benchmark case is, and the presets that size them. ``bench/model_cases.py`` builds its
cases from this module alone; ``bench/cases.py`` builds the others and gathers all of them
(``all_cases``), so the imports run one way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from igu_kernels.dispatch import interpreting

Runner = Callable[[], object]


@dataclass
class Case:
    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    backends: dict[str, Callable[[], Runner]]  # backend -> builder of the runner
    bytes_moved: int | None = None  # memory-bound ops: bytes read + written per iteration

    @property
    def label(self) -> str:
        return "x".join(f"{k}{v}" for k, v in self.shape.items())


@dataclass(frozen=True)
class Linear:
    """One low-rank linear: ``tokens`` rows, ``d_in`` -> ``d_out`` features, rank ``rank`` with
    half the ranks masked (``arange(r) % 2 == 0`` active) or none."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    dtype: torch.dtype
    masked: bool = True
    compile: bool = False  # also time torch.compile of the eager op (a compile per shape: slow)

    @property
    def active(self) -> int:
        return (self.rank + 1) // 2 if self.masked else self.rank

    def mask(self, device: torch.device) -> torch.Tensor:
        ranks = torch.arange(self.rank, device=device)
        return ranks % 2 == 0 if self.masked else torch.ones_like(ranks, dtype=torch.bool)

    @property
    def shape(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "in": self.d_in,
            "out": self.d_out,
            "r": self.rank,
            "active": self.active,
        }


@dataclass(frozen=True)
class Preset:
    linears: tuple[Linear, ...]  # the low-rank linear cases
    score_elements: int
    dtype: torch.dtype  # of the small Llama
    rank: int  # of the small Llama's adapters
    model_hidden: int
    model_layers: int
    seq_len: int
    minilm: bool = False  # time a pretrained MiniLM training step (CPU: cpp vs eager)


# A batched IG plan over 4 sequences: 2 training rows, then 2 IG nodes (row scale alpha^3,
# training coefficients, IG coefficients w / alpha).
IG_PLAN = ((1.0, 1.0, 0.125, 0.5), (1.0, 1.0, 0.0, 0.0), (0.25, 0.25, 0.5, 0.5))
SEQUENCES = len(IG_PLAN[0])  # a low-rank case's tokens are this many sequences
BF16 = torch.bfloat16
# The P1 shape of issue #32: a 4096 x 4096 projection over 8k tokens at r = 16, bf16.
P1 = Linear(8192, 4096, 4096, 16, BF16)
_GPU_MODEL = dict(
    score_elements=30_000_000, dtype=BF16, rank=64, model_hidden=1024, model_layers=4, seq_len=256
)
PRESETS = {
    "cpu": Preset(
        (Linear(2048, 1024, 1024, 16, torch.float32, masked=False, compile=True),),
        30_000_000, torch.float32, 16, 256, 2, 64, minilm=True,
    ),
    "p1": Preset((P1,), **_GPU_MODEL),  # gpu_check.sh's first answer: P1 alone
    "gpu": Preset(
        (
            P1,
            Linear(8192, 4096, 4096, 8, BF16),
            Linear(8192, 4096, 4096, 64, BF16),
            Linear(8192, 4096, 4096, 64, BF16, masked=False),
            Linear(8192, 4096, 14336, 16, BF16),  # an MLP's up projection
            Linear(8192, 14336, 4096, 16, BF16),  # and its down projection
            Linear(32768, 4096, 4096, 16, BF16),  # a long batch
            Linear(32768, 4096, 14336, 64, BF16),
            Linear(8192, 4096, 4096, 16, torch.float16),
            Linear(8192, 4096, 4096, 16, BF16, compile=True),  # P1 again with torch.compile: slow, last
        ),
        **_GPU_MODEL,
    ),
    "tiny": Preset(  # smoke runs of the harness itself
        (Linear(64, 65, 33, 4, torch.float32, compile=True),),
        4097, torch.float32, 4, 32, 1, 8,
    ),
}  # fmt: skip


def triton_runnable(device: torch.device) -> bool:
    """Triton runs on a GPU, or in the interpreter (correctness only: its timings mean nothing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or interpreting()


def cpp_runnable(device: torch.device) -> bool:
    from igu_kernels import cpp

    return device.type == "cpu" and cpp.load()
