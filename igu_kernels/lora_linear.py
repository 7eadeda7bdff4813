"""Fused masked low-rank linear with per-node IG accumulation: Triton kernels, launcher, Function.

The low-rank branch of IGULoraLinear on a batched IG plan (method.md, section 4), added into the
base layer's output:

    forward   y = base + s * ((u A^T) * (E m) * c_row) B^T               c_row = alpha_row^3
    backward  du exact per row (added into the base's dx when this op computes the base);
              for A, E, B two reductions over rows in one pass:
              training coefficients -> returned gradients (.grad),
              IG coefficients (w / alpha) -> theta * grad added to the IG buffers.

The launcher copies the factors into dense, zero-padded fp32 operands ``Ac`` (R_PAD x K),
``Ec = E * m`` (R_PAD), ``Bc`` (N x R_PAD), R_PAD the rank rounded up to a power of two >= 16
(``tl.dot``'s minimum), at every forward; masked ranks stay in place with
``Ec = 0`` (no host sync to find the active ones: see ``_Operands``).
Rows are the flattened tokens (M = batch x tokens); row vectors are per sequence, and token m
reads entry ``m // per_row``.

Precision, as eager 16-bit LoRA: every product takes its operands in the activation dtype (the
fp32 factors are cast on load; fp16/bf16 run on tensor cores) and accumulates in fp32; fp32
activations use tf32 where torch allows it (``tf32_enabled``), IEEE otherwise. The small row
factors ``h`` and ``g`` (M x R_PAD) stay fp32 between kernels. The row reductions of dA, dE and
dB are split into row chunks so the grid fills the device; the chunks' fp32 partial sums are
added in a fixed order (deterministic). No result depends on the launch tile (see the tiles
below), and row offsets are int64 (``_rows``): LLM batches pass 2^31 elements.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from igu_kernels.amp import autocast_off
from igu_kernels.dispatch import interpreting
from igu_kernels.tuning import Tuned, device_guard

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Kernels

# Products whose inner dimension is the rank take it in slices of R_STEP: tl.dot's smallest K,
# the tensor cores' K for 16-bit operands, and what keeps an fp32 IEEE (FFMA) product's operand
# fragments in registers at R_PAD = 64.
R_STEP: tl.constexpr = tl.constexpr(16)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32 with a, b in the operand dtype. PRECISION: "ieee" or "tf32" (fp32
    operands; 16-bit ones take the tensor cores either way), or "emulate" in the interpreter:
    the same operand roundings, then an exact fp32 product (its 16-bit dot is not to be trusted)."""
    if PRECISION == "emulate":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _rows(rm, stride):
    """Element offsets of rows ``rm`` of a row-major tensor with row stride ``stride``, in int64:
    rows x features passes 2^31 at LLM batch sizes (150k rows at 14336 features)."""
    return rm.to(tl.int64) * stride


@triton.jit
def _epilogue_tile(
    src_ptr, stride_src, M, N, LOAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """This program's [BLOCK_M, BLOCK_N] tile of an M x N output: rows, columns, bounds mask, and
    the fp32 accumulator it starts from (the tile of ``src`` with LOAD, else zeros)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if LOAD:
        src = src_ptr + _rows(rm, stride_src)[:, None] + rn[None, :]
        acc = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return rm, rn, inside, acc


@triton.jit
def _down_kernel(
    u_ptr,
    a_ptr,
    h_ptr,
    M,
    K,
    stride_u,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h = u @ Ac^T (fp32).   grid: (cdiv(M, BLOCK_M),)   block: h[BLOCK_M, R_PAD], loop over K."""
    dt = u_ptr.dtype.element_ty
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, R_PAD)
    u_rows = u_ptr + _rows(rm, stride_u)[:, None]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_rows + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rj[None, :] * K + rk[:, None], mask=rk[:, None] < K, other=0.0)
        acc = _mma(u, a.to(dt), acc, PRECISION)
    tl.store(h_ptr + rm[:, None] * R_PAD + rj[None, :], acc, mask=rm[:, None] < M)


