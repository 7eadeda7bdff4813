"""Fused masked low-rank linear with per-node IG accumulation: Triton kernels, launcher, Function.

The low-rank branch of IGULoraLinear on a batched IG plan (method.md, section 4):

    forward   y = s * ((u A^T) * (E m) * c_row) B^T                  c_row = alpha_row^3
    backward  du exact per row; for A, E, B two reductions over rows in one pass:
              training coefficients -> returned gradients (.grad),
              IG coefficients (w / alpha) -> theta * grad added to the IG buffers.

Masked ranks cost no work: the launcher gathers the active ranks into dense, zero-padded
operands ``Ac`` (R_PAD x K), ``Ec`` (R_PAD), ``Bc`` (N x R_PAD), with R_PAD the active rank
rounded up to a power of two >= 16 (``tl.dot``'s minimum), and scatters the results back.
Rows are the flattened tokens (M = batch x tokens); row vectors are per sequence, and token m
reads entry ``m // per_row``. Every product accumulates in fp32 with fp32 operands ("ieee").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from igu_kernels.amp import autocast_off
from igu_kernels.dispatch import interpreting

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _down_kernel(
    u_ptr, a_ptr, h_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr
):
    """h = u @ Ac^T.   grid: (cdiv(M, BLOCK_M),)   block: h[BLOCK_M, R_PAD], loop over K."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(
            u_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )
        a = tl.load(a_ptr + rj[None, :] * K + rk[:, None], mask=rk[:, None] < K, other=0.0)
        acc += tl.dot(u.to(tl.float32), a, input_precision="ieee")
    tl.store(h_ptr + rm[:, None] * R_PAD + rj[None, :], acc, mask=rm[:, None] < M)


