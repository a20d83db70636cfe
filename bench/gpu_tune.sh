#!/usr/bin/env bash
# Kernel variants, the per-GPU tuned settings and targeted GPU checks in one go, within a time budget
# (SA2VP_TUNE_BUDGET, default 560 s), for a lent GPU; the full benchmark is bench/gpu_check.sh.
#   1. the Triton variants and the unfused baseline (bench/gpu_variants.py --providers triton,unfused),
#      side by side: they need no compiled extension, so they run before the build;
#   2. bench/apply_tuning.py keeps the settings that beat the built-in defaults as this GPU model's
#      tuned file, sa2vp_kernels/triton/tuned/<device>.json (a copy goes to $OUT: commit it from there);
#      SA2VP_TUNE_APPLY=0 leaves the tuned files alone;
#   3. the Triton GPU tests, with the tuned file in force (and tests/test_triton_tuning.py's check of it
#      against the built-in defaults);
#   4. bench/run_gpu.py, sections bandwidth, attention, prompt_add and graphs, Triton and the baselines,
#      with the tuned file in force: the results file of record (<device>-<date>.json in $OUT);
#   5. if at least SA2VP_TUNE_CUDA_MIN seconds (default 230) are left: the extension is built in place
#      (skipped with SA2VP_SKIP_BUILD=1), raw op calls with bad arguments, each in its own process
#      (scripts/diag_bad_args.py), the GPU tests that need the extension (SA2VP_TUNE_TESTS_EXT; by
#      default the bad-argument test, the CUDA variants' tests and the CUDA prompt_add tests), and the
#      CUDA variants (bench/gpu_variants.py --providers cuda);
#   6. with SA2VP_TUNE_NCU=1, Nsight Compute counters of every forward variant (scripts/kernel_metrics.py).
# Logs and results go to $OUT (default bench/results/gpu-tune-<time>); the variants' JSON files are
# <device>-<date>-variants-{triton,cuda}.json. bench/variants_summary.py prints every timing last, per
# case against the default and the targets. At the end the logs are packed into $OUT/logs.tar.gz
# (bench/pack_logs.sh: the device tool brings back at most 8 files). `python3 bench/collect_tune.py $OUT` (on the machine
# that commits) puts the tuned file into the package and the results and logs into bench/results.
#
#   bash bench/gpu_tune.sh          # or: make gpu-tune
#
# Steps 1-5 are named variants, apply, tests, bench, cuda; SA2VP_TUNE_STEPS (comma-separated) runs only
# some of them, e.g. SA2VP_TUNE_STEPS=cuda for the CUDA steps in a second, shorter call.
# Environment: PYTHON (default python3), OUT, SA2VP_TUNE_BUDGET, SA2VP_TUNE_APPLY, SA2VP_TUNE_CUDA_MIN,
# SA2VP_SKIP_BUILD=1, TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16), SA2VP_TUNE_TESTS /
# SA2VP_TUNE_TESTS_EXT (pytest node ids or -k expressions replacing the defaults below),
# SA2VP_VARIANTS_ARGS (extra arguments of bench/gpu_variants.py, e.g. --tiny for a dry run without a
# GPU), SA2VP_BENCH_ARGS (extra arguments of bench/run_gpu.py, e.g. --tiny), SA2VP_TEST_WORKERS
# (pytest-xdist workers when it is installed, default 8).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${SA2VP_TUNE_BUDGET:-560}
OUT=${OUT:-$ROOT/bench/results/gpu-tune-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SA2VP_FAILURE_LOG="$OUT/failures.log"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
summary=()
source bench/pack_logs.sh
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

pytest_opts=(-m gpu -p no:cacheprovider -rfE --tb=short -v -o faulthandler_timeout=60)
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout=60)
"$PY" -c "import xdist" 2>/dev/null && pytest_opts+=(-n "${SA2VP_TEST_WORKERS:-8}")
run_tests() {  # name, timeout, then pytest arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest "$@" "${pytest_opts[@]}" >"$OUT/pytest-$name.log" 2>&1
  local rc=$?
  local line
  line=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/pytest-$name.log" | tail -n 1)
  summary+=("tests $name (rc $rc): ${line:-no pytest summary}")
  grep -E " FAILED|^ERROR " "$OUT/pytest-$name.log" | head -n 10
}

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
STEPS=",${SA2VP_TUNE_STEPS:-variants,apply,tests,bench,cuda},"
step() { [[ "$STEPS" == *",$1,"* ]]; }

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")'

if step variants; then
stamp "== Triton variants"
timeout "$(clamp $(( $(left) - 260 )) 60 300)" "$PY" bench/gpu_variants.py --providers triton,unfused --tag triton \
  --out "$OUT" ${SA2VP_VARIANTS_ARGS:-} >"$OUT/variants-triton.log" 2>&1
summary+=("triton variants: rc $?")
fi

stamp "== tuned settings"
if ! step apply || [ "${SA2VP_TUNE_APPLY:-1}" = "0" ]; then
  summary+=("tuned settings: not applied (SA2VP_TUNE_APPLY=0 or no apply step)")
