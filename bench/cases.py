"""Benchmark cases shared by ``bench/run.py`` and the pytest-benchmark suite.

Each case builds its inputs once and returns, per backend, a zero-argument callable that runs
one iteration (forward + backward where the op has one). Every backend of a case computes the
same thing from the same inputs; the eager one is ``igu_kernels.reference``, the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from igu_kernels import reference
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
class Preset:
    tokens: int  # rows of the low-rank linear (batch x sequence)
    features: int  # in = out features
    rank: int
    dtype: torch.dtype
    score_elements: int
    model_hidden: int
    model_layers: int
    seq_len: int
    minilm: bool = False  # time a pretrained MiniLM training step (CPU: cpp vs eager)
    extra_ranks: tuple[int, ...] = ()  # more ranks for the low-rank linear cases


PRESETS = {
    "cpu": Preset(2048, 1024, 16, torch.float32, 30_000_000, 256, 2, 64, minilm=True),
    "gpu": Preset(8192, 4096, 64, torch.bfloat16, 30_000_000, 1024, 4, 256, extra_ranks=(8, 16)),
    "tiny": Preset(64, 65, 4, torch.float32, 4097, 32, 1, 8),  # smoke runs of the harness itself
}


def triton_runnable(device: torch.device) -> bool:
    """Triton is timed only on a GPU: interpreter timings are not performance."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or interpreting()


def cpp_runnable(device: torch.device) -> bool:
    from igu_kernels import cpp

    return device.type == "cpu" and cpp.load()


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def _backward_runner(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves) -> Runner:
    def run():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    return run


def lora_linear_cases(p: Preset, device: torch.device) -> list[Case]:
    """Per rank: plain LoRA and the batched-IG low-rank linear, each timed next to the frozen base
    GEMM alone (backend ``base_gemm``), so that ``/ base`` compares runs of one round."""
    return [case for rank in (p.rank, *p.extra_ranks) for case in _lora_linear_cases(p, rank, device)]


def _lora_linear_cases(p: Preset, rank: int, device: torch.device) -> list[Case]:
    """Backends of plain LoRA: what a user would otherwise pick (PEFT-style eager LoRA with
    factors in the activation dtype, ``torch.compile`` of igulora's eager op, the eager op itself)
    and igulora's Triton kernels, which compute the base GEMM in the op and add the adapter's
    output and input gradient into the base's in their epilogues; of the batched-IG op: eager and
    Triton."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    rows, seq = 4, p.tokens // 4
    x = rand(rows, seq, p.features, dtype=p.dtype).requires_grad_()
    weight = rand(p.features, p.features, dtype=p.dtype, scale=p.features**-0.5)
    A = rand(rank, p.features, scale=0.02).requires_grad_()
    E = rand(rank).requires_grad_()
    B = rand(p.features, rank, scale=0.02).requires_grad_()
    A16, B16 = (t.detach().to(p.dtype).requires_grad_() for t in (A, B))  # PEFT: the model's dtype
    mask = torch.ones(rank, dtype=torch.bool, device=device)
    row_scale = torch.tensor([1.0, 1.0, 0.125, 0.5], device=device)
    train_coef = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)
    ig_coef = torch.tensor([0.25, 0.25, 0.5, 0.5], device=device)
    buffers = tuple(torch.zeros_like(t) for t in (A, E, B))
    grad = rand(rows, seq, p.features, dtype=p.dtype)
    shape = {"tokens": p.tokens, "in": p.features, "out": p.features, "r": rank}

    def base():
        return torch.nn.functional.linear(x, weight)

    def with_base(delta_fn):
        return lambda: base() + delta_fn().to(p.dtype)

    def batched(impl):
        return lambda: impl.batched_ig_lora_delta(
            x, A, E, B, mask, 2.0, row_scale, train_coef, ig_coef, buffers
        )

    def plain_lora(fn):
        return lambda: fn(x, A, E, B, mask, 2.0)

    def peft_lora():
        return torch.nn.functional.linear(torch.nn.functional.linear(x, A16), B16) * 2.0

    def runner(forward, leaves=(x, A, E, B)):
        return lambda: _backward_runner(forward, grad, leaves)

    base_only = runner(base, (x,))
    lora = {"base_gemm": base_only, "eager": runner(with_base(batched(reference)))}
    plain = {
        "base_gemm": base_only,
        "peft_eager": runner(with_base(peft_lora), (x, A16, B16)),
        "eager": runner(with_base(plain_lora(reference.lora_delta))),
        "compile": runner(with_base(plain_lora(_compile(reference.lora_delta)))),
    }
    if triton_runnable(device):
        from igu_kernels import lora_linear

        def fused(**plan):  # the base GEMM inside the op: the adds fused into y and dx
            return lambda: lora_linear.adapted_linear(x, None, A, E, B, mask, 2.0, weight=weight, **plan)

        lora["triton"] = runner(fused(plan=(row_scale, train_coef, ig_coef), ig_buffers=buffers))
        plain["triton"] = runner(fused())
    return [Case("plain_lora", shape, p.dtype, plain), Case("lora_linear_ig", shape, p.dtype, lora)]


def score_cases(p: Preset, device: torch.device) -> list[Case]:
    n = p.score_elements
    g = torch.Generator(device="cpu").manual_seed(1)
    ig = torch.randn(n, generator=g).to(device)
    ibar, ubar = torch.rand(n, generator=g).to(device), torch.rand(n, generator=g).to(device)
    kw = dict(beta1=0.85, beta2=0.85, score="stable_magnitude", eps=1e-12)  # the default score
    compiled = _compile(reference.score_update)

    def runner(fn):
        return lambda: lambda: fn(ig, ibar, ubar, **kw)

    backends = {"eager": runner(reference.score_update), "compile": runner(compiled)}
    if triton_runnable(device):
        from igu_kernels import score

        backends["triton"] = runner(score.score_update)
    if cpp_runnable(device):
        from igu_kernels import cpp

        backends["cpp"] = runner(cpp.score_update)
    src, dst = torch.rand(n, generator=g).to(device), torch.zeros(n, device=device)  # touched pages
    return [
        Case("score_update", {"n": n}, torch.float32, backends, bytes_moved=6 * 4 * n),
        Case(
            "copy", {"n": n}, torch.float32, {"torch": lambda: lambda: dst.copy_(src)}, bytes_moved=2 * 4 * n
        ),
    ]


def triplet_cases(p: Preset, device: torch.device) -> list[Case]:
    """The triplet reduction of one 4096 x 4096 adapter at r = 12 (a 7B Llama projection)."""
    g = torch.Generator(device="cpu").manual_seed(2)
    r, d = 12, 4096
    a, e, b = (torch.rand(*s, generator=g).to(device) for s in ((r, d), (r,), (d, r)))
    backends = {"eager": lambda: lambda: reference.triplet_scores(a, e, b)}
    if triton_runnable(device):
        from igu_kernels import score

        backends["triton"] = lambda: lambda: score.triplet_scores(a, e, b)
    if cpp_runnable(device):
        from igu_kernels import cpp

        backends["cpp"] = lambda: lambda: cpp.triplet_scores(a, e, b)
    return [
        Case(
            "triplet_scores",
            {"r": r, "in": d, "out": d},
            torch.float32,
            backends,
            bytes_moved=4 * r * (2 * d + 2),
        )
    ]


def all_cases(preset: Preset, device: torch.device) -> list[Case]:
    from bench.model_cases import model_cases

    cases = lora_linear_cases(preset, device) + score_cases(preset, device) + triplet_cases(preset, device)
    return cases + model_cases(preset, device)
