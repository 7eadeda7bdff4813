"""Speed of light per benchmark case: the bytes an op must move and the FLOPs it must do.

``time = max(bytes / bandwidth, flops / peak)`` on a device; a kernel's roofline fraction is that
time over its measured median (the goal of issue #15: at least 0.7 per kernel on the GPU).

Devices: the H200 at 4.3 TB/s (copy) and 790 TFLOP/s bf16 dense, the figures issue #15 gives as
measured for it; the A100 80GB SXM at 2.0 TB/s and 312 TFLOP/s bf16 dense, datasheet figures.
fp32 products run at the devices' non-tensor fp32 rate (67 and 19.5 TFLOP/s): the kernels use
IEEE fp32 dots, not tf32.

The work is the minimum of the op, not of an implementation: for the low-rank linear on
``M`` tokens, ``K`` in and ``N`` out features, rank ``r``, the frozen base GEMM ``x W^T`` and its
``dx`` (``4 M K N``), the two low-rank products forward and back, and for the batched IG op one
more pair of row reductions (``dA``, ``dB`` with the IG coefficients): ``2 M r (K + N)`` per
product pair. Bytes: ``x`` and ``W`` read and ``y`` written forward; ``dy``, ``W`` and ``x`` read
and ``dx`` written backward, in the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    bandwidth: float  # bytes / s
    peak: dict[torch.dtype, float]  # FLOP / s of dense products


DEVICES = {
    "H200": Device(4.3e12, {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 67e12}),
    "A100": Device(2.0e12, {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
}


@dataclass(frozen=True)
class Work:
    bytes: float
    flops: float

    def seconds(self, device: Device, dtype: torch.dtype) -> float:
        return max(self.bytes / device.bandwidth, self.flops / device.peak[dtype])


def low_rank_work(op: str, backend: str, shape: dict[str, int], dtype: torch.dtype) -> Work:
    M, K, N, r = shape["tokens"], shape["in"], shape["out"], shape["r"]
    size = torch.tensor([], dtype=dtype).element_size()
    base = Work(size * (3 * M * K + 2 * M * N + 2 * K * N), 4 * M * K * N)
    if backend == "base_gemm":
        return Work(size * (2 * M * K + 2 * M * N + 2 * K * N), 4 * M * K * N)
    product_pairs = 4 if op == "lora_linear_ig" else 3  # forward, dx path, dA/dB (+ IG dA/dB)
    adapters = 4 * 4 * r * (K + N + 1)  # A, E, B read, gradients written (fp32; with IG: +buffers)
    return Work(base.bytes + adapters, base.flops + product_pairs * 2 * M * r * (K + N))


def work(record: dict) -> Work | None:
    """The minimum work of one benchmark record's op, or None for whole-model cases."""
    op, shape = record["op"], record["shape"]
    dtype = getattr(torch, record["dtype"])
    if op in ("plain_lora", "lora_linear_ig"):
        return low_rank_work(op, record["backend"], shape, dtype)
    if op in ("score_update", "copy", "triplet_scores"):
        return Work(record["bytes_moved"], 0)
    return None


def device_model(name: str) -> Device | None:
    """The roofline device matching a CUDA device name (None: no model for it)."""
    return next((device for key, device in DEVICES.items() if key in name), None)


def annotate(record: dict) -> None:
    """Add the op's speed of light on each modelled device and, on one of them, the fraction
    of it the measured median reaches."""
    needed = work(record)
    if needed is None:
        return
    dtype = getattr(torch, record["dtype"])
    record["sol_us"] = {name: 1e6 * needed.seconds(device, dtype) for name, device in DEVICES.items()}
    here = next((name for name in DEVICES if name in record["device"]), None)
    if here and record["median_ms"]:
        record["roofline_fraction"] = record["sol_us"][here] / (1e3 * record["median_ms"])
