"""The compile audit: every Triton kernel compiled for sm_90a and sm_80 on this CPU machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
    pytest.skip("this triton wheel has no NVIDIA backend tools (cuobjdump)", allow_module_level=True)
ENV = {**os.environ, "TRITON_INTERPRET": "0"}  # the interpreter replaces the kernels


def _python(code_or_args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("audit") / "sass.json"
    _python(["-m", "igu_kernels.audit", "--arch", "sm_90a", "--arch", "sm_80", "--json", str(path)])
    return json.loads(path.read_text())


def test_every_kernel_in_the_source_is_audited_on_every_arch(records):
    in_source = {
        f"{path.stem}.{name}"
        for path in (ROOT / "igu_kernels").glob("*.py")
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text())
    }
    assert in_source  # the pattern finds the kernels
    for arch in ("sm_90a", "sm_80"):
        assert {r["kernel"] for r in records if r["arch"] == arch} == in_source


def test_records_are_complete_and_fit_the_arch(records):
    from igu_kernels.audit import SHARED_LIMIT

    fields = {"kernel", "arch", "dtype", "signature", "constexprs", "num_warps", "num_stages"}
    fields |= {"regs", "shared_bytes", "spill_ops", "tensor_core_ops"}
    for r in records:
        assert set(r) == fields
        assert 0 < r["regs"] <= 255 and r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
    dtypes = {r["dtype"] for r in records if r["kernel"] == "lora_linear._down_kernel"}
    assert dtypes == {"fp32", "fp16", "bf16"}


def test_a_record_recompiles_to_the_same_resources(records):
    record = max(records, key=lambda r: r["spill_ops"])
    code = (
        "import json, sys, importlib\n"
        "from igu_kernels import audit\n"
        "r = json.loads(sys.argv[1])\n"
        "module_name, name = r['kernel'].split('.')\n"
        "m = importlib.import_module('igu_kernels.' + module_name)\n"
        "launch = {k: r[k] for k in ('num_warps', 'num_stages')}\n"
        "args = (r['arch'], r['dtype'], r['signature'], r['constexprs'], launch)\n"
        "print(json.dumps(audit.compile_record(m, name, getattr(m, name), *args)))\n"
    )
    again = json.loads(_python(["-c", code, json.dumps(record)]).splitlines()[-1])
    assert again == record


def test_no_kernel_spills(records):
    assert [r for r in records if r["spill_ops"]] == []


def test_gemm_kernels_use_tensor_cores_on_16_bit_inputs(records):
    gemms = [r for r in records if r["kernel"].startswith("lora_linear.") and r["dtype"] != "fp32"]
    assert gemms and all(r["tensor_core_ops"] > 0 for r in gemms)


def test_every_configuration_the_tuner_can_pick_is_audited(records):
    from igu_kernels import lora_linear

    audited = {
        (
            r["kernel"],
            r["arch"],
            r["dtype"],
            r["num_warps"],
            r["num_stages"],
            *sorted(r["constexprs"].items()),
        )
        for r in records
    }
    for name, tuned in lora_linear.TUNED.items():
        for dtype in lora_linear.ACTIVATION_DTYPES:
            for config in tuned.configs_for(dtype):
                for arch in ("sm_90a", "sm_80"):
                    hits = [
                        a for a in audited
                        if a[:5] == (f"lora_linear.{name}", arch, dtype, config.num_warps, config.num_stages)
                        and set(config.kwargs.items()) <= set(a[5:])
                    ]  # fmt: skip
                    assert hits, (name, dtype, config, arch)


def test_the_device_report_reads_compiled_kernels_only():
    """On a GPU bench/run.py stores the driver's register and spill counts of every kernel it
    ran; here nothing was launched, so the report is empty (and the code path runs)."""
    out = _python(["-c", "from igu_kernels.audit import launched; print(launched())"])
    assert out.strip().splitlines()[-1] == "[]"
