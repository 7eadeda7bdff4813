"""Correctness of the fused low-rank linear on a GPU at LLM shapes, every kernel through every tile.

    python -m bench.gpu_correctness --matrix p1 --json p1.json      # P1, bf16: the first answer
    python -m bench.gpu_correctness --matrix full --json full.json  # LLM shapes, bf16 and fp16
    TRITON_INTERPRET=1 python -m bench.gpu_correctness --tiny ...   # the same on a CPU, tiny shapes

A check runs one forward + backward of ``adapted_linear`` three times from the same inputs: the
Triton op (fp32 factors), the eager reference in the activation dtype (eager 16-bit LoRA) and the
reference in fp64, and holds every output (y, du, dA, dE, dB and the IG buffers) to
FlashAttention's rule, as tests/test_kernel_lora_linear.py does: the kernel's max error against
fp64 is at most twice eager's plus a floor of a quarter of the dtype's epsilon at the result's
scale. The op runs as IGULoraLinear runs it on a GPU: the frozen base weight given (the op runs
the base GEMM and adds du into its dx), half the ranks masked (or none, so that R_PAD = 64 is
reached), on a batched IG plan (2 training rows and 2 IG nodes) or as a plain training step.
Each check makes one configuration of every kernel win its tuning (``tuning.favouring``).

The ``full`` matrix checks each (dtype, form, rank) case under every tile, the shapes (8k and 32k
tokens, 4096 and 14336 features both ways) dealt round-robin over the cases; ``p1`` checks P1 at bf16 in both
forms and every tile. The JSON file is rewritten after every check (a time limit keeps what ran);
the exit status is 1 if a check failed. Checks of one case (shape, rank, dtype, form) under
different tiles must agree bitwise (no tile changes a sum, docs/kernels.md): the kernel outputs'
SHA-256 is recorded per check and compared per case (``tile_invariant``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.case import IG_PLAN, SEQUENCES, Linear
from bench.record import meta
from igu_kernels import lora_linear, reference, tuning
from igulora.io import write_json

BF16, FP16 = torch.bfloat16, torch.float16
LLM_SHAPES = (  # (tokens, in, out)
    (8192, 4096, 4096),
    (32768, 14336, 4096),
    (8192, 4096, 14336),
    (32768, 4096, 4096),
    (8192, 14336, 4096),
    (32768, 4096, 14336),
)
TINY_SHAPES = ((64, 48, 40), (96, 40, 72))  # the interpreter (the dry run): seconds
RANKS = ((8, True), (16, True), (64, True), (64, False))  # (r, half masked): R_PAD 16, 16, 32, 64
SCALING = 2.0


@dataclass(frozen=True)
class Check:
    linear: Linear
    ig: bool  # on a batched IG plan, else a plain training step
    tile: int  # the configuration index every kernel is made to pick

    @property
    def label(self) -> str:
        lin = self.linear
        ranks = f"r{lin.active}/{lin.rank}" if lin.masked else f"r{lin.rank}"
        dtype = str(lin.dtype).removeprefix("torch.")
        form = "ig" if self.ig else "plain"
        return f"{lin.tokens}x{lin.d_in}>{lin.d_out} {ranks} {dtype} {form} tile{self.tile}"


def tiles(dtype: torch.dtype) -> int:
    """Configurations of the kernel that has most for ``dtype``: forcing index i for i below it
    (modulo each kernel's count) runs every configuration of every kernel."""
    name = tuning.DTYPE_NAMES[dtype]
    return max(len(t.configs_for(name)) for t in lora_linear.TUNED.values())


def matrix(name: str, tiny: bool) -> list[Check]:
    """The checks of ``name`` (p1 or full); ``tiny``: small shapes, and fp16 only (the
    interpreter's fp32 -> bf16 cast truncates: bf16 is held to the references on a GPU)."""
    shapes = TINY_SHAPES if tiny else LLM_SHAPES
    if name == "p1":
        shapes, ranks, dtypes = shapes[:1], ((16, True),), (BF16,)
    else:
        ranks, dtypes = RANKS, (BF16, FP16)
    if tiny:
        dtypes = (FP16,)
    cases = [(dtype, ig, rank, masked) for dtype in dtypes for ig in (True, False) for rank, masked in ranks]
    checks: list[Check] = []
    for i, (dtype, ig, rank, masked) in enumerate(cases):
        linear = Linear(*shapes[i % len(shapes)], rank, dtype, masked)  # every tile of a case: one shape
        checks.extend(Check(linear, ig, tile) for tile in range(tiles(dtype)))
    return checks


def _inputs(check: Check, device: torch.device) -> dict:
    """Activations in the check's dtype, fp32 factors; magnitudes of a trained layer (base and
    delta of the same order)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    lin = check.linear
    M, K, N, r = lin.tokens, lin.d_in, lin.d_out, lin.rank
    return {
        "u": rand(SEQUENCES, M // SEQUENCES, K).to(lin.dtype),
        "weight": rand(N, K, scale=K**-0.5).to(lin.dtype),
        "gy": rand(SEQUENCES, M // SEQUENCES, N).to(lin.dtype),
        "params": (rand(r, K, scale=K**-0.5), rand(r), rand(N, r, scale=r**-0.5)),
        "mask": lin.mask(device),
        "plan": tuple(torch.tensor(v, device=device) for v in IG_PLAN) if check.ig else None,
    }


def forward_backward(impl, inputs: dict, check: Check, exact: bool) -> dict[str, torch.Tensor]:
    """y, du, dA, dE, dB (and the IG buffers) of ``impl.adapted_linear``: in the check's dtype
    with fp32 factors, or everything in fp64 (``exact``); the eager reference of the dtype is
    ``reference`` with ``precision``."""
    dtype = check.linear.dtype
    act = torch.float64 if exact else dtype
    param = torch.float64 if exact else torch.float32
    u = inputs["u"].to(act, copy=True).requires_grad_()
    A, E, B = (p.to(param, copy=True).requires_grad_() for p in inputs["params"])
    plan = None if inputs["plan"] is None else tuple(v.to(param) for v in inputs["plan"])
    buffers = None if plan is None else tuple(torch.zeros_like(p) for p in (A, E, B))
    precision = {"precision": dtype} if impl is reference and not exact else {}
    y = impl.adapted_linear(
        u, None, A, E, B, inputs["mask"], SCALING, plan=plan, ig_buffers=buffers,
        weight=inputs["weight"].to(act), **precision,
    )  # fmt: skip
    y.backward(inputs["gy"].to(act))
    out = {"y": y, "du": u.grad, "dA": A.grad, "dE": E.grad, "dB": B.grad}
    out |= dict(zip(("ig_A", "ig_E", "ig_B"), buffers or ()))
    return {k: v.detach() for k, v in out.items()}


def _max_abs(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 1 << 26) -> float:
    """max |a - b| (or |a|) in fp64, a chunk of elements at a time (a 32k x 14336 output in fp64
    is 3.8 GB; its difference another)."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    parts = (
        (a[i : i + chunk].double() - (0 if b is None else b[i : i + chunk].double())).abs().max()
        for i in range(0, a.numel(), chunk)
    )
    return max((float(p) for p in parts), default=0.0)


