#!/usr/bin/env bash
# The one prepared script for a lent GPU: GPU kernel tests, then the benchmarks, all under $OUT.
#
#   OUT=/some/dir bash bench/gpu_check.sh      (the device tool sets $OUT)
#
# It runs from the repository root without installing anything (the GPU machine has no
# network): the package is used from the source tree. Each step has its own time limit and a
# failing step does not stop the next. Copy $OUT to bench/results/<date>-<device>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TRITON_INTERPRET=0   # compiled kernels, not the interpreter

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    python -c "import igu_kernels; print('backends', igu_kernels.available_backends())"
} > "$OUT/environment.txt" 2>&1

# GPU tests only: the CPU tests expect the interpreter.
timeout 240 python -m pytest -q -k gpu tests/test_kernel_lora_linear.py tests/test_kernel_score.py \
    -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"

timeout 300 python bench/run.py --preset gpu --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_gpu.txt"
tail -n 20 "$OUT/gpu_tests.txt" "$OUT/bench_gpu.txt"
