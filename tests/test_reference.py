"""The eager batched-IG op against plain autograd, row by row (the oracle's own check)."""

from __future__ import annotations

import pytest
import torch

from igu_kernels import reference


def _inputs(n, t, d_in, d_out, r, masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    u = rand(n, t, d_in).requires_grad_()
    A, E, B = (rand(*s).requires_grad_() for s in ((r, d_in), (r,), (d_out, r)))
    mask = {"none": None, "partial": torch.arange(r) % 2 == 0, "all": torch.zeros(r, dtype=torch.bool)}[
        masked
    ]
    row_scale = torch.rand(n, generator=g, dtype=torch.float64)
    train_coef = (torch.arange(n) < (n + 1) // 2).double()
    ig_coef = torch.rand(n, generator=g, dtype=torch.float64)
    return u, A, E, B, mask, row_scale, train_coef, ig_coef, rand(n, t, d_out)


@pytest.mark.parametrize("shape", [(5, 3, 33, 17, 4), (3, 1, 65, 7, 1), (2, 4, 9, 127, 3)])
@pytest.mark.parametrize("masked", ["none", "partial", "all"])
def test_batched_op_equals_row_weighted_autograd(shape, masked):
    n, t, d_in, d_out, r = shape
    u, A, E, B, mask, row_scale, train_coef, ig_coef, gy = _inputs(*shape, masked, torch.float64)
    s = 0.7
    buffers = tuple(torch.zeros_like(p) for p in (A, E, B))
    y = reference.batched_ig_lora_delta(u, A, E, B, mask, s, row_scale, train_coef, ig_coef, buffers)
    (y * gy).sum().backward()
    got = (u.grad, A.grad, E.grad, B.grad)

    def weighted_grads(coef, wrt):
        rows = reference.lora_delta(u, A, E, B, mask, s) * row_scale[:, None, None]
        return torch.autograd.grad((rows * gy * coef[:, None, None]).sum(), wrt, allow_unused=True)

    ones = torch.ones(n, dtype=torch.float64)
    (du,) = weighted_grads(ones, [u])
    expected_train = weighted_grads(train_coef, [A, E, B])
    expected_ig = [p * g for p, g in zip((A, E, B), weighted_grads(ig_coef, [A, E, B]))]
    torch.testing.assert_close(got[0], du, rtol=1e-12, atol=1e-14)
    for g, e in zip(got[1:], expected_train):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    for b, e in zip(buffers, expected_ig):
        torch.testing.assert_close(b, e.detach(), rtol=1e-12, atol=1e-14)
    if masked == "all":
        assert y.abs().max() == 0 and A.grad.abs().max() == 0 and E.grad.abs().max() == 0
        assert all(b.abs().max() == 0 for b in buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    """Half-precision activations with fp32 adapters: the op computes in fp32; its error against
    an fp64 reference stays within 2x of what rounding the input alone costs, plus atol."""
    n, t, d_in, d_out, r = 4, 3, 33, 17, 5
    u64, A, E, B, mask, row_scale, train_coef, ig_coef, gy = _inputs(
        n, t, d_in, d_out, r, "partial", torch.float64
    )
    A32, E32, B32 = (p.detach().float() for p in (A, E, B))
    u_low = u64.detach().to(dtype)
    ref = reference.lora_delta(u64.detach(), A, E, B, mask, 0.5) * row_scale[:, None, None]
    rounding = reference.lora_delta(u_low.double(), A, E, B, mask, 0.5) * row_scale[:, None, None]
    y = reference.batched_ig_lora_delta(u_low, A32, E32, B32, mask, 0.5, row_scale, train_coef, ig_coef, None)
    assert y.dtype == torch.float32
    err = (y.double() - ref).abs().max()
    assert err <= 2 * (rounding - ref).abs().max() + 1e-5