@triton.jit
def _up_kernel(
    h_ptr,
    e_ptr,
    c_ptr,
    b_ptr,
    base_ptr,
    y_ptr,
    M,
    N,
    per_row,
    stride_base,
    stride_y,
    scaling,
    HAS_BASE: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = base + s * (h * Ec * c_row) @ Bc^T, accumulated in fp32 from the base, stored in y's
    dtype (without HAS_BASE: the delta alone).

    grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))   block: y[BLOCK_M, BLOCK_N].
    """
    dt = y_ptr.dtype.element_ty
    rm, rn, inside, acc = _epilogue_tile(base_ptr, stride_base, M, N, HAS_BASE, BLOCK_M, BLOCK_N)
    cs = tl.load(c_ptr + rm // per_row, mask=rm < M, other=0.0) * scaling
    for j0 in tl.static_range(0, R_PAD, R_STEP):
        rj = j0 + tl.arange(0, R_STEP)
        h = tl.load(h_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
        hs = h * tl.load(e_ptr + rj)[None, :] * cs[:, None]
        b = tl.load(b_ptr + rn[None, :] * R_PAD + rj[:, None], mask=rn[None, :] < N, other=0.0)
        acc = _mma(hs.to(dt), b.to(dt), acc, PRECISION)
    tl.store(y_ptr + _rows(rm, stride_y)[:, None] + rn[None, :], acc.to(dt), mask=inside)


@triton.jit
def _grad_h_kernel(
    gy_ptr,
    b_ptr,
    c_ptr,
    g_ptr,
    M,
    N,
    per_row,
    stride_gy,
    scaling,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """g = s * c_row * (gy @ Bc) (fp32: the gradient reaching h * Ec).

    grid: (cdiv(M, BLOCK_M),)   block: g[BLOCK_M, R_PAD], loop over N in BLOCK_N steps (one
    BLOCK_N per dtype: a row's sum does not depend on the tile).
    """
    dt = gy_ptr.dtype.element_ty
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, R_PAD)
    gy_rows = gy_ptr + _rows(rm, stride_gy)[:, None]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        gy = tl.load(gy_rows + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * R_PAD + rj[None, :], mask=rn[:, None] < N, other=0.0)
        acc = _mma(gy, b.to(dt), acc, PRECISION)
    c = tl.load(c_ptr + rm // per_row, mask=rm < M, other=0.0)
    tl.store(g_ptr + rm[:, None] * R_PAD + rj[None, :], acc * (c * scaling)[:, None], mask=rm[:, None] < M)


@triton.jit
def _dx_kernel(
    g_ptr,
    e_ptr,
    a_ptr,
    dx_ptr,
    M,
    K,
    stride_dx,
    ACCUMULATE: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx = (g * Ec) @ Ac in dx's dtype; with ACCUMULATE added (in fp32) to the dx it holds.

    grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))   block: dx[BLOCK_M, BLOCK_K].
    """
    dt = dx_ptr.dtype.element_ty
    rm, rk, inside, acc = _epilogue_tile(dx_ptr, stride_dx, M, K, ACCUMULATE, BLOCK_M, BLOCK_K)
    for j0 in tl.static_range(0, R_PAD, R_STEP):
        rj = j0 + tl.arange(0, R_STEP)
        g = tl.load(g_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rm[:, None] < M, other=0.0)
        ge = g * tl.load(e_ptr + rj)[None, :]
        a = tl.load(a_ptr + rj[:, None] * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
        acc = _mma(ge.to(dt), a.to(dt), acc, PRECISION)
    tl.store(dx_ptr + _rows(rm, stride_dx)[:, None] + rk[None, :], acc.to(dt), mask=inside)


@triton.jit
def _chunk(M, chunk_rows, AXIS: tl.constexpr):
    """Rows [start, end) of this program's chunk (grid dim AXIS). ``chunk_rows`` comes from the
    launcher, a multiple of every BLOCK_M: chunk boundaries do not depend on the tile."""
    start = tl.program_id(AXIS) * chunk_rows
    return start, tl.minimum(start + chunk_rows, M)


@triton.jit
def _grad_a_kernel(
    u_ptr,
    g_ptr,
    e_ptr,
    tc_ptr,
    ic_ptr,
    da_ptr,
    M,
    K,
    per_row,
    stride_u,
    chunk_rows,
    HAS_IG: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row chunk's part of dA = (g * Ec * tc)^T @ u and, with HAS_IG, of (g * Ec * ic)^T @ u;
    u read once for both. Partial sums go to da[set, chunk] (fp32, set 0 training, 1 IG).

    grid: (cdiv(K, BLOCK_K), chunks)   block: [R_PAD, BLOCK_K], loop over the chunk's rows in
    BLOCK_M steps (one BLOCK_M per dtype).
    """
    dt = u_ptr.dtype.element_ty
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.arange(0, R_PAD)
    e = tl.load(e_ptr + rj)
    start, end = _chunk(M, chunk_rows, 1)
    acc_t = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    acc_ig = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rows = rm < end
        u = tl.load(
            u_ptr + _rows(rm, stride_u)[:, None] + rk[None, :],
            mask=rows[:, None] & (rk[None, :] < K),
            other=0.0,
        )
        ge_t = tl.load(g_ptr + rm[None, :] * R_PAD + rj[:, None], mask=rows[None, :], other=0.0)
        ge_t = ge_t * e[:, None]
        tc = tl.load(tc_ptr + rm // per_row, mask=rows, other=0.0)
        acc_t = _mma((ge_t * tc[None, :]).to(dt), u, acc_t, PRECISION)
        if HAS_IG:
            ic = tl.load(ic_ptr + rm // per_row, mask=rows, other=0.0)
            acc_ig = _mma((ge_t * ic[None, :]).to(dt), u, acc_ig, PRECISION)
    slab = R_PAD * K
    offs = tl.program_id(1) * slab + rj[:, None] * K + rk[None, :]
    tl.store(da_ptr + offs, acc_t, mask=rk[None, :] < K)
    if HAS_IG:
        tl.store(da_ptr + tl.num_programs(1) * slab + offs, acc_ig, mask=rk[None, :] < K)


@triton.jit
def _grad_e_kernel(
    g_ptr,
    h_ptr,
    tc_ptr,
    ic_ptr,
    de_ptr,
    M,
    per_row,
    chunk_rows,
    HAS_IG: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One row chunk's part of dE = sum_rows tc * g * h and, with HAS_IG, of sum_rows ic * g * h
    (fp32, from the fp32 row factors: 8 bytes a rank a row). Partial sums go to de[set, chunk].

    grid: (chunks,)   block: [BLOCK_M, R_PAD], loop over the chunk's rows (untuned: one block).
    """
    rj = tl.arange(0, R_PAD)
    start, end = _chunk(M, chunk_rows, 0)
    de_t = tl.zeros((R_PAD,), dtype=tl.float32)
    de_ig = tl.zeros((R_PAD,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rows = rm < end
        offs = rm[:, None] * R_PAD + rj[None, :]
        gh = tl.load(g_ptr + offs, mask=rows[:, None], other=0.0) * tl.load(
            h_ptr + offs, mask=rows[:, None], other=0.0
        )
        de_t += tl.sum(gh * tl.load(tc_ptr + rm // per_row, mask=rows, other=0.0)[:, None], axis=0)
        if HAS_IG:
            de_ig += tl.sum(gh * tl.load(ic_ptr + rm // per_row, mask=rows, other=0.0)[:, None], axis=0)
    tl.store(de_ptr + tl.program_id(0) * R_PAD + rj, de_t)
    if HAS_IG:
        tl.store(de_ptr + (tl.num_programs(0) + tl.program_id(0)) * R_PAD + rj, de_ig)


@triton.jit
def _grad_b_kernel(
    gy_ptr,
    h_ptr,
    e_ptr,
    c_ptr,
    tc_ptr,
    ic_ptr,
    db_ptr,
    M,
    N,
    per_row,
    stride_gy,
    chunk_rows,
    HAS_IG: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row chunk's part of gy^T @ (hs * tc) and, with HAS_IG, of gy^T @ (hs * ic), with
    hs = h * Ec * c_row; gy read once for both. Partial sums go to db[set, chunk] (fp32, before
    the scaling s).

    grid: (cdiv(N, BLOCK_N), chunks)   block: [BLOCK_N, R_PAD], loop over the chunk's rows in
    BLOCK_M steps (one BLOCK_M per dtype).
    """
    dt = gy_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, R_PAD)
    e = tl.load(e_ptr + rj)
    start, end = _chunk(M, chunk_rows, 1)
    acc_t = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    acc_ig = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rows = rm < end
        gy_t = tl.load(
            gy_ptr + _rows(rm, stride_gy)[None, :] + rn[:, None],
            mask=rows[None, :] & (rn[:, None] < N),
            other=0.0,
        )
        row = rm // per_row
        c = tl.load(c_ptr + row, mask=rows, other=0.0)
        hs = tl.load(h_ptr + rm[:, None] * R_PAD + rj[None, :], mask=rows[:, None], other=0.0)
        hs = hs * e[None, :] * c[:, None]
        tc = tl.load(tc_ptr + row, mask=rows, other=0.0)
        acc_t = _mma(gy_t, (hs * tc[:, None]).to(dt), acc_t, PRECISION)
        if HAS_IG:
            ic = tl.load(ic_ptr + row, mask=rows, other=0.0)
            acc_ig = _mma(gy_t, (hs * ic[:, None]).to(dt), acc_ig, PRECISION)
    slab = N * R_PAD
    offs = tl.program_id(1) * slab + rn[:, None] * R_PAD + rj[None, :]
    tl.store(db_ptr + offs, acc_t, mask=rn[:, None] < N)
    if HAS_IG:
        tl.store(db_ptr + tl.num_programs(1) * slab + offs, acc_ig, mask=rn[:, None] < N)


# ---------------------------------------------------------------------------------------------
# Launch space: what the tuner can pick on a GPU (igu_kernels.audit compiles all of it)


def _configs(feature: str, tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_<feature>, num_warps, num_stages) tuples as triton configs."""
    return [
        triton.Config({"BLOCK_M": m, f"BLOCK_{feature}": f}, num_warps=w, num_stages=s)
        for m, f, w, s in tiles
    ]


def _space(feature: str, wide: list, fp32: list) -> dict[str, list[triton.Config]]:
    """16-bit activations take the ``wide`` tiles; fp32 (IEEE FFMA or tf32) the ``fp32`` ones."""
    return {"fp16": _configs(feature, wide), "bf16": _configs(feature, wide), "fp32": _configs(feature, fp32)}


# Tiles (BLOCK_M, BLOCK_<feature>, num_warps, num_stages) that compile without spills at every
# R_PAD on sm_90a and sm_80 (docs/kernels.md; tests/test_audit.py keeps it so). A tile never
# changes a result: the block of each kernel's reduction dim (the feature for down and grad_h,
# the rows for grad_a and grad_b; up and dx reduce over the rank in R_STEP slices) is the same in
# every tile of a dtype (REDUCTION_BLOCK; tested), so whichever tile wins, the sums are bitwise
# the same.
_DOWN_TILES = [(64, 64, 4, 3), (128, 64, 8, 3)]  # loop over the feature dim: down
_GRAD_H_TILES = [(64, 64, 8, 3), (32, 64, 4, 3)]  # and grad_h
_GEMM_FP32_TILES = [(32, 32, 4, 2), (64, 32, 8, 2)]
_RANK_TILES = [(64, 64, 4, 3), (128, 64, 8, 3)]  # the rank is the inner dim: up, dx
_RANK_FP32_TILES = [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2)]
_SPLIT_TILES = [(64, 64, 4, 3), (64, 128, 8, 3)]  # row reductions: grad_a, grad_b
_SPLIT_FP32_TILES = [(16, 32, 4, 2), (16, 64, 8, 2)]
# The interpreter runs one small configuration of every kernel unless a tuning timer is set
# (igu_kernels.tuning.timed_by): it is slow.
_INTERPRETER = {"BLOCK_M": 16}


def _tuned(kernel, feature: str, tiles: tuple, dtype_arg: str, flag: str | None = None, **kw) -> Tuned:
    """A kernel tuned over ``tiles`` (16-bit, fp32), keyed by its feature dim, flag and precision
    (and tuning's buckets of M and R_PAD)."""
    key = (feature, *([flag] if flag else []), "PRECISION")
    configs = _space(feature, *tiles)
    return Tuned(kernel, configs, key, dtype_arg, {**_INTERPRETER, f"BLOCK_{feature}": 32}, **kw)


_DOWN = _tuned(_down_kernel, "K", (_DOWN_TILES, _GEMM_FP32_TILES), "u_ptr")
_UP = _tuned(_up_kernel, "N", (_RANK_TILES, _RANK_FP32_TILES), "y_ptr", "HAS_BASE")
_GRAD_H = _tuned(_grad_h_kernel, "N", (_GRAD_H_TILES, _GEMM_FP32_TILES), "gy_ptr")
_DX = _tuned(_dx_kernel, "K", (_RANK_TILES, _RANK_FP32_TILES), "dx_ptr", "ACCUMULATE", scratch=("dx_ptr",))
_GRAD_A = _tuned(_grad_a_kernel, "K", (_SPLIT_TILES, _SPLIT_FP32_TILES), "u_ptr", "HAS_IG")
_GRAD_B = _tuned(_grad_b_kernel, "N", (_SPLIT_TILES, _SPLIT_FP32_TILES), "gy_ptr", "HAS_IG")
_E_TILE = [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)]  # fp32 rows only: one tile
_GRAD_E = Tuned(_grad_e_kernel, {"fp32": _E_TILE}, (), "g_ptr", {"BLOCK_M": 16})
TUNED = {t.name: t for t in (_DOWN, _UP, _GRAD_H, _DX, _GRAD_A, _GRAD_B, _GRAD_E)}
# The constexpr each kernel reduces over in blocks (None: the rank, in R_STEP slices).
REDUCTION_BLOCK = {
    "_down_kernel": "BLOCK_K",
    "_grad_h_kernel": "BLOCK_N",
    "_grad_a_kernel": "BLOCK_M",
    "_grad_b_kernel": "BLOCK_M",
    "_grad_e_kernel": "BLOCK_M",
    "_up_kernel": None,
    "_dx_kernel": None,
}

# The rest of the launch space, for igu_kernels.audit. Activations (u, gy, the base output, y,
# dx) arrive in the model's dtype; every other pointer is fp32.
ACTIVATION_DTYPES = ("fp32", "fp16", "bf16")
ACTIVATION_PTRS = ("u_ptr", "gy_ptr", "base_ptr", "y_ptr", "dx_ptr")
FLOAT_ARGS = ("scaling",)
GPU_CONSTEXPRS = {
    "R_PAD": (16, 32, 64),  # active ranks up to 64 rounded up to a power of two >= 16
    "HAS_IG": (False, True),
    "HAS_BASE": (False, True),
    "ACCUMULATE": (False, True),
    "PRECISION": {"fp32": ("ieee", "tf32"), "fp16": ("ieee",), "bf16": ("ieee",)},
}
MAX_RANK = 64  # larger active ranks run on the reference (no tile above is audited)
_WIDEST_FEATURE_TILE = max(f for _, f, _, _ in _SPLIT_TILES + _SPLIT_FP32_TILES)
_CHUNK_MULTIPLE = max(  # every row block of the kernels reducing over rows (powers of two)
    c.kwargs["BLOCK_M"]
    for name, tuned in TUNED.items()
    if REDUCTION_BLOCK[name] == "BLOCK_M"
    for configs in tuned.configs.values()
    for c in configs
)
_SPLIT_TARGET = {"gpu": (2, 256), "interpreter": (8, 32)}  # (programs per SM | in all, min rows)


def tf32_enabled() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use tf32: ``fp32_precision`` (torch >= 2.9; "none"
    defers to the global setting), else the legacy ``allow_tf32`` (reading it after the new API
    was used raises in new torch)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _precision(dtype: torch.dtype) -> str:
    if interpreting():
        return "emulate"
    return "tf32" if dtype == torch.float32 and tf32_enabled() else "ieee"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_chunks(M: int, features: int, device: torch.device) -> int:
    """Row chunks of the dA / dB reductions: enough programs to fill the device twice over at the
    widest feature tile, each chunk at least a few hundred rows (interpreter: small numbers, so
    the tests split too)."""
    if interpreting():
        programs, min_rows = _SPLIT_TARGET["interpreter"]
    else:
        per_sm, min_rows = _SPLIT_TARGET["gpu"]
        programs = per_sm * _sm_count(device)
    by_grid = triton.cdiv(programs, triton.cdiv(features, _WIDEST_FEATURE_TILE))
    return max(1, min(by_grid, triton.cdiv(M, min_rows)))


def chunk_rows(M: int, chunks: int) -> int:
    """Rows per chunk: the rows dealt evenly over ``chunks``, rounded up to a multiple of every
    tile's BLOCK_M (so no tile moves a chunk boundary)."""
    return triton.cdiv(triton.cdiv(M, _CHUNK_MULTIPLE), chunks) * _CHUNK_MULTIPLE


# ---------------------------------------------------------------------------------------------
# Launcher


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


class _Operands:
    """One adapter's factors as the kernels take them: fp32, contiguous, the rank padded with
    zeros to R_PAD (a power of two >= 16, tl.dot's minimum): ``A`` (R_PAD x K), ``E`` (R_PAD, the
    mask applied: E * m) and ``B`` (N x R_PAD).

    Masked ranks stay in place with E = 0, which zeroes their share of y, dA, dB and the IG of A
    and B; their dE is masked after the reduction. Gathering the active ranks instead would read
    the mask back (a host sync per adapter at every mask change), and saves little: R_PAD is at
    least 16 anyway, the kernels are memory-bound (the M x R_PAD row factors are a few percent of
    their traffic, docs/kernels.md), and compaction removes pruned ranks for good.

    Built at every forward in a few small ops (a pad per factor below R_PAD, none for fp32
    factors at R_PAD, and E * m): a cache keyed by the tensors' version counters would go stale,
    since fused AdamW and FSDP2's all-gather write the factors without bumping them.
    """

    def __init__(self, A: Tensor, E: Tensor, B: Tensor, mask: Tensor | None) -> None:
        self.r = A.shape[0]
        self.r_pad = _rank_pad(self.r)
        pad = self.r_pad - self.r
        self.mask = None if mask is None else mask.to(torch.float32)
        self.A = _padded(A, (0, 0, 0, pad))
        self.E = _padded(E if mask is None else E.detach() * self.mask, (0, pad))
        self.B = _padded(B, (0, pad))


def _padded(t: Tensor, pad: tuple[int, ...]) -> Tensor:
    """``t`` detached in fp32, contiguous, zero-padded by ``pad`` (itself when nothing changes)."""
    t = t.detach().float()
    return (F.pad(t, pad) if any(pad) else t).contiguous()


def _rows_of(t: Tensor, features: int) -> Tensor:
    """``t`` as (rows, features) with unit feature stride; a row stride of any size is kept."""
    t2 = t.reshape(-1, features)
    return t2 if t2.stride(1) == 1 or features == 1 else t2.contiguous()


class TritonLoraLinearFunction(torch.autograd.Function):
    """``base + delta`` with ``delta`` as in ``reference.BatchedIGLoraFunction`` (same row
    coefficients and IG buffers), computed by the kernels above in u's dtype.

    ``base`` is the base layer's output (M x N in u's dtype), or None: with ``weight`` given the
    base ``u W^T + b`` is computed here and the backward adds the adapter's du into the base's dx
    in place; with neither, the output is the delta alone.
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx, u, base, weight, bias, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers
    ):
        K, N = A.shape[1], B.shape[0]
        u2 = _rows_of(u, K)
        M = u2.shape[0]
        per_row = max(1, M // row_scale.shape[0])
        if weight is not None:
            base = F.linear(u2, weight, bias)
        base2 = None if base is None else _rows_of(base, N)
        y = torch.empty(M, N, device=u.device, dtype=u.dtype)
        operands = _Operands(A, E, B, mask)
        h = torch.empty(M, operands.r_pad, device=u.device, dtype=torch.float32)
        c = row_scale.to(torch.float32).contiguous()
        precision = _precision(u.dtype)
        if operands.r and M:
            src = y if base2 is None else base2
            with device_guard(u2.device):
                _DOWN[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
                    u2, operands.A, h, M, K, u2.stride(0), R_PAD=operands.r_pad, PRECISION=precision
                )
                _UP[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
                    h, operands.E, c, operands.B, src, y, M, N, per_row, src.stride(0), y.stride(0),
                    float(scaling), HAS_BASE=base2 is not None, R_PAD=operands.r_pad, PRECISION=precision,
                )  # fmt: skip
        elif base2 is None:
            y.zero_()
        else:
            y.copy_(base2)
        ctx.save_for_backward(u2, h, c, train_coef.to(torch.float32).contiguous(), A, E, B, weight)
        ctx.operands, ctx.scaling, ctx.per_row, ctx.precision = operands, float(scaling), per_row, precision
        ctx.in_shape, ctx.base_shape = u.shape, None if base is None else base.shape
        ctx.ig_coef = None if ig_buffers is None else ig_coef.to(torch.float32).contiguous()
        ctx.ig_buffers = ig_buffers
        return y.reshape(*u.shape[:-1], N)

    @staticmethod
    @autocast_off
    def backward(ctx, gy):
        u2, h, c, tc, A, E, B, weight = ctx.saved_tensors
        operands, M, N = ctx.operands, u2.shape[0], B.shape[0]
        has_ig, active = ctx.ig_buffers is not None, bool(operands.r and M)
        gy2 = _rows_of(gy.to(u2.dtype), N)
        d_base = gy.reshape(ctx.base_shape) if ctx.needs_input_grad[1] else None
        d_weight = gy2.t() @ u2 if ctx.needs_input_grad[2] else None
        d_bias = gy2.sum(0) if ctx.needs_input_grad[3] else None
        du = None
        if ctx.needs_input_grad[0] and weight is not None:
            du = gy2 @ weight
        elif ctx.needs_input_grad[0]:
            du = torch.empty_like(u2) if active else torch.zeros_like(u2)
        if active:
            ic = ctx.ig_coef if has_ig else tc
            with device_guard(u2.device):
                da, de, db = _backward_kernels(ctx, u2, gy2, h, c, tc, ic, du, weight is not None)
            r = operands.r
            dA, dB = da[0, :r].to(A.dtype), db[0, :, :r].to(B.dtype)
            dE = (de[0, :r] if operands.mask is None else de[0, :r] * operands.mask).to(E.dtype)
            if has_ig:  # operands.E is masked: so is the IG of E
                buf_a, buf_e, buf_b = ctx.ig_buffers
                buf_a += (operands.A[:r] * da[1, :r]).to(buf_a.dtype)
                buf_e += (operands.E[:r] * de[1, :r]).to(buf_e.dtype)
                buf_b += (operands.B[:, :r] * db[1, :, :r]).to(buf_b.dtype)
        else:
            dA, dE, dB = torch.zeros_like(A), torch.zeros_like(E), torch.zeros_like(B)
        du = None if du is None else du.reshape(ctx.in_shape)
        return du, d_base, d_weight, d_bias, dA, dE, dB, None, None, None, None, None, None


def _backward_kernels(ctx, u2, gy2, h, c, tc, ic, du, accumulate: bool):
    """g, then du (in place) and the chunked row reductions; returns (dA, dE, dB) sums per
    coefficient set (training, IG), chunks added in a fixed order (deterministic)."""
    operands, s, per_row, precision = ctx.operands, ctx.scaling, ctx.per_row, ctx.precision
    (M, K), N, r_pad = u2.shape, gy2.shape[1], operands.r_pad
    has_ig = ctx.ig_buffers is not None
    f32 = {"device": u2.device, "dtype": torch.float32}
    g = torch.empty(M, r_pad, **f32)
    _GRAD_H[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
        gy2, operands.B, c, g, M, N, per_row, gy2.stride(0), s, R_PAD=r_pad, PRECISION=precision
    )
    if du is not None:
        _DX[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))](
            g, operands.E, operands.A, du, M, K, du.stride(0), ACCUMULATE=accumulate, R_PAD=r_pad,
            PRECISION=precision,
        )  # fmt: skip
    sets = 2 if has_ig else 1
    chunks_a, chunks_b = row_chunks(M, K, u2.device), row_chunks(M, N, u2.device)
    da = torch.empty(sets, chunks_a, r_pad, K, **f32)
    _GRAD_A[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), chunks_a)](
        u2, g, operands.E, tc, ic, da, M, K, per_row, u2.stride(0), chunk_rows(M, chunks_a),
        HAS_IG=has_ig, R_PAD=r_pad, PRECISION=precision,
    )  # fmt: skip
    chunks_e = row_chunks(M, r_pad, u2.device)
    de = torch.empty(sets, chunks_e, r_pad, **f32)
    _GRAD_E[lambda meta: (chunks_e,)](
        g, h, tc, ic, de, M, per_row, chunk_rows(M, chunks_e), HAS_IG=has_ig, R_PAD=r_pad
    )
    db = torch.empty(sets, chunks_b, N, r_pad, **f32)
    _GRAD_B[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), chunks_b)](
        gy2, h, operands.E, c, tc, ic, db, M, N, per_row, gy2.stride(0), chunk_rows(M, chunks_b),
        HAS_IG=has_ig, R_PAD=r_pad, PRECISION=precision,
    )  # fmt: skip
    return da.sum(1), de.sum(1), db.sum(1) * s


def adapted_linear(
    u, base, A, E, B, mask, scaling, *, scale=1.0, plan=None, ig_buffers=None, weight=None, bias=None
):
    """``base + s * ((u A^T) * (E m) * c) B^T`` in the base's dtype (see igu_kernels.dispatch).

    The products run in the dtype of the output: the base's, or under autocast with ``weight``
    the autocast dtype, as ``F.linear`` would; ``plan`` = (row_scale, train_coef, ig_coef) per
    row of ``u`` (dim 0), or None for one node of scale ``scale`` (c = scale for every token).
    """
    if base is not None:
        dtype = base.dtype
    elif torch.is_autocast_enabled(u.device.type):
        dtype = torch.get_autocast_dtype(u.device.type)
    else:
        dtype = u.dtype
    if weight is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    shape, u = u.shape, u.to(dtype)
    if plan is None:
        ones = torch.ones(1, device=u.device, dtype=torch.float32)
        u, plan = u.reshape(1, -1, shape[-1]), (ones * scale, ones, ones)
    y = TritonLoraLinearFunction.apply(u, base, weight, bias, A, E, B, mask, scaling, *plan, ig_buffers)
    return y.reshape(*shape[:-1], B.shape[0])


def lora_delta(x, A, E, B, mask, scaling, scale=1.0):
    """The delta alone (in x's dtype) of one node of scale ``scale``."""
    return adapted_linear(x, None, A, E, B, mask, scaling, scale=scale)


def batched_ig_lora_delta(u, A, E, B, mask, scaling, row_scale, train_coef, ig_coef, ig_buffers):
    """The delta alone (in u's dtype) on a batched IG plan."""
    plan = (row_scale, train_coef, ig_coef)
    return adapted_linear(u, None, A, E, B, mask, scaling, plan=plan, ig_buffers=ig_buffers)