def three_way(kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, floor: float) -> dict:
    """FlashAttention's rule, as tests/conftest.py's ``assert_three_way`` applies it, as a record:
    ``ratio`` is the kernel's error over its bound (at most 1 to pass)."""
    if kernel.shape != exact.shape:
        raise ValueError(f"kernel output of shape {tuple(kernel.shape)}, expected {tuple(exact.shape)}")
    kernel_err, eager_err = _max_abs(kernel, exact), _max_abs(eager, exact)
    atol = floor * max(1.0, _max_abs(exact))
    ratio = kernel_err / (2 * eager_err + atol)
    return {"kernel_err": kernel_err, "eager_err": eager_err, "atol": atol, "ratio": ratio, "ok": ratio <= 1}


def digest(outputs: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the outputs' bytes: equal digests, bitwise equal outputs."""
    sha = hashlib.sha256()
    for name in sorted(outputs):
        sha.update(outputs[name].detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return sha.hexdigest()


def tile_invariance(records: list[dict]) -> dict[str, bool]:
    """Per case checked under more than one tile: whether every tile gave the same bytes."""
    by_case: dict[str, list[str]] = {}
    for r in records:
        if "digest" in r:
            by_case.setdefault(r["label"].rsplit(" tile", 1)[0], []).append(r["digest"])
    return {case: len(set(d)) == 1 for case, d in by_case.items() if len(d) > 1}


def run_check(check: Check, device: torch.device) -> dict:
    inputs = _inputs(check, device)
    with tuning.timed_by(tuning.favouring(check.tile)):
        kernel = forward_backward(lora_linear, inputs, check, exact=False)
        forced = {
            n: [tuning.config_record(c) for c in dict.fromkeys(t.chosen().values())]
            for n, t in lora_linear.TUNED.items()
        }
    eager = forward_backward(reference, inputs, check, exact=False)
    exact = forward_backward(reference, inputs, check, exact=True)
    floor = torch.finfo(check.linear.dtype).eps / 4
    outputs = {k: three_way(kernel[k], eager[k], exact[k], floor) for k in exact}
    worst = max(o["ratio"] for o in outputs.values())
    return {
        "ok": worst <= 1,
        "worst_ratio": worst,
        "outputs": outputs,
        "configs": forced,
        "digest": digest(kernel),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--matrix", choices=["p1", "full"], default="full")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes and fp16 (the interpreter's dry run)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    checks = matrix(args.matrix, args.tiny)
    command = " ".join(["python -m bench.gpu_correctness", *(argv if argv is not None else sys.argv[1:])])
    data = {"meta": meta(command, device), "planned": [c.label for c in checks], "checks": [], "failed": []}
    for check in checks:
        start = time.perf_counter()
        try:
            result = run_check(check, device)
        except Exception as error:  # an out-of-memory or a compile error: recorded, the next check runs
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lin = check.linear
        form = {"dtype": str(lin.dtype), "masked": lin.masked, "ig": check.ig, "tile": check.tile}
        record = {"label": check.label, **lin.shape, **form, **result}
        record["seconds"] = round(time.perf_counter() - start, 2)
        data["checks"].append(record)
        data["tile_invariant"] = tile_invariance(data["checks"])
        data["failed"] = [c["label"] for c in data["checks"] if not c["ok"]]
        data["failed"] += [
            f"{case}: tiles differ" for case, same in data["tile_invariant"].items() if not same
        ]
        write_json(args.json, data)
        status = "ok" if result["ok"] else f"FAILED {result.get('error', '')}"
        worst = f"worst kernel error / bound {result['worst_ratio']:.2f}" if "worst_ratio" in result else ""
        print(f"{check.label:<44} {status}  {worst}  {record['seconds']:.1f} s", flush=True)
    print(f"{len(data['checks']) - len(data['failed'])} of {len(checks)} checks passed")
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
