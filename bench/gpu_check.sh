#!/usr/bin/env bash
# The one prepared script for a lent GPU: one 8-minute slot on a bare H100 or H200 (torch 2.11,
# triton 3.6, python 3.12, no network): correctness of every kernel at LLM shapes, then the
# benchmarks, all under $OUT.
#
#   OUT=/some/dir bash bench/gpu_check.sh             (the device tool sets $OUT)
#   OUT=/tmp/dry bash bench/gpu_check.sh --dry-run    (a CPU: every stage at tiny shapes, in
#                                                      Triton's interpreter; tested in CI)
#
# It runs from the repository root without installing anything: the package is used from the
# source tree. Each stage ends by its deadline (seconds from the start; it gets what is left of
# that), a failing or timed-out stage does not stop the next, and every Python stage rewrites its
# JSON after each case, so a timeout keeps what ran. The first two stages answer "is it correct
# and is it faster than eager bf16 LoRA" within 3 minutes:
#
#   1. environment (GPU, versions, backends)                                       by  40 s
#   2. P1 (8192 tokens, 4096 x 4096, r 16 half masked, bf16), both forms, every
#      tile, against the fp64 and eager bf16 references                            by 110 s
#      P1 forward + backward: fused op vs the base GEMM alone vs eager bf16 LoRA   by 180 s
#   3. the correctness matrix: 8k / 32k tokens, 4096 / 14336 features both ways,
#      r 8 / 16 / 64 half masked and 64 unmasked, bf16 and fp16, every tile        by 330 s
#   4. the benchmarks: the low-rank linear at those shapes (with torch.compile at
#      P1) with per-kernel profiler times and their roofline fractions, the score
#      update's GB/s next to a copy's, batched IG nodes vs node-by-node passes
#      per backend, a training step, activation memory                            by 440 s
#   5. the GPU tests (pytest -k gpu) with what is left                             by 470 s
#
# Files (the device tool brings back 8 at most): environment.txt, log.txt (every stage's
# output), correctness_p1.json, bench_p1.json, correctness.json, bench_gpu.json. Copy $OUT to
# bench/results/<date>-<device>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1  # the interpreter
    SCALE=3                    # a slow CPU gets three times the time
    CHECK="--tiny --device cpu"
    P1="--preset tiny --repeats 1"
    GPU="--preset tiny --repeats 1 --ops plain_lora lora_linear_ig score_update copy ig_nodes"
    COLLECT=--collect-only
else
    export TRITON_INTERPRET=0  # compiled kernels
    SCALE=1 CHECK= P1="--preset p1" GPU="--preset gpu" COLLECT=
fi

# stage NAME DEADLINE COMMAND...: run COMMAND until DEADLINE (x SCALE) seconds from the start.
stage() {
    local name=$1 left=$(($2 * SCALE - SECONDS))
    shift 2
    echo "=== $name: $* (at ${SECONDS} s, ${left} s left)" >> "$LOG"
    if [ $left -lt 10 ]; then
        echo "$name skipped: no time left at ${SECONDS} s" | tee -a "$LOG"
        return
    fi
    timeout -k 5 $left "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "$name exit $rc$([ $rc = 124 ] && echo ' (timed out)') at ${SECONDS} s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
    timeout 30 python -c "
import os, sys, torch, triton
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
print('IGULORA_BACKEND', os.environ.get('IGULORA_BACKEND', 'auto'), 'TRITON_INTERPRET', os.environ['TRITON_INTERPRET'])"
} > "$OUT/environment.txt" 2>&1
echo "environment exit $? at ${SECONDS} s" | tee -a "$LOG"

stage correctness_p1 110 python -m bench.gpu_correctness --matrix p1 $CHECK --json "$OUT/correctness_p1.json"
stage bench_p1 180 python bench/run.py $P1 --ops plain_lora lora_linear_ig --profile --json "$OUT/bench_p1.json"
stage correctness 330 python -m bench.gpu_correctness --matrix full $CHECK --json "$OUT/correctness.json"
stage bench_gpu 440 python bench/run.py $GPU --profile --json "$OUT/bench_gpu.json"
stage gpu_tests 470 python -m pytest -q -k gpu $COLLECT -p no:cacheprovider \
    tests/test_kernel_lora_linear.py tests/test_kernel_score.py

# The answers, read back from the JSON files (whatever the stages left).
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("correctness_p1", "correctness"):
    path = out / f"{name}.json"
    if path.exists():
        d = json.loads(path.read_text())
        done, planned = len(d["checks"]), len(d["planned"])
        print(f"{name}: {done - len(d['failed'])} of {planned} checks passed, {planned - done} not reached")
        for label in d["failed"]:
            print("  FAILED", label)
for name in ("bench_p1", "bench_gpu"):
    path = out / f"{name}.json"
    if path.exists():
        d = json.loads(path.read_text())
        if name == "bench_p1":
            print(d["table"])
            for r in d["records"]:
                fractions = r.get("kernel_roofline", {})
                for kernel, us in r.get("kernel_us", {}).items():
                    share = f" ({fractions[kernel]:.2f} of its model)" if kernel in fractions else ""
                    print(f"  {r['op']} {r['backend']}: {kernel[:60]} {us:.1f} us{share}")
        print(f"{name}:", *d["goals"], sep="\n  ")
        launched = d["launched_kernels"]
        spills = max((r.get("spills", 0) for r in launched), default=0)
        print(f"  {len(launched)} launched-kernel records; max spills: {spills}")
PY
