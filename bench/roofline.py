"""Speed of light: the bytes an op or kernel must move and the FLOPs it must do, on modelled GPUs.

``time = max(bytes / bandwidth, flops / peak)`` on a device; a measured time's roofline fraction
is that time over the measurement (issue #15's goal: at least 0.7 per kernel on the GPU).

Devices, picked by the CUDA device name (an unmatched name gets no fraction):

- H100 SXM (``H100 80GB HBM3``): 3.35 TB/s HBM3, 989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32
  (non-tensor), NVIDIA's H100 datasheet (SXM5);
- H100 PCIe: 2.0 TB/s, 756 TFLOP/s dense bf16/fp16, 51 TFLOP/s fp32, the same datasheet (PCIe);
- H200: 4.3 TB/s (copy) and 790 TFLOP/s bf16 dense, the figures issue #15 gives as measured on
  it (its datasheet says 4.8 TB/s and 989 TFLOP/s), 67 TFLOP/s fp32;
- A100 80GB SXM: 2.0 TB/s, 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32, datasheet.

fp32 products run at the non-tensor fp32 rate: the kernels use IEEE fp32 dots unless tf32 is on.

Two models of the low-rank linear on ``M`` tokens, ``K`` in and ``N`` out features, rank ``r``
(the active ranks: masked ones cost the kernels nothing), weights frozen:

- ``low_rank_work``, the minimum of the op whatever computes it: the base GEMM ``x W^T`` and its
  ``dx`` (``4 M K N``), the low-rank products forward and back, ``2 M r (K + N)`` per product pair
  (3 pairs; the batched IG op's second row reduction of dA, dB makes 4); ``x`` and ``W`` read and
  ``y`` written forward, ``dy``, ``W`` and ``x`` read and ``dx`` written backward.
- ``kernel_work``, per kernel of ``igu_kernels.lora_linear`` as its loads and stores are written:
  every tensor a kernel reads or writes crosses DRAM once (the small operands every program
  reads again, ``Ac``, ``Bc``, ``Ec`` and the per-row vectors, are served by L2 and count once;
  the per-row vectors are left out); FLOPs are the tensor-core products at the padded rank.

``python -m bench.roofline --traffic`` prints the per-kernel table of docs/kernels.md.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.case import P1

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Device:
    pattern: str  # searched in the CUDA device name
    bandwidth: float  # bytes / s
    peak: dict[torch.dtype, float]  # FLOP / s of dense products
    source: str


def _peaks(tensor: float, fp32: float) -> dict[torch.dtype, float]:
    return {BF16: tensor, FP16: tensor, FP32: fp32}


DEVICES = {
    "H100 SXM": Device(r"H100.*(SXM|HBM3)", 3.35e12, _peaks(989e12, 67e12), "H100 datasheet, SXM5"),
    "H100 PCIe": Device(r"H100.*PCIe", 2.0e12, _peaks(756e12, 51e12), "H100 datasheet, PCIe"),
    "H200": Device(r"H200(?!.*NVL)", 4.3e12, _peaks(790e12, 67e12), "issue #15, measured; fp32 datasheet"),
    "A100": Device(r"A100", 2.0e12, _peaks(312e12, 19.5e12), "A100 80GB datasheet, SXM"),
}
TABLE_DEVICES = ("H100 SXM", "H200")  # the columns of the tables
LOW_RANK_OPS = ("plain_lora", "lora_linear_ig")
# lora_linear.row_chunks at P1 on 132 SMs (H100 SXM, H200), per reduced width: tested.
P1_CHUNKS = {4096: 9, 16: 32}


@dataclass(frozen=True)
class Work:
    bytes: float
    flops: float

    def seconds(self, device: Device, dtype: torch.dtype) -> float:
        return max(self.bytes / device.bandwidth, self.flops / device.peak[dtype])

    def __add__(self, other: Work) -> Work:
        return Work(self.bytes + other.bytes, self.flops + other.flops)


def _size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def low_rank_work(op: str, backend: str, shape: dict[str, int], dtype: torch.dtype) -> Work:
    M, K, N, r = shape["tokens"], shape["in"], shape["out"], shape.get("active", shape["r"])
    size = _size(dtype)
    base = Work(size * (3 * M * K + 2 * M * N + 2 * K * N), 4 * M * K * N)
    if backend == "base_gemm":
        return Work(size * (2 * M * K + 2 * M * N + 2 * K * N), 4 * M * K * N)
    product_pairs = 4 if op == "lora_linear_ig" else 3  # forward, dx path, dA/dB (+ IG dA/dB)
    adapters = 4 * 4 * r * (K + N + 1)  # A, E, B read, gradients written (fp32; with IG: +buffers)
    return Work(base.bytes + adapters, base.flops + product_pairs * 2 * M * r * (K + N))


def rank_pad(active: int) -> int:
    """The kernels' rank: the active ranks rounded up to a power of two, at least 16."""
    return max(16, 1 << (active - 1).bit_length())


