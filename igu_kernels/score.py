"""Fused score update and triplet score reduction (Triton).

The score update is memory-bound: per element it reads IG, Ibar, Ubar and writes Ibar, Ubar and
the score, in one pass (method.md, section 3). The triplet reduction turns one adapter's element
scores into ``S_k = score(E_k) + mean_j score(A_kj) + mean_i score(B_ik)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from igu_kernels.reference import SCORES
from igu_kernels.tuning import device_guard

BLOCK = 1024

# The launch space igu_kernels.audit compiles (every pointer is fp32, as checked below).
ACTIVATION_DTYPES = ("fp32",)
ACTIVATION_PTRS = ()
FLOAT_ARGS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps")
GPU_CONSTEXPRS = {
    "SCORE": (0, 1, 2),
    "_score_update_kernel.BLOCK": (BLOCK,),
    "_triplet_kernel.BLOCK": (256,),
}
GPU_LAUNCH = {"num_warps": 4, "num_stages": 3}


@triton.jit
def _score_update_kernel(
    ig_ptr,
    ibar_ptr,
    ubar_ptr,
    score_ptr,
    n,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    SCORE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """I = |ig|; Ibar <- b1 Ibar + (1-b1) I; Ubar <- b2 Ubar + (1-b2) |I - Ibar|; the score
    SCORE (an index of igulora.config.SCORES: snr, product, stable_magnitude).

    1 - beta arrives precomputed in double (rounded once to fp32), as eager PyTorch forms it.

    grid: (cdiv(n, BLOCK),)   block: BLOCK contiguous elements; Ibar and Ubar updated in place.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    importance = tl.abs(tl.load(ig_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    ibar = beta1 * tl.load(ibar_ptr + offs, mask=mask, other=0.0) + one_minus_beta1 * importance
    ubar = beta2 * tl.load(ubar_ptr + offs, mask=mask, other=0.0) + one_minus_beta2 * tl.abs(
        importance - ibar
    )
    tl.store(ibar_ptr + offs, ibar, mask=mask)
    tl.store(ubar_ptr + offs, ubar, mask=mask)
    if SCORE == 0:
        score = (ibar + eps) / (ubar + eps)
    elif SCORE == 1:
        score = ibar * ubar
    else:
        score = ibar * ibar / (ibar + ubar + eps)
    tl.store(score_ptr + offs, score, mask=mask)


@triton.jit
def _triplet_kernel(a_ptr, e_ptr, b_ptr, out_ptr, R, K, N, BLOCK: tl.constexpr):
    """out[k] = e[k] + (mean_j a[k, j] + mean_i b[i, k]).

    grid: (R,)   block: BLOCK elements of row k of A, then of column k of B (stride R).
    """
    k = tl.program_id(0)
    sum_a = tl.zeros((BLOCK,), dtype=tl.float32)
    for j0 in range(0, K, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        sum_a += tl.load(a_ptr + k * K + offs, mask=offs < K, other=0.0)
    sum_b = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        sum_b += tl.load(b_ptr + offs * R + k, mask=offs < N, other=0.0)
    mean_a = tl.sum(sum_a, axis=0) / K
    mean_b = tl.sum(sum_b, axis=0) / N
    tl.store(out_ptr + k, tl.load(e_ptr + k) + (mean_a + mean_b))


def _require_contiguous_fp32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"triton score op: {name} must be a contiguous fp32 tensor, "
                f"got {t.dtype} with shape {tuple(t.shape)}"
            )


def score_update(ig, ibar, ubar, *, beta1, beta2, score, eps, out=None):
    out = torch.empty_like(ibar) if out is None else out
    _require_contiguous_fp32(ibar=ibar, ubar=ubar, out=out)
    if ig.shape != ibar.shape or ubar.shape != ibar.shape:
        raise ValueError(
            f"score_update: shapes differ: ig {tuple(ig.shape)}, "
            f"ibar {tuple(ibar.shape)}, ubar {tuple(ubar.shape)}"
        )
    ig = ig.contiguous()
    n = ibar.numel()
    if n:
        with device_guard(ibar.device):
            _score_update_kernel[(triton.cdiv(n, BLOCK),)](
                ig,
                ibar,
                ubar,
                out,
                n,
                beta1,
                beta2,
                1.0 - beta1,
                1.0 - beta2,
                eps,
                SCORES.index(score),
                BLOCK,
            )
    return out


def triplet_scores(score_A, score_E, score_B):
    _require_contiguous_fp32(score_A=score_A, score_E=score_E, score_B=score_B)
    R, K = score_A.shape
    out = torch.empty(R, device=score_A.device, dtype=torch.float32)
    if R:
        with device_guard(out.device):
            _triplet_kernel[(R,)](score_A, score_E, score_B, out, R, K, score_B.shape[0], 256)
    return out