@triton.jit
def _up_kernel(
    h_ptr,
    e_ptr,
    c_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    per_row,
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """y = s * (h * Ec * c_row) @ Bc^T.

    grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))   block: y[BLOCK_M, BLOCK_N].
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, R_PAD)
    h = tl.load(h_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
    c = tl.load(c_ptr + rm // per_row, mask=rm < M, other=0.0)
    hs = h * tl.load(e_ptr + rj)[None, :] * (c * scaling)[:, None]
    b = tl.load(b_ptr + rn[None, :] * R_PAD + rj[:, None], mask=rn[None, :] < N, other=0.0)
    y = tl.dot(hs, b, input_precision="ieee")
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _grad_h_kernel(
    gy_ptr,
    b_ptr,
    h_ptr,
    c_ptr,
    tc_ptr,
    ic_ptr,
    g_ptr,
    de_t_ptr,
    de_ig_ptr,
    M,
    N,
    per_row,
    scaling,
    HAS_IG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """g = s * c_row * (gy @ Bc) (the gradient reaching h * Ec) and this block's dE partial sums.

    grid: (cdiv(M, BLOCK_M),)   block: g[BLOCK_M, R_PAD], loop over N.
    Writes de_t[pid] = sum_rows tc * g * h and, with HAS_IG, de_ig[pid] = sum_rows ic * g * h.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        gy = tl.load(
            gy_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0
        )
        b = tl.load(b_ptr + rn[:, None] * R_PAD + rj[None, :], mask=rn[:, None] < N, other=0.0)
        acc += tl.dot(gy.to(tl.float32), b, input_precision="ieee")
    row = rm // per_row
    c = tl.load(c_ptr + row, mask=rm < M, other=0.0)
    g = acc * (c * scaling)[:, None]
    tl.store(g_ptr + rm[:, None] * R_PAD + rj[None, :], g, mask=rm[:, None] < M)
    gh = g * tl.load(h_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
    tc = tl.load(tc_ptr + row, mask=rm < M, other=0.0)
    tl.store(de_t_ptr + pid * R_PAD + rj, tl.sum(gh * tc[:, None], axis=0))
    if HAS_IG:
        ic = tl.load(ic_ptr + row, mask=rm < M, other=0.0)
        tl.store(de_ig_ptr + pid * R_PAD + rj, tl.sum(gh * ic[:, None], axis=0))


@triton.jit
def _dx_kernel(
    g_ptr, e_ptr, a_ptr, du_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr
):
    """du = (g * Ec) @ Ac.   grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))   block: du[BLOCK_M, BLOCK_K]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.arange(0, R_PAD)
    g = tl.load(g_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
    ge = g * tl.load(e_ptr + rj)[None, :]
    a = tl.load(a_ptr + rj[:, None] * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
    du = tl.dot(ge, a, input_precision="ieee")
    tl.store(du_ptr + rm[:, None] * K + rk[None, :], du, mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _grad_a_kernel(
    u_ptr,
    g_ptr,
    e_ptr,
    a_ptr,
    tc_ptr,
    ic_ptr,
    da_ptr,
    ig_a_ptr,
    M,
    K,
    per_row,
    HAS_IG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """dA = (g * Ec * tc)^T @ u and IG_A = Ac * ((g * Ec * ic)^T @ u), u read once for both.

    grid: (cdiv(K, BLOCK_K),)   block: dA[R_PAD, BLOCK_K], loop over M.
    """
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.arange(0, R_PAD)
    e = tl.load(e_ptr + rj)
    acc_t = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    acc_ig = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        u = tl.load(
            u_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )
        u = u.to(tl.float32)
        ge = tl.load(g_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0) * e[None, :]
        tc = tl.load(tc_ptr + rm // per_row, mask=rm < M, other=0.0)
        acc_t += tl.dot(tl.trans(ge * tc[:, None]), u, input_precision="ieee")
        if HAS_IG:
            ic = tl.load(ic_ptr + rm // per_row, mask=rm < M, other=0.0)
            acc_ig += tl.dot(tl.trans(ge * ic[:, None]), u, input_precision="ieee")
    offs = rj[:, None] * K + rk[None, :]
    tl.store(da_ptr + offs, acc_t, mask=rk[None, :] < K)
    if HAS_IG:
        a = tl.load(a_ptr + offs, mask=rk[None, :] < K, other=0.0)
        tl.store(ig_a_ptr + offs, a * acc_ig, mask=rk[None, :] < K)


@triton.jit
def _grad_b_kernel(
    gy_ptr,
    h_ptr,
    e_ptr,
    b_ptr,
    c_ptr,
    tc_ptr,
    ic_ptr,
    db_ptr,
    ig_b_ptr,
    M,
    N,
    per_row,
    scaling,
    HAS_IG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """dB = s * (gy * tc)^T @ hs and IG_B = Bc * s * ((gy * ic)^T @ hs), hs = h * Ec * c_row.

    grid: (cdiv(N, BLOCK_N),)   block: dB[BLOCK_N, R_PAD], loop over M; gy read once for both.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, R_PAD)
    e = tl.load(e_ptr + rj)
    acc_t = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    acc_ig = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        gy = tl.load(
            gy_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0
        )
        gy = gy.to(tl.float32)
        row = rm // per_row
        c = tl.load(c_ptr + row, mask=rm < M, other=0.0)
        hs = tl.load(h_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
        hs = hs * e[None, :] * c[:, None]
        tc = tl.load(tc_ptr + row, mask=rm < M, other=0.0)
        acc_t += tl.dot(tl.trans(gy * tc[:, None]), hs, input_precision="ieee")
        if HAS_IG:
            ic = tl.load(ic_ptr + row, mask=rm < M, other=0.0)
            acc_ig += tl.dot(tl.trans(gy * ic[:, None]), hs, input_precision="ieee")
    offs = rn[:, None] * R_PAD + rj[None, :]
    tl.store(db_ptr + offs, acc_t * scaling, mask=rn[:, None] < N)
    if HAS_IG:
        b = tl.load(b_ptr + offs, mask=rn[:, None] < N, other=0.0)
        tl.store(ig_b_ptr + offs, b * acc_ig * scaling, mask=rn[:, None] < N)


# ---------------------------------------------------------------------------------------------
# Launcher


# The launch space igu_kernels.audit compiles: what the launcher below can pick on a GPU. The
# activations (u, gy) arrive in the model's dtype; every other pointer is fp32.
ACTIVATION_DTYPES = ("fp32", "fp16", "bf16")
ACTIVATION_PTRS = ("u_ptr", "gy_ptr")
FLOAT_ARGS = ("scaling",)
GPU_CONSTEXPRS = {
    "BLOCK_M": (64,),
    "BLOCK_K": (64,),
    "BLOCK_N": (64,),
    "R_PAD": (16, 32, 64),  # active ranks up to 64 rounded up to a power of two >= 16
    "HAS_IG": (False, True),
}
GPU_LAUNCH = {"num_warps": 4, "num_stages": 3}  # Triton's defaults: the launcher sets neither


def _blocks() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_FEATURE): large tiles on a GPU, smaller ones for the slow interpreter."""
    return (32, 32) if interpreting() else (64, 64)


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


class _Compact:
    """Active ranks of one adapter gathered into dense, zero-padded fp32 operands."""

    def __init__(self, A: Tensor, E: Tensor, B: Tensor, mask: Tensor | None) -> None:
        self.index = torch.arange(A.shape[0], device=A.device) if mask is None else mask.nonzero().flatten()
        r, self.r_pad = self.index.numel(), _rank_pad(self.index.numel())
        f32 = {"device": A.device, "dtype": torch.float32}
        self.A = torch.zeros(self.r_pad, A.shape[1], **f32)
        self.E = torch.zeros(self.r_pad, **f32)
        self.B = torch.zeros(B.shape[0], self.r_pad, **f32)
        self.A[:r] = A.detach()[self.index]
        self.E[:r] = E.detach()[self.index]
        self.B[:, :r] = B.detach()[:, self.index]

    @property
    def r(self) -> int:
        return self.index.numel()


class TritonBatchedIGLoraFunction(torch.autograd.Function):
    """Same contract as ``reference.BatchedIGLoraFunction``, computed by the kernels above."""

    @staticmethod
    @autocast_off
    def forward(ctx, u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
        shape, K, N = u.shape, A.shape[1], B.shape[0]
        u2 = u.reshape(-1, K).contiguous()
        M = u2.shape[0]
        per_row = max(1, M // row_scale.shape[0])
        compact = _Compact(A, E, B, mask)
        y = torch.zeros(M, N, device=u.device, dtype=torch.float32)
        h = torch.empty(M, compact.r_pad, device=u.device, dtype=torch.float32)
        c = row_scale.to(torch.float32).contiguous()
        if compact.r and M:
            bm, bf = _blocks()
            _down_kernel[(triton.cdiv(M, bm),)](u2, compact.A, h, M, K, bm, bf, compact.r_pad)
            grid = (triton.cdiv(M, bm), triton.cdiv(N, bf))
            _up_kernel[grid](
                h, compact.E, c, compact.B, y, M, N, per_row, float(scaling), bm, bf, compact.r_pad
            )
        ctx.save_for_backward(u2, h, c, train_coef.to(torch.float32).contiguous(), A, E, B)
        ctx.compact, ctx.scaling, ctx.per_row, ctx.in_shape, ctx.in_dtype = (
            compact,
            scaling,
            per_row,
            shape,
            u.dtype,
        )
        ctx.ig_coef = None if ig_buffers is None else ig_coef.to(torch.float32).contiguous()
        ctx.ig_buffers = ig_buffers
        return y.reshape(*shape[:-1], N)

    @staticmethod
    @autocast_off
    def backward(ctx, gy):
        u2, h, c, tc, A, E, B = ctx.saved_tensors
        compact, s, per_row = ctx.compact, float(ctx.scaling), ctx.per_row
        M, K = u2.shape
        N, r_pad, has_ig = B.shape[0], compact.r_pad, ctx.ig_buffers is not None
        dA, dE, dB = torch.zeros_like(A), torch.zeros_like(E), torch.zeros_like(B)
        du = torch.zeros(M, K, device=u2.device, dtype=torch.float32)
        if compact.r and M:
            gy2 = gy.reshape(-1, N).contiguous()
            ic = ctx.ig_coef if has_ig else tc
            bm, bf = _blocks()
            blocks_m = triton.cdiv(M, bm)
            f32 = {"device": u2.device, "dtype": torch.float32}
            g = torch.empty(M, r_pad, **f32)
            de_t, de_ig = torch.empty(blocks_m, r_pad, **f32), torch.empty(blocks_m, r_pad, **f32)
            _grad_h_kernel[(blocks_m,)](
                gy2, compact.B, h, c, tc, ic, g, de_t, de_ig, M, N, per_row, s, has_ig, bm, bf, r_pad
            )
            _dx_kernel[(blocks_m, triton.cdiv(K, bf))](g, compact.E, compact.A, du, M, K, bm, bf, r_pad)
            da_t, ig_a = torch.empty(r_pad, K, **f32), torch.empty(r_pad, K, **f32)
            _grad_a_kernel[(triton.cdiv(K, bf),)](
                u2, g, compact.E, compact.A, tc, ic, da_t, ig_a, M, K, per_row, has_ig, bm, bf, r_pad
            )
            db_t, ig_b = torch.empty(N, r_pad, **f32), torch.empty(N, r_pad, **f32)
            _grad_b_kernel[(triton.cdiv(N, bf),)](
                gy2, h, compact.E, compact.B, c, tc, ic, db_t, ig_b, M, N, per_row, s, has_ig, bm, bf, r_pad
            )
            idx, r = compact.index, compact.r
            dA[idx] = da_t[:r].to(dA.dtype)
            dE[idx] = de_t.sum(0)[:r].to(dE.dtype)
            dB[:, idx] = db_t[:, :r].to(dB.dtype)
            if has_ig:
                buf_a, buf_e, buf_b = ctx.ig_buffers
                buf_a[idx] += ig_a[:r].to(buf_a.dtype)
                buf_e[idx] += (compact.E[:r] * de_ig.sum(0)[:r]).to(buf_e.dtype)
                buf_b[:, idx] += ig_b[:, :r].to(buf_b.dtype)
        du = du.reshape(ctx.in_shape).to(ctx.in_dtype)
        return du, dA, dE, dB, None, None, None, None, None, None


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    return TritonBatchedIGLoraFunction.apply(
        u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers
    )


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    """The plain (training or single-node) forward: one 'row' of scale ``scale`` for all tokens."""
    ones = torch.ones(1, device=x.device, dtype=torch.float32)
    return TritonBatchedIGLoraFunction.apply(
        x.reshape(1, -1, x.shape[-1]), A, E, B, mask, scaling, ones * scale, ones, ones, None
    ).reshape(*x.shape[:-1], B.shape[0])