def kernel_work(shape: dict[str, int], dtype: torch.dtype, *, ig: bool, chunks: Callable[[int], int]) -> dict:
    """{kernel: Work} of one forward + backward of the fused op with the base weight given (the op
    runs the base GEMMs), in launch order. ``ig``: on a batched IG plan (two coefficient sets);
    ``chunks(features)``: the row chunks of a reduction over that many features
    (``lora_linear.row_chunks``)."""
    M, K, N = shape["tokens"], shape["in"], shape["out"]
    R, a, f = rank_pad(shape.get("active", shape["r"])), _size(dtype), 4
    sets = 2 if ig else 1
    u, y = a * M * K, a * M * N  # one pass over u (or dx) and over y (or the base output, gy)
    hg = f * M * R  # h or g, fp32
    partials = {  # fp32 partial sums per row chunk of dA, dE and dB
        "a": f * sets * chunks(K) * R * K,
        "e": f * sets * chunks(R) * R,
        "b": f * sets * chunks(N) * N * R,
    }
    gemm = Work(u + a * N * K + y, 2 * M * K * N)
    return {
        "base forward (cuBLAS)": gemm,  # u, W -> base
        "_down_kernel": Work(u + f * R * K + hg, 2 * M * K * R),  # u, Ac -> h
        "_up_kernel": Work(hg + f * N * R + 2 * y, 2 * M * N * R),  # h, Bc, base -> y
        "base dx (cuBLAS)": gemm,  # gy, W -> dx
        "_grad_h_kernel": Work(y + f * N * R + hg, 2 * M * N * R),  # gy, Bc -> g
        "_dx_kernel": Work(hg + f * R * K + 2 * u, 2 * M * K * R),  # g, Ac, dx -> dx
        "_grad_a_kernel": Work(u + hg + partials["a"], sets * 2 * M * K * R),  # u, g -> dA partials
        "_grad_e_kernel": Work(2 * hg + partials["e"], 0),  # g, h -> dE partials (no product)
        "_grad_b_kernel": Work(y + hg + partials["b"], sets * 2 * M * N * R),  # gy, h -> dB partials
        "chunk sums (torch)": Work(sum(partials.values()) + f * sets * R * (K + N + 1), 0),
    }


def work(record: dict) -> Work | None:
    """The minimum work of one benchmark record's op, or None for whole-model cases."""
    op, shape = record["op"], record["shape"]
    if op in LOW_RANK_OPS:
        return low_rank_work(op, record["backend"], shape, getattr(torch, record["dtype"]))
    if op in ("score_update", "copy", "triplet_scores"):
        return Work(record["bytes_moved"], 0)
    return None


def device_key(name: str) -> str | None:
    """The modelled device a CUDA device name is (None: no model for it)."""
    return next((key for key, device in DEVICES.items() if re.search(device.pattern, name)), None)


def annotate(record: dict) -> None:
    """Add the op's speed of light on each modelled device and, on one of them, the fraction
    of it the measured median reaches."""
    needed = work(record)
    if needed is None:
        return
    dtype = getattr(torch, record["dtype"])
    record["sol_us"] = {name: 1e6 * needed.seconds(device, dtype) for name, device in DEVICES.items()}
    here = device_key(record["device"])
    if here and record["median_ms"]:
        record["roofline_fraction"] = record["sol_us"][here] / (1e3 * record["median_ms"])


