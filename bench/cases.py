"""Benchmark cases shared by ``bench/run.py`` and the pytest-benchmark suite.

Each case builds its inputs once and returns, per backend, a zero-argument callable that runs
one iteration (forward + backward where the op has one). Every backend of a case computes the
same thing from the same inputs; the eager one is ``igu_kernels.reference``, the oracle. Cases
are built lazily, one family and one shape at a time, so a GPU holds one case's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from bench.case import IG_PLAN, SEQUENCES, Case, Linear, Preset, Runner, cpp_runnable, triton_runnable
from bench.model_cases import minilm_cases, model_cases
from igu_kernels import reference


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def _backward_runner(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves) -> Runner:
    def run():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    return run


def lora_linear_cases(p: Preset, device: torch.device) -> Iterator[Case]:
    """Per linear of the preset: plain LoRA and the batched-IG low-rank linear, each timed next to
    the frozen base GEMM alone (backend ``base_gemm``), so that ``/ base`` compares runs of one
    round."""
    for linear in p.linears:
        yield from _lora_linear_cases(linear, device)


def _lora_linear_cases(lin: Linear, device: torch.device) -> list[Case]:
    """Backends of plain LoRA: what a user would otherwise pick (PEFT-style eager LoRA with
    factors in the activation dtype, at every rank: PEFT has no rank mask), ``torch.compile`` of
    igulora's eager op (where ``lin.compile``), the eager op itself, and igulora's Triton kernels,
    which compute the base GEMM in the op and add the adapter's output and input gradient into
    the base's in their epilogues; of the batched-IG op: eager and Triton."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    rows, seq = SEQUENCES, lin.tokens // SEQUENCES
    x = rand(rows, seq, lin.d_in, dtype=lin.dtype).requires_grad_()
    weight = rand(lin.d_out, lin.d_in, dtype=lin.dtype, scale=lin.d_in**-0.5)
    A = rand(lin.rank, lin.d_in, scale=0.02).requires_grad_()
    E = rand(lin.rank).requires_grad_()
    B = rand(lin.d_out, lin.rank, scale=0.02).requires_grad_()
    A16, B16 = (t.detach().to(lin.dtype).requires_grad_() for t in (A, B))  # PEFT: the model's dtype
    mask = lin.mask(device)
    row_scale, train_coef, ig_coef = (torch.tensor(v, device=device) for v in IG_PLAN)
    buffers = tuple(torch.zeros_like(t) for t in (A, E, B))
    grad = rand(rows, seq, lin.d_out, dtype=lin.dtype)

    def base():
        return torch.nn.functional.linear(x, weight)

    def with_base(delta_fn):
        return lambda: base() + delta_fn().to(lin.dtype)

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
    }
    if lin.compile:
        plain["compile"] = runner(with_base(plain_lora(_compile(reference.lora_delta))))
    if triton_runnable(device):
        from igu_kernels import lora_linear

        def fused(**plan):  # the base GEMM inside the op: the adds fused into y and dx
            return lambda: lora_linear.adapted_linear(x, None, A, E, B, mask, 2.0, weight=weight, **plan)

        lora["triton"] = runner(fused(plan=(row_scale, train_coef, ig_coef), ig_buffers=buffers))
        plain["triton"] = runner(fused())
    return [
        Case("plain_lora", lin.shape, lin.dtype, plain),
        Case("lora_linear_ig", lin.shape, lin.dtype, lora),
    ]


def score_cases(p: Preset, device: torch.device) -> list[Case]:
    """The score update of ``p.score_elements`` elements, next to a copy of as many (the measured
    bandwidth)."""
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


# Families of cases, the quick ones first: the ops each builds, and the builder.
FAMILIES: tuple[tuple[tuple[str, ...], Callable[[Preset, torch.device], Iterable[Case]]], ...] = (
    (("score_update", "copy"), score_cases),
    (("triplet_scores",), triplet_cases),
    (("ig_nodes", "igu_step"), model_cases),
    (("plain_lora", "lora_linear_ig"), lora_linear_cases),
    (("minilm_step",), minilm_cases),
)
OPS = tuple(op for ops, _ in FAMILIES for op in ops)


def all_cases(preset: Preset, device: torch.device, ops: set[str] | None = None) -> Iterator[Case]:
    """Every case of the preset (or of ``ops`` only), built when the caller gets to it."""
    for names, build in FAMILIES:
        if not ops or ops & set(names):
            yield from (case for case in build(preset, device) if not ops or case.op in ops)
