#!/usr/bin/env bash
# The one prepared script for a lent GPU: GPU kernel tests, the compile audit, then the
# benchmarks with their roofline fractions, all under $OUT, within a 10-minute window.
#
#   OUT=/some/dir bash bench/gpu_check.sh             (the device tool sets $OUT)
#   OUT=/tmp/dry bash bench/gpu_check.sh --dry-run    (on a CPU: imports, paths, arguments)
#
# It runs from the repository root without installing anything (the GPU machine has no
# network): the package is used from the source tree. Each step has its own time limit and a
# failing step does not stop the next. Copy $OUT to bench/results/<date>-<device>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TRITON_INTERPRET=0   # compiled kernels, not the interpreter

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    python -c "import igu_kernels; print('backends', igu_kernels.available_backends())"
} > "$OUT/environment.txt" 2>&1

# GPU tests only: the CPU tests expect the interpreter.
GPU_TESTS="tests/test_kernel_lora_linear.py tests/test_kernel_score.py"
if [ $DRY = 1 ]; then COLLECT=--collect-only; else COLLECT=; fi
timeout 150 python -m pytest -q -k gpu $COLLECT $GPU_TESTS -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"

# The compile audit on this machine's triton (sm_90a records, as docs/kernels.md shows them).
if [ $DRY = 1 ]; then
    python -m igu_kernels.audit --help > "$OUT/audit.txt" 2>&1
else
    timeout 150 python -m igu_kernels.audit --arch sm_90a --json "$OUT/sass.json" > "$OUT/audit.txt" 2>&1
fi
echo "audit exit $?" >> "$OUT/audit.txt"

if [ $DRY = 1 ]; then PRESET="--preset tiny --repeats 1 --ops copy"; else PRESET="--preset gpu"; fi
timeout 240 python bench/run.py $PRESET --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_gpu.txt"

# The device's own register and spill counts of every kernel the benchmarks ran, and the
# configurations the autotuner chose (from bench_gpu.json).
python - "$OUT/bench_gpu.json" > "$OUT/launched.txt" 2>&1 <<'PY'
import json, sys
launched = json.load(open(sys.argv[1])).get("launched_kernels", [])
for r in launched:
    print(r)
print(len(launched), "records; max spills:", max((r.get("spills", 0) for r in launched), default=0))
PY
tail -n 20 "$OUT/gpu_tests.txt" "$OUT/audit.txt" "$OUT/bench_gpu.txt" "$OUT/launched.txt"
