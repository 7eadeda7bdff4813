"""Triton masked low-rank linear (interpreter on CPU) against the eager reference.

The tolerance is FlashAttention's three-way rule: against an fp64 result, the kernel's error is
at most twice that of the eager reference computing in the activation dtype (16-bit eager LoRA
for fp16 activations, fp32 for fp32), plus a small atol (a quarter of the dtype's epsilon at the
result's scale for 16-bit).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_three_way, requires_cuda

triton = pytest.importorskip("triton")
from igu_kernels import dispatch, lora_linear, reference  # noqa: E402

cdiv = triton.cdiv

# (rows, tokens, in, out, r): odd features, r = 1, a rank above one 16-wide slice, and M = 80
# rows, which the dA / dB reductions split into chunks (the last one shorter).
SHAPES = [(3, 5, 33, 17, 4), (2, 3, 65, 127, 1), (1, 7, 127, 33, 5), (2, 9, 33, 17, 20), (4, 20, 33, 17, 3)]
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
        "base": rand(n, t, d_out).to(dtype),
        "weight": (rand(d_out, d_in) / d_in**0.5).to(dtype),
        "bias": rand(d_out).to(dtype),
        "mask": None if mask is None else mask.to(device),
        "row_scale": torch.rand(n, generator=g, dtype=torch.float64),
        "train_coef": (torch.arange(n) < (n + 1) // 2).double(),
        "ig_coef": torch.rand(n, generator=g, dtype=torch.float64),
        "gy": rand(n, t, d_out),
        "device": device,
    }


def _leaf(t, device, dtype=None):
    return t.detach().to(device, dtype).clone().requires_grad_()


def _run(impl, case, param_dtype, *, base="delta", plan=True, **precision):
    """Forward + backward of ``impl``: output, du, grads, IG buffers and (with a base) its grads.

    ``base``: "delta" (the delta alone), "output" (the base layer's output given) or "weight"
    (the op computes the base from its weight and bias).
    """
    dev = case["device"]
    act = torch.float64 if param_dtype == torch.float64 else case["u"].dtype
    u = _leaf(case["u"], dev, act)
    A, E, B = (_leaf(p, dev, param_dtype) for p in case["params"])
    out_base, W, b = (
        _leaf(case["base"], dev, act),
        _leaf(case["weight"], dev, act),
        _leaf(case["bias"], dev, act),
    )
    buffers = tuple(torch.zeros_like(p) for p in (A, E, B))
    vecs = tuple(case[k].to(dev, param_dtype) for k in ("row_scale", "train_coef", "ig_coef"))
    args = (A, E, B, case["mask"], 0.7)
    if base == "delta" and plan:
        y = impl.batched_ig_lora_delta(u, *args, *vecs, buffers, **precision)
    else:
        given = {"output": (out_base, None, None), "weight": (None, W, b)}[base]
        y = impl.adapted_linear(
            u, given[0], *args, scale=0.3, plan=vecs if plan else None, ig_buffers=buffers if plan else None,
            weight=given[1], bias=given[2], **precision,
        )  # fmt: skip
    (y * case["gy"].to(dev, y.dtype)).sum().backward()
    grads = [out_base.grad] if base == "output" else [W.grad, b.grad] if base == "weight" else []
    outs = [y, u.grad, A.grad, E.grad, B.grad, *(buffers if plan else ()), *grads]
    return [t.detach().double().cpu() for t in outs]


def _check(case, dtype, **kw):
    exact = _run(reference, case, torch.float64, **kw)
    eager = _run(reference, case, torch.float32, **kw, precision=None if dtype == torch.float32 else dtype)
    kernel = _run(lora_linear, case, torch.float32, **kw)
    # A quarter of the dtype's epsilon (at the result's scale) as the atol floor: a reduction to a
    # few elements (dE at r = 1) has too few roundings for "twice eager's max error" alone.
    floor = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps / 4
    for k, e, x in zip(kernel, eager, exact, strict=True):
        assert_three_way(k, e, x, rtol_floor=floor)
    return kernel


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_kernel_matches_reference(shape, masked, dtype):
    kernel = _check(_case(shape, masked, dtype), dtype)
    if masked == "all":
        assert all(t.abs().max() == 0 for t in kernel[:1] + kernel[2:])


@pytest.mark.parametrize("base", ["output", "weight"])
@pytest.mark.parametrize("plan", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", ["partial", "all"])
def test_fused_epilogues_match_reference(base, plan, dtype, masked):
    """The forward adds the delta into the base output in its dtype; with the base weight the
    backward adds du into the base's dx. Gradients reach the base output, weight and bias."""
    _check(_case((4, 20, 33, 17, 3), masked, dtype), dtype, base=base, plan=plan)


def test_row_reductions_split_and_are_deterministic():
    n, t, d_in, d_out, _ = shape = (4, 20, 33, 17, 3)
    assert lora_linear.row_chunks(n * t, d_in, torch.device("cpu")) > 1
    assert lora_linear.row_chunks(n * t, d_out, torch.device("cpu")) > 1
    case = _case(shape, "none", torch.float32)
    first, second = _run(lora_linear, case, torch.float32), _run(lora_linear, case, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_split_targets_two_programs_per_sm_at_8k_tokens(monkeypatch):
    """At 8k tokens x 4096 features on a 132-SM device the dA and dB grids fill every SM twice
    with any tile the tuner can pick."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(lora_linear, "_sm_count", lambda device: 132)
    chunks = lora_linear.row_chunks(8192, 4096, torch.device("cuda"))
    for tuned in (lora_linear.TUNED["_grad_a_kernel"], lora_linear.TUNED["_grad_b_kernel"]):
        for dtype in lora_linear.ACTIVATION_DTYPES:
            for config in tuned.configs_for(dtype):
                feature_tile = next(v for k, v in config.kwargs.items() if k != "BLOCK_M")
                block_m = config.kwargs["BLOCK_M"]
                rows = cdiv(cdiv(8192, block_m), chunks) * block_m  # a chunk, as _chunk deals them
                programs = cdiv(4096, feature_tile) * cdiv(8192, rows)
                assert programs >= 2 * 132, (config, chunks, programs)


def test_ranks_above_the_audited_tiles_run_on_the_reference(monkeypatch):
    monkeypatch.setenv("IGULORA_BACKEND", "triton")
    u, A = torch.zeros(2, 3), torch.zeros(lora_linear.MAX_RANK + 1, 3)
    assert dispatch._lora("adapted_linear", u, A) is reference
    assert dispatch.fuses_base(u, A[: lora_linear.MAX_RANK])


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
@pytest.mark.parametrize("base", ["delta", "output", "weight"])
def test_kernel_on_gpu(shape, masked, dtype, base):
    _check(_case(shape, masked, dtype, device="cuda"), dtype, base=base)


@pytest.mark.parametrize("impl", [reference, lora_linear], ids=["eager", "triton"])
def test_an_adapter_compacted_to_no_ranks_is_the_base(impl):
    u = torch.randn(2, 3, 33, requires_grad=True)
    base = torch.randn(2, 3, 17)
    A, E, B = (torch.zeros(*s, requires_grad=True) for s in ((0, 33), (0,), (17, 0)))
    y = impl.adapted_linear(u, base, A, E, B, None, 0.5)
    assert torch.equal(y, base)
    y.sum().backward()
    assert u.grad.abs().max() == 0 and A.grad.shape == (0, 33) and B.grad.shape == (17, 0)


def test_adapted_linear_names_a_missing_or_misshapen_base():
    u, A, E, B = torch.zeros(2, 3, 5), torch.zeros(2, 5), torch.zeros(2), torch.zeros(7, 2)
    with pytest.raises(ValueError, match="give the base output"):
        dispatch.adapted_linear(u, None, A, E, B, None, 1.0)
    with pytest.raises(ValueError, match=r"base has shape \(2, 3, 6\), expected \(2, 3, 7\)"):
        dispatch.adapted_linear(u, torch.zeros(2, 3, 6), A, E, B, None, 1.0)


def test_operands_follow_every_optimizer_step_fused_adamw_included():
    """Fused AdamW writes the factors without bumping their version counters (so does FSDP2's
    all-gather): the op must see every step's weights. Three steps, Triton against eager."""
    case = _case((2, 9, 33, 17, 5), "partial", torch.float32)
    x, gy = case["u"].float(), case["gy"].float()
    runs = []
    for impl in (reference, lora_linear):
        params = [p.float().clone().requires_grad_() for p in case["params"]]
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
        outs = []
        for _ in range(3):
            y = impl.lora_delta(x, *params, case["mask"], 0.5)
            (y * gy).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            outs.append(y.detach())
        assert params[0]._version == 0  # what a version-keyed cache would have relied on
        runs.append(outs)
    for eager, kernel in zip(*runs, strict=True):
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-5)
