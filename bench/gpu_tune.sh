#!/usr/bin/env bash
# Kernel variants and targeted GPU checks in one go, for choosing defaults on a lent GPU (planned for
# about 9 minutes on an H200, the build included); the full benchmark is bench/gpu_check.sh.
#   1. the Triton variants and the unfused baseline (bench/gpu_variants.py --providers triton,unfused):
#      they need no compiled extension, so they run before the build;
#   2. the GPU tests of the variants not yet on by default and of recent changes (Triton only);
#   3. the extension is built in place (skipped with SA2VP_SKIP_BUILD=1);
#   4. raw op calls with bad arguments, each in its own process (scripts/diag_bad_args.py), and the
#      GPU tests that need the extension (SA2VP_TUNE_TESTS_EXT; by default the bad-argument test, the
#      CUDA variants' tests and the CUDA prompt_add tests);
#   5. the CUDA variants (bench/gpu_variants.py --providers cuda);
#   6. with SA2VP_TUNE_NCU=1, Nsight Compute counters of every forward variant (scripts/kernel_metrics.py).
# Logs and results go to $OUT (default bench/results/gpu-tune-<time>); the variants' JSON files are
# <device>-<date>-variants-{triton,cuda}.json. bench/variants_summary.py prints every timing last,
# per case against the default and the targets.
#
#   bash bench/gpu_tune.sh          # or: make gpu-tune
#
# Environment: PYTHON (default python3), OUT, SA2VP_SKIP_BUILD=1, TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 16), SA2VP_TUNE_TESTS / SA2VP_TUNE_TESTS_EXT (pytest node ids or -k expressions
# replacing the defaults below), SA2VP_VARIANTS_ARGS (extra arguments of bench/gpu_variants.py, e.g.
# --tiny for a dry run without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)
OUT=${OUT:-$ROOT/bench/results/gpu-tune-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SA2VP_FAILURE_LOG="$OUT/failures.log"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
summary=()
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

pytest_opts=(-m gpu -p no:cacheprovider -rfE --tb=short -v -o faulthandler_timeout=60)
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout=60)
"$PY" -c "import xdist" 2>/dev/null && pytest_opts+=(-n 8)
run_tests() {  # name, timeout, then pytest arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest "$@" "${pytest_opts[@]}" >"$OUT/pytest-$name.log" 2>&1
  local rc=$?
  local line
  line=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/pytest-$name.log" | tail -n 1)
  summary+=("tests $name (rc $rc): ${line:-no pytest summary}")
  grep -E " FAILED|^ERROR " "$OUT/pytest-$name.log" | head -n 10
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")'

stamp "== Triton variants"
timeout 330 "$PY" bench/gpu_variants.py --providers triton,unfused --tag triton --out "$OUT" ${SA2VP_VARIANTS_ARGS:-} >"$OUT/variants-triton.log" 2>&1
summary+=("triton variants: rc $?")

stamp "== GPU tests (Triton)"
if [ -n "${SA2VP_TUNE_TESTS:-}" ]; then
  read -r -a tests <<<"$SA2VP_TUNE_TESTS"
else
  tests=(tests/test_local_attention_triton.py tests/test_prompt_add.py -k "triton or fused")
fi
run_tests triton 150 "${tests[@]}"
run_tests compile 90 tests/test_compile.py -k "triton"

stamp "== build"
if [ "${SA2VP_SKIP_BUILD:-0}" = "1" ]; then
  summary+=("build: skipped")
elif timeout 240 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  summary+=("build: ok")
else
  summary+=("build: FAILED (see build.log)")
  tail -n 20 "$OUT/build.log"
fi

stamp "== bad arguments, raw ops (one process each)"
timeout 120 "$PY" scripts/diag_bad_args.py >"$OUT/diag-bad-args.log" 2>&1
summary+=("diag_bad_args: rc $? ($(grep -c 'rc=0' "$OUT/diag-bad-args.log") calls raised cleanly, $(grep -c 'rc=-' "$OUT/diag-bad-args.log") crashed)")
if [ -n "${SA2VP_TUNE_TESTS_EXT:-}" ]; then
  read -r -a tests <<<"$SA2VP_TUNE_TESTS_EXT"
else
  tests=(tests/test_local_attention_cuda.py::test_bad_arguments_raise tests/test_cuda_variants_gpu.py)
fi
run_tests extension 120 "${tests[@]}"
[ -z "${SA2VP_TUNE_TESTS_EXT:-}" ] && run_tests cuda-prompt-add 120 tests/test_prompt_add.py -k cuda

stamp "== CUDA variants"
timeout 150 "$PY" bench/gpu_variants.py --providers cuda --tag cuda --out "$OUT" ${SA2VP_VARIANTS_ARGS:-} >"$OUT/variants-cuda.log" 2>&1
summary+=("cuda variants: rc $?")

if [ "${SA2VP_TUNE_NCU:-0}" = "1" ]; then
  stamp "== Nsight Compute counters of the forwards"
  timeout 300 "$PY" scripts/kernel_metrics.py >"$OUT/kernel-metrics.log" 2>&1
  summary+=("kernel metrics: rc $? (kernel-metrics.log)")
fi

stamp "== summary ($OUT)"
printf '%s\n' "${summary[@]}"
cut -c1-140 "$OUT/diag-bad-args.log" | grep -E "rc=" | head -n 8
grep -h -E " ERROR " "$OUT/variants-triton.log" "$OUT/variants-cuda.log" | cut -c1-160
"$PY" bench/variants_summary.py "$OUT"/*-variants-*.json | tee "$OUT/variants-summary.txt" | cut -c1-150