def annotate_kernels(record: dict, chunks: Callable[[int], int]) -> None:
    """On a modelled device: each profiled kernel's (``kernel_us``) model time and the fraction of
    it the kernel reaches."""
    here = device_key(record["device"])
    if here is None or record["op"] not in LOW_RANK_OPS or not record.get("kernel_us"):
        return
    dtype = getattr(torch, record["dtype"])
    model = kernel_work(record["shape"], dtype, ig=record["op"] == "lora_linear_ig", chunks=chunks)
    record["kernel_roofline"] = {
        name: 1e6 * model[name].seconds(DEVICES[here], dtype) / us
        for name, us in record["kernel_us"].items()
        if name in model
    }


def _us(w: Work, dtype: torch.dtype) -> list[float]:
    return [1e6 * w.seconds(DEVICES[d], dtype) for d in TABLE_DEVICES]


def _row(step: str, name: str, w: Work, times: list[float], bound: str = "") -> str:
    gflop, intensity = (f"{w.flops / 1e9:.2f}", f"{w.flops / w.bytes:.0f}") if w.flops else ("", "")
    cols = " | ".join(f"{t:.1f}" for t in times)
    return f"| {step} | {name} | {w.bytes / 1e6:.1f} | {gflop} | {intensity} | {cols} | {bound} |"


def _kernel_row(step: str, name: str, w: Work, dtype: torch.dtype) -> str:
    device = DEVICES[TABLE_DEVICES[0]]
    bound = "memory" if w.bytes / device.bandwidth >= w.flops / device.peak[dtype] else "compute"
    return _row(step, f"`{name}`" if name.startswith("_") else name, w, _us(w, dtype), bound)


def traffic_table() -> str:
    """The per-kernel model at P1 (8192 tokens, 4096 x 4096, r 16, bf16) as a markdown table: a
    training step's kernels with the totals, what a batched IG step changes, and the score
    kernels (30M elements: an r = 12 adapter on every linear of a 7B Llama)."""
    heads = " | ".join(f"{d} us" for d in TABLE_DEVICES)
    lines = [
        f"| step | kernel | MB moved | GFLOP | FLOP/B | {heads} | bound on {TABLE_DEVICES[0]} |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in TABLE_DEVICES) + " | --- |",
    ]
    chunks = P1_CHUNKS.__getitem__
    train = kernel_work(P1.shape, P1.dtype, ig=False, chunks=chunks)
    for step, ig in (("training", False), ("IG", True)):
        kernels = kernel_work(P1.shape, P1.dtype, ig=ig, chunks=chunks)
        lines += [_kernel_row(step, n, w, P1.dtype) for n, w in kernels.items() if not ig or w != train[n]]
        totals = {}
        for name, part in (("base GEMMs", True), ("adapter kernels", False), ("op", None)):
            works = [w for n, w in kernels.items() if part is None or ("cuBLAS" in n) == part]
            totals[name] = [sum(col) for col in zip(*(_us(w, P1.dtype) for w in works))]
            lines.append(_row(step, f"**{name}**", sum(works, Work(0, 0)), totals[name]))
        ratio = " | ".join(f"{op / base:.2f}" for op, base in zip(totals["op"], totals["base GEMMs"]))
        lines.append(f"| {step} | **op / base GEMMs** | | | | {ratio} | |")
    n = 30_000_000
    lines.append(_kernel_row("scoring", f"_score_update_kernel ({n // 10**6}M)", Work(24 * n, 0), FP32))
    lines.append(
        _kernel_row("scoring", "_triplet_kernel (r 12, 4096 x 4096)", Work(4 * 12 * (2 * 4096 + 2), 0), FP32)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traffic", action="store_true", help="print the per-kernel table at P1")
    args = parser.parse_args(argv)
    if args.traffic:
        print(traffic_table())
    else:
        for name, d in DEVICES.items():
            print(
                f"{name}: {d.bandwidth / 1e12:.2f} TB/s, {d.peak[BF16] / 1e12:.0f} TFLOP/s bf16 ({d.source})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
