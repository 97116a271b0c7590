#!/usr/bin/env bash
# GPU check, for a CUDA machine (the GPU image has torch, triton, pytest, transformers; msgspec
# must be importable too, e.g. from carried wheels on PYTHONPATH):
#   1. the Triton kernel, backend, fused-layer, engine and CUDA-graph tests, compiled on the GPU
#   2. benchmarks/throughput_gpu.py: the engine vs transformers generate, 8B shape, bf16
#   3. benchmarks/kernels.py: kernels vs the torch reference, bandwidth vs peak
# then one summary table. Budget: 8 minutes in all (each step has its own timeout).
#
#   scripts/gpu_check.sh                      # from anywhere; runs in the repo root
#   GPU_CHECK_SWEEP=1 scripts/gpu_check.sh    # the kernel benchmark also sweeps launch configs
#   GPU_CHECK_SKIP_THROUGHPUT=1 ...           # skip step 3
#   GPU_CHECK_LOG_DIR=dir ...                 # where step logs go (default: a temp dir)
#   GPU_CHECK_TEST_TIMEOUT=s GPU_CHECK_THROUGHPUT_TIMEOUT=s   # step limits (default 200 s, 180 s);
#                                             # the kernel benchmark gets what is left
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${GPU_CHECK_LOG_DIR:-$(mktemp -d -t folio-gpu-check.XXXXXX)}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET # compiled kernels, not the interpreter

names=()
results=()
failed=0

# run_step NAME TIMEOUT_S CMD...: run with a timeout, log to $LOG_DIR/NAME.log, never abort.
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start rc=0
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
    local secs=$(($(date +%s) - start))
    local status=ok
    if [ "$rc" -eq 124 ]; then
        status="TIMEOUT (${limit}s)"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (rc $rc)"
    fi
    [ "$status" = ok ] || failed=1
    names+=("$name")
    results+=("$(printf '%-18s %6ss' "$status" "$secs")")
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY" >&2
    exit 1
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

# 1. Tests on the GPU. --noconftest: the suite's conftest wants packages this image may lack;
# these tests need none of its fixtures. xdist (when present) compiles kernels in parallel.
if "$PY" -m pytest --version >/dev/null 2>&1; then
    xdist=()
    if "$PY" -c 'import xdist' 2>/dev/null; then xdist=(-n 8); fi
    run_step gpu_tests "${GPU_CHECK_TEST_TIMEOUT:-200}" env FOLIO_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider --noconftest \
        "${xdist[@]}" tests/services/executor/kernels tests/services/executor/attention/test_triton_backend.py \
        tests/services/executor/test_cuda_graphs.py tests/services/executor/models/test_fused_ops.py \
        tests/services/engine/test_triton_engine.py
else
    echo "gpu_check: pytest is missing; carry a pytest wheel (see the device notes)" >&2
    names+=(gpu_tests)
    results+=("MISSING pytest")
    failed=1
fi

# 2. Engine throughput on the GPU.
if [ -z "${GPU_CHECK_SKIP_THROUGHPUT:-}" ]; then
    run_step throughput_gpu "${GPU_CHECK_THROUGHPUT_TIMEOUT:-180}" "$PY" benchmarks/throughput_gpu.py
else
    names+=(throughput_gpu)
    results+=("skipped")
fi

# 3. Kernel microbenchmark, in what is left of the 8 minutes.
bench_args=()
if [ -n "${GPU_CHECK_SWEEP:-}" ]; then bench_args=(--sweep); fi
left=$((470 - SECONDS))
if [ "$left" -gt 30 ]; then
    run_step kernel_bench "$left" "$PY" benchmarks/kernels.py "${bench_args[@]}"
else
    names+=(kernel_bench)
    results+=("skipped (no time left)")
fi

echo
echo "=== gpu_check summary (logs: $LOG_DIR)"
for i in "${!names[@]}"; do
    printf '%-16s %s\n' "${names[$i]}" "${results[$i]}"
done
if [ -f "$LOG_DIR/gpu_tests.log" ]; then
    echo "gpu_tests:       $(grep -E '(passed|failed|error)' "$LOG_DIR/gpu_tests.log" | tail -1)"
fi
if [ -f "$LOG_DIR/throughput_gpu.log" ]; then
    echo
    sed -n '/^Engine throughput/,$p' "$LOG_DIR/throughput_gpu.log"
fi
if [ -f "$LOG_DIR/kernel_bench.log" ]; then
    echo
    sed -n '/kernel .*shape/,$p' "$LOG_DIR/kernel_bench.log" | sed -n '1,40p'
fi
exit "$failed"
