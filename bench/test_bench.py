"""pytest-benchmark view of the same cases: ``pytest bench/ --benchmark-only``.

Cases are grouped per op, so kernel and eager of one op sit side by side. The preset follows
the device (``IGULORA_BENCH_PRESET`` overrides it: cpu, p1, gpu or tiny).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.case import PRESETS
from bench.cases import all_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = PRESETS[os.environ.get("IGULORA_BENCH_PRESET", "gpu" if DEVICE.type == "cuda" else "cpu")]
CASES = [(case, backend) for case in all_cases(PRESET, DEVICE) for backend in case.backends]


@pytest.mark.parametrize("case, backend", CASES, ids=[f"{c.op}-{b}" for c, b in CASES])
def test_benchmark(benchmark, case, backend):
    benchmark.group = f"{case.op} {case.label}"
    run = case.backends[backend]()
    benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)
