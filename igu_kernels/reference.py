"""Eager PyTorch reference for every igulora op.

This file is the oracle: kernel tests and benchmarks import it, and the dispatcher falls back
to it. It favours clarity over speed and accumulates in fp32 (fp64 when given fp64).

Shapes: ``x`` is (N, ..., in) with the batch on dim 0; ``A`` (r, in), ``E`` (r,), ``B`` (out, r),
``mask`` (r,) or None (no mask); per-row vectors (``row_scale``, coefficients) have length N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igu_kernels.amp import autocast_off

Tensor = torch.Tensor


# Element scores; the Triton and C++ ops take the index into this tuple.
SCORES = ("snr", "product", "stable_magnitude")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def effective_singular_values(E: Tensor, mask: Tensor | None) -> Tensor:
    return E if mask is None else E * mask.to(E.dtype)


@autocast_off
def lora_delta(
    x: Tensor,
    A: Tensor,
    E: Tensor,
    B: Tensor,
    mask: Tensor | None,
    scaling: float,
    scale: float = 1.0,
    precision: torch.dtype | None = None,
) -> Tensor:
    """Adapter output ``scale * s * ((x A^T) * (E m)) B^T`` with plain autograd.

    ``scale`` is alpha^3 of one IG node (1 for training). Computes and returns ``precision``
    (default: the compute dtype; a 16-bit one gives eager 16-bit LoRA, the kernels' tolerance
    baseline); the caller casts to the base layer's output dtype.
    """
    dtype = precision or compute_dtype(x, A)
    h = x.to(dtype) @ A.to(dtype).t()
    h = h * effective_singular_values(E, mask).to(dtype)
    return (h @ B.to(dtype).t()) * (scaling * scale)


def _row_weighted_param_grads(u, h, hs, gy, g_hs, em, mask, scaling, coefs):
    """For each column c of ``coefs`` (M, C): sum over rows of ``coefs[row, c]`` times the row's
    autograd contribution to (dA, dE, dB). Returns (dA, dE, dB) stacked on a leading dim C.

    ``u`` (M, in) adapter input, ``h = u A^T`` and ``hs = h * em * c`` (M, r), ``gy`` (M, out),
    ``g_hs = s * (gy B) * c`` (M, r): the gradient reaching ``h * em``, row scale included.
    The C reductions share one GEMM each for A and B, so ``u`` and ``gy`` are read once; the
    row coefficients scale the (M, r) factors, never the wide (M, in/out) ones.
    """
    rows, r = h.shape
    n_sets = coefs.shape[1]

    def per_set(x):  # (M, r) -> (M, C * r): x scaled by each coefficient set
        return (x[:, None, :] * coefs[:, :, None]).reshape(rows, n_sets * r)

    weighted = per_set(g_hs)
    dA = ((weighted * em.repeat(n_sets)).t() @ u).view(n_sets, r, -1)
    dE = (weighted * h.repeat(1, n_sets)).sum(0).view(n_sets, r)
    if mask is not None:
        dE = dE * mask.to(dE.dtype)
    dB = (scaling * (gy.t() @ per_set(hs))).view(-1, n_sets, r).transpose(0, 1)
    return dA, dE, dB


class BatchedIGLoraFunction(torch.autograd.Function):
    """Low-rank branch with per-row node scales and two row-weighted parameter reductions.

    Forward: ``y = s * ((u A^T) * (E m) * c_row) B^T`` with ``c_row = alpha_row^3``.
    Backward: ``du`` exact per row; the returned (A, E, B) gradients use ``train_coef`` (1 on the
    training rows, 0 on IG rows); the IG accumulators get ``theta * grad`` reduced with
    ``ig_coef`` (= w_row / alpha_row), with theta the forward's parameters.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers, precision=None):
        dtype = precision or compute_dtype(u, A)
        shape = u.shape
        rows = shape[0]
        u2 = u.reshape(-1, shape[-1]).to(dtype)
        per_row = u2.shape[0] // rows
        c = row_scale.to(dtype).repeat_interleave(per_row)
        em = effective_singular_values(E, mask).to(dtype)
        h = u2 @ A.to(dtype).t()
        y = ((h * em * c[:, None]) @ B.to(dtype).t()) * scaling
        ctx.save_for_backward(u2, h, A, E, B, mask if mask is not None else torch.empty(0), c)
        ctx.has_mask = mask is not None
        ctx.scaling, ctx.per_row, ctx.in_shape, ctx.in_dtype = scaling, per_row, shape, u.dtype
        ctx.train_coef, ctx.ig_coef, ctx.ig_buffers = train_coef, ig_coef, ig_buffers
        return y.reshape(*shape[:-1], B.shape[0])

    @staticmethod
    @autocast_off
    def backward(ctx, gy):
        u2, h, A, E, B, mask, c = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        dtype, s = h.dtype, ctx.scaling
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dtype)
        em = effective_singular_values(E, mask).to(dtype)
        hs = h * em * c[:, None]
        g_hs = (gy2 @ B.to(dtype)) * s * c[:, None]  # gradient w.r.t. h*em, row scale included
        du = ((g_hs * em) @ A.to(dtype)).reshape(ctx.in_shape).to(ctx.in_dtype)

        coef_rows = [ctx.train_coef] if ctx.ig_buffers is None else [ctx.train_coef, ctx.ig_coef]
        coefs = torch.stack(coef_rows, dim=1).to(dtype).repeat_interleave(ctx.per_row, dim=0)
        dA_all, dE_all, dB_all = _row_weighted_param_grads(u2, h, hs, gy2, g_hs, em, mask, s, coefs)
        grads = (dA_all[0], dE_all[0], dB_all[0])
        if ctx.ig_buffers is not None:
            for buf, theta, g in zip(ctx.ig_buffers, (A, E, B), (dA_all[1], dE_all[1], dB_all[1])):
                buf.add_((theta.to(dtype) * g).to(buf.dtype))
        dA, dE, dB = (g.to(p.dtype) for g, p in zip(grads, (A, E, B)))
        return du, dA, dE, dB, None, None, None, None, None, None, None


