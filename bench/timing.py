"""Median wall-clock timing with device synchronisation.

Backends of one case are timed interleaved (one iteration of each in turn, ``repeats`` rounds),
so a slow spell of a shared machine hits all of them alike instead of one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 7) -> float:
    return interleaved_median_ms({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2, repeats: int = 7
) -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}
