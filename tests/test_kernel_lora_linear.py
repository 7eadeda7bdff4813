"""Triton masked low-rank linear (interpreter on CPU) against the eager reference."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_three_way, requires_cuda

pytest.importorskip("triton")
from igu_kernels import lora_linear, reference  # noqa: E402

SHAPES = [(3, 5, 33, 17, 4), (2, 3, 65, 127, 1), (1, 7, 127, 33, 5)]  # (rows, tokens, in, out, r)
MASKS = ["none", "partial", "all"]


def _case(shape, masked, dtype, device="cpu", seed=0):
    n, t, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    mask = {"none": None, "partial": torch.arange(r) % 2 == 0, "all": torch.zeros(r, dtype=torch.bool)}[
        masked
    ]
    return {
        "u": rand(n, t, d_in).to(dtype),
        "params": [rand(r, d_in), rand(r), rand(d_out, r)],
        "mask": None if mask is None else mask.to(device),
        "row_scale": torch.rand(n, generator=g, dtype=torch.float64),
        "train_coef": (torch.arange(n) < (n + 1) // 2).double(),
        "ig_coef": torch.rand(n, generator=g, dtype=torch.float64),
        "gy": rand(n, t, d_out),
        "device": device,
    }


def _run(impl, case, param_dtype):
    """Forward + backward of ``impl``; returns output, du, grads and IG buffers (in fp64)."""
    dev = case["device"]
    u = case["u"].to(dev).clone().requires_grad_()
    A, E, B = (p.to(dev, param_dtype).clone().requires_grad_() for p in case["params"])
    vecs = [case[k].to(dev, param_dtype) for k in ("row_scale", "train_coef", "ig_coef")]
    buffers = tuple(torch.zeros_like(p) for p in (A, E, B))
    y = impl.batched_ig_lora_delta(u, A, E, B, case["mask"], 0.7, *vecs, buffers)
    (y * case["gy"].to(dev, y.dtype)).sum().backward()
    return [t.detach().double().cpu() for t in (y, u.grad, A.grad, E.grad, B.grad, *buffers)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_kernel_matches_reference(shape, masked, dtype):
    case = _case(shape, masked, dtype)
    exact = _run(reference, {**case, "u": case["u"].double()}, torch.float64)
    eager = _run(reference, case, torch.float32)
    kernel = _run(lora_linear, case, torch.float32)
    for k, e, x in zip(kernel, eager, exact):
        assert_three_way(k, e, x)
    if masked == "all":
        assert all(t.abs().max() == 0 for t in kernel[:1] + kernel[2:])


@pytest.mark.parametrize("masked", MASKS)
def test_plain_forward_matches_reference(masked):
    case = _case((2, 9, 33, 65, 3), masked, torch.float32)
    x = case["u"].clone().requires_grad_()
    A, E, B = (p.float() for p in case["params"])
    outputs = []
    for impl in (reference, lora_linear):
        x.grad = None
        y = impl.lora_delta(x, A, E, B, case["mask"], 0.5, scale=0.3)
        (y * case["gy"].float()).sum().backward()
        outputs.append((y.detach(), x.grad.clone()))
    for k, e in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(k, e, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batched_kernel_on_gpu(shape, masked, dtype):
    case = _case(shape, masked, dtype, device="cuda")
    exact = _run(reference, {**case, "u": case["u"].double()}, torch.float64)
    eager = _run(reference, case, torch.float32)
    kernel = _run(lora_linear, case, torch.float32)
    for k, e, x in zip(kernel, eager, exact):
        assert_three_way(k, e, x)
