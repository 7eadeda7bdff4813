"""What every results file of bench/ carries: the device and the versions. Files are written
with ``igulora.io.write_json`` (atomic: a run stopped by a time limit leaves the last complete
file, never half of one)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def meta(command: str, device: torch.device, **extra) -> dict:
    return {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        **extra,
    }
