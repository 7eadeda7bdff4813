"""Compile every Triton kernel of igu_kernels for a GPU, without one, and read its SASS.

    python -m igu_kernels.audit --arch sm_90a --arch sm_80 --json PATH

For each ``@triton.jit`` kernel (a jitted function named ``*_kernel``; the others are device
helpers), each dtype it accepts and each launch configuration its launcher or tuner can pick
on a GPU (the module's ``ACTIVATION_DTYPES``, ``GPU_CONSTEXPRS``, and ``TUNED`` configurations
or else ``GPU_LAUNCH``), ``triton.compile(ASTSource(...), target=GPUTarget(...))`` gives the cubin, and
the triton wheel's ``cuobjdump`` reads registers, shared memory and the SASS. One record per
compile: ``{kernel, arch, dtype, signature, constexprs, num_warps, num_stages, regs,
shared_bytes, spill_ops, tensor_core_ops}``; ``signature`` and ``constexprs`` are exactly what
``ASTSource`` got, so any record can be recompiled. ``spill_ops`` counts local-memory loads and
stores (LDL/STL), ``tensor_core_ops`` the MMA instructions (HMMA, HGMMA).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ARCHS = {"sm_90a": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}  # bytes per block (opt-in maximum)
MODULES = ("lora_linear", "score")


def kernels(module: ModuleType) -> dict:
    """Every @triton.jit kernel defined in ``module``, by name."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run the audit with TRITON_INTERPRET=0: the interpreter replaces the kernels")
    return {
        name: fn
        for name, fn in vars(module).items()
        if isinstance(fn, triton.runtime.JITFunction)
        and fn.fn.__module__ == module.__name__
        and name.endswith("_kernel")
    }


def _options(module: ModuleType, fn, name: str, dtype: str) -> tuple:
    """The values of constexpr ``name``: "kernel.NAME" for one kernel, "NAME" for all, either a
    tuple or a dict of tuples by dtype."""
    values = module.GPU_CONSTEXPRS.get(f"{fn.fn.__name__}.{name}", module.GPU_CONSTEXPRS.get(name))
    return values[dtype] if isinstance(values, dict) else values


def launch_space(module: ModuleType, fn) -> list[tuple[str, dict, dict, dict]]:
    """(dtype, signature, constexprs, launch options) for every compile of ``fn`` the launcher
    or the tuner can ask for."""
    names = fn.arg_names
    constexpr_names = [names[i] for i in fn.constexprs]
    tuned = getattr(module, "TUNED", {}).get(fn.fn.__name__)
    takes_activations = any(n in module.ACTIVATION_PTRS for n in names)
    dtypes = module.ACTIVATION_DTYPES if takes_activations else module.ACTIVATION_DTYPES[:1]
    space = []
    for dtype in dtypes:
        signature = {}
        for name in names:
            if name in constexpr_names:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = f"*{dtype if name in module.ACTIVATION_PTRS else 'fp32'}"
            else:
                signature[name] = "fp32" if name in module.FLOAT_ARGS else "i32"
        configs = tuned.configs_for(dtype) if tuned else [None]
        free = [n for n in constexpr_names if not (configs[0] and n in configs[0].kwargs)]
        for values in itertools.product(*(_options(module, fn, n, dtype) for n in free)):
            for config in configs:
                constexprs = dict(zip(free, values)) | (config.kwargs if config else {})
                launch = (
                    {"num_warps": config.num_warps, "num_stages": config.num_stages}
                    if config
                    else dict(module.GPU_LAUNCH)
                )
                space.append((dtype, signature, constexprs, launch))
    return space


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_record(
    module: ModuleType, name: str, fn, arch: str, dtype, signature, constexprs, launch
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(launch)
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs),
        target=GPUTarget("cuda", ARCHS[arch], 32),
        options=options,
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", cubin.name], capture_output=True, text=True).stdout
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", usage)
    shared = re.search(r"SHARED:(\d+)", usage)
    return {
        "kernel": f"{module.__name__.split('.')[-1]}.{name}",
        "arch": arch,
        "dtype": dtype,
        "signature": signature,
        "constexprs": constexprs,
        **options,
        "regs": int(regs.group(1)) if regs else None,
        "shared_bytes": max(int(shared.group(1)) if shared else 0, int(compiled.metadata.shared)),
        "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "tensor_core_ops": len(re.findall(r"\b(?:HMMA|HGMMA|IMMA)\b", sass)),
    }


def _jobs(archs: list[str]) -> list[tuple]:
    import importlib

    jobs = []
    for module_name in MODULES:
        module = importlib.import_module(f"igu_kernels.{module_name}")
        for name, fn in kernels(module).items():
            for arch in archs:
                jobs.extend((module_name, name, arch, *launch) for launch in launch_space(module, fn))
    return jobs


def _compile_job(job: tuple) -> dict:
    import importlib

    module_name, name, arch, *launch = job
    module = importlib.import_module(f"igu_kernels.{module_name}")
    return compile_record(module, name, getattr(module, name), arch, *launch)


def audit(archs: list[str], workers: int | None = None) -> list[dict]:
    """Every record, in a stable order; compiles run in ``workers`` processes (default: CPUs)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = _jobs(archs)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_job, jobs))


def launched() -> list[dict]:
    """What this process compiled and ran on its GPU: per kernel binary, the driver's register
    and spill counts (the device's word next to the cubin audit), and per tuned kernel the
    configuration the tuner chose for each key. Empty on a CPU."""
    import importlib

    out = []
    for module_name in MODULES:
        module = importlib.import_module(f"igu_kernels.{module_name}")
        for name, fn in kernels(module).items():
            for device, cache in getattr(fn, "device_caches", {}).items():
                for binary in cache[0].values():  # (kernel cache, ...) in every triton since 3.0
                    binary._init_handles()
                    meta = binary.metadata
                    out.append({
                        "kernel": f"{module_name}.{name}", "device": str(device),
                        "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                        "regs": binary.n_regs, "spills": binary.n_spills, "shared_bytes": meta.shared,
                    })  # fmt: skip
        for name, tuned in getattr(module, "TUNED", {}).items():
            for key, config in tuned.chosen().items():
                out.append(
                    {"kernel": f"{module_name}.{name}", "tuning_key": repr(key), "chosen": repr(config)}
                )
    return out


def table(records: list[dict]) -> str:
    """Per kernel and dtype: the worst registers, spills and shared memory, and tensor-core use."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["arch"], r["kernel"], r["dtype"])
        row = rows.setdefault(key, {"regs": 0, "spills": 0, "shared": 0, "mma": [], "n": 0})
        row["regs"] = max(row["regs"], r["regs"] or 0)
        row["spills"] = max(row["spills"], r["spill_ops"])
        row["shared"] = max(row["shared"], r["shared_bytes"])
        row["mma"].append(r["tensor_core_ops"])
        row["n"] += 1
    lines = [
        "| arch | kernel | dtype | compiles | max regs | max spill ops | max shared KiB | tensor-core ops |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for (arch, kernel, dtype), row in rows.items():
        mma = f"{min(row['mma'])}-{max(row['mma'])}"
        lines.append(
            f"| {arch} | `{kernel}` | {dtype} | {row['n']} | {row['regs']} | {row['spills']} | "
            f"{row['shared'] / 1024:.1f} | {mma} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", action="append", choices=list(ARCHS), help="repeatable; default sm_90a")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    records = audit(args.arch or ["sm_90a"])
    print(table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