def batched_ig_lora_delta(
    u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers, precision=None
):
    return BatchedIGLoraFunction.apply(
        u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers, precision
    )


def adapted_linear(
    u, base, A, E, B, mask, scaling, *, scale=1.0, plan=None, ig_buffers=None, weight=None, bias=None,
    precision=None,
):  # fmt: skip
    """``base + delta`` in the base's dtype (contract in igu_kernels.dispatch.adapted_linear)."""
    if base is None:
        base = F.linear(u, weight, bias)
    if plan is None:
        delta = lora_delta(u, A, E, B, mask, scaling, scale, precision)
    else:
        delta = batched_ig_lora_delta(u, A, E, B, mask, scaling, *plan, ig_buffers, precision)
    return base + delta.to(base.dtype)


def score_update(
    ig: Tensor,
    ibar: Tensor,
    ubar: Tensor,
    *,
    beta1: float,
    beta2: float,
    score: str,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """One scoring step for one tensor, EMAs updated in place (method.md, section 3).

    ``I = |ig|``; ``Ibar <- b1 Ibar + (1-b1) I``; ``Ubar <- b2 Ubar + (1-b2) |I - Ibar|``;
    returns the element score of :func:`element_score` (written into ``out`` when given).
    """
    importance = ig.abs().to(ibar.dtype)
    ibar.mul_(beta1).add_((1 - beta1) * importance)
    ubar.mul_(beta2).add_((1 - beta2) * (importance - ibar).abs())
    return element_score(ibar, ubar, score=score, eps=eps, out=out)


def element_score(ibar: Tensor, ubar: Tensor, *, score: str, eps: float, out: Tensor | None = None) -> Tensor:
    """``snr`` (IGU-LoRA): ``(Ibar + eps) / (Ubar + eps)``, blind to scale; ``product``
    (AdaLoRA): ``Ibar * Ubar``, which rewards noise; ``stable_magnitude``:
    ``Ibar^2 / (Ibar + Ubar + eps)``, the magnitude shrunk by the share of noise in it
    (``Ibar * SNR / (1 + SNR)``): Ibar for a steady element, Ibar / 2 when Ubar = Ibar."""
    if score == "snr":
        return torch.div(ibar + eps, ubar + eps, out=out)
    if score == "product":
        return torch.mul(ibar, ubar, out=out)
    return torch.div(ibar * ibar, ibar + ubar + eps, out=out)


def triplet_scores(score_A: Tensor, score_E: Tensor, score_B: Tensor) -> Tensor:
    """``S_k = score(E_k) + (mean_j score(A_kj) + mean_i score(B_ik))`` for one adapter."""
    return score_E + (score_A.mean(dim=1) + score_B.mean(dim=0))