else
  variants_json=$(ls -t "$OUT"/*-variants-triton.json 2>/dev/null | head -n 1)
  if [ -z "$variants_json" ]; then
    summary+=("tuned settings: no Triton variants results in $OUT")
  elif "$PY" bench/apply_tuning.py "$variants_json" --copy "$OUT" ${SA2VP_APPLY_ARGS:-} \
       >"$OUT/apply-tuning.log" 2>&1; then
    summary+=("tuned settings: $(grep -E '^(wrote|removed)' "$OUT/apply-tuning.log" || echo 'none written (the defaults won)')")
  else
    summary+=("tuned settings: FAILED (see apply-tuning.log)")
  fi
  cat "$OUT/apply-tuning.log" 2>/dev/null | cut -c1-240
fi
"$PY" -m sa2vp_kernels.triton.show_tuning

if step tests; then
stamp "== GPU tests (Triton)"
if [ -n "${SA2VP_TUNE_TESTS:-}" ]; then
  read -r -a tests <<<"$SA2VP_TUNE_TESTS"
else
  tests=(tests/test_local_attention_triton.py tests/test_prompt_add.py tests/test_triton_tuning.py
         tests/test_compile.py tests/test_triton_eager_launch.py -k "triton or fused or tuned or launch")
fi
run_tests triton "$(clamp $(( $(left) - 130 )) 30 180)" "${tests[@]}"
fi

if step bench; then
stamp "== benchmarks (Triton and the baselines, tuned settings in force)"
bench_budget=$(clamp $(( $(left) - 45 )) 20 150)
timeout $(( bench_budget + 15 )) "$PY" bench/run_gpu.py --out "$OUT" --no-copy --budget "$bench_budget" \
  --sections bandwidth,attention,prompt_add,graphs --providers triton,reference,unfused ${SA2VP_BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1
summary+=("benchmarks: rc $? (bench.log)")
fi
bench_json=$(ls -t "$OUT"/*-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json 2>/dev/null | head -n 1)

if ! step cuda; then
  summary+=("build, extension tests, CUDA variants: not run (SA2VP_TUNE_STEPS)")
elif (( $(left) >= ${SA2VP_TUNE_CUDA_MIN:-230} )); then
  stamp "== build"
  if [ "${SA2VP_SKIP_BUILD:-0}" = "1" ]; then
    summary+=("build: skipped")
  elif timeout "$(clamp $(( $(left) - 100 )) 60 240)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    summary+=("build: ok")
  else
    summary+=("build: FAILED (see build.log)")
    tail -n 20 "$OUT/build.log"
  fi

  stamp "== bad arguments, raw ops (one process each)"
  timeout "$(clamp $(( $(left) - 80 )) 20 120)" "$PY" scripts/diag_bad_args.py >"$OUT/diag-bad-args.log" 2>&1
  summary+=("diag_bad_args: rc $? ($(grep -c 'rc=0' "$OUT/diag-bad-args.log") calls raised cleanly, $(grep -c 'rc=-' "$OUT/diag-bad-args.log") crashed)")
  if [ -n "${SA2VP_TUNE_TESTS_EXT:-}" ]; then
    read -r -a tests <<<"$SA2VP_TUNE_TESTS_EXT"
  else
    tests=(tests/test_local_attention_cuda.py::test_bad_arguments_raise tests/test_cuda_variants_gpu.py)
  fi
  run_tests extension "$(clamp $(( $(left) - 90 )) 20 120)" "${tests[@]}"
  [ -z "${SA2VP_TUNE_TESTS_EXT:-}" ] && run_tests cuda-prompt-add "$(clamp $(( $(left) - 70 )) 20 120)" tests/test_prompt_add.py -k cuda

  stamp "== CUDA variants"
  timeout "$(clamp $(( $(left) - 10 )) 20 150)" "$PY" bench/gpu_variants.py --providers cuda --tag cuda --out "$OUT" \
    ${SA2VP_VARIANTS_ARGS:-} >"$OUT/variants-cuda.log" 2>&1
  summary+=("cuda variants: rc $?")
else
  summary+=("build, extension tests, CUDA variants: not run ($(left) s left, SA2VP_TUNE_CUDA_MIN=${SA2VP_TUNE_CUDA_MIN:-230})")
fi

if [ "${SA2VP_TUNE_NCU:-0}" = "1" ]; then
  stamp "== Nsight Compute counters of the forwards"
  timeout 300 "$PY" scripts/kernel_metrics.py >"$OUT/kernel-metrics.log" 2>&1
  summary+=("kernel metrics: rc $? (kernel-metrics.log)")
fi

stamp "== summary ($OUT)"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/diag-bad-args.log" ] && cut -c1-140 "$OUT/diag-bad-args.log" | grep -E "rc=" | head -n 8
grep -h -E " ERROR " "$OUT"/variants-*.log 2>/dev/null | cut -c1-160
if ls "$OUT"/*-variants-*.json >/dev/null 2>&1; then
  "$PY" bench/variants_summary.py "$OUT"/*-variants-*.json | tee "$OUT/variants-summary.txt" | cut -c1-150
fi
if [ -n "$bench_json" ]; then
  "$PY" bench/report.py "$bench_json" --summary --no-plot 2>&1 | tail -n 40
fi
pack_logs "$OUT"
