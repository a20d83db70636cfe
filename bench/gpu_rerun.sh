#!/usr/bin/env bash
# Re-run chosen GPU tests, with each failure's full report, on a lent GPU:
#   bash bench/gpu_rerun.sh TESTS_FILE      # one pytest node id per line
# 1. the node ids with "triton" in them run first (they need no compiled extension);
# 2. the extension is built in place (skipped with SA2VP_SKIP_BUILD=1);
# 3. the other node ids run.
# Each test runs under a 45 s limit; each failure's report goes to $OUT/failures.log as it happens, so a
# run cut short keeps them. Logs go to $OUT (default bench/results/gpu-rerun-<time>). With pytest-xdist
# installed the tests run in SA2VP_TEST_WORKERS processes (default 8).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-rerun-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SA2VP_FAILURE_LOG="$OUT/failures.log"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
mapfile -t ids < <(grep -v '^\s*$' "$1")
triton_ids=(); other_ids=()
for id in "${ids[@]}"; do
  if [[ $id == *triton* ]]; then triton_ids+=("$id"); else other_ids+=("$id"); fi
done
opts=(-p no:cacheprovider -rfE --tb=short -v -o faulthandler_timeout=60)
"$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=45)
"$PY" -c "import xdist" 2>/dev/null && opts+=(-n "${SA2VP_TEST_WORKERS:-8}")
summary=()
if (( ${#triton_ids[@]} )); then
  timeout "${SA2VP_TESTS_TIMEOUT:-150}" "$PY" -m pytest "${triton_ids[@]}" "${opts[@]}" >"$OUT/pytest-triton.log" 2>&1
  summary+=("triton tests (rc $?): $(grep -c ' PASSED' "$OUT/pytest-triton.log") passed, $(grep -c ' FAILED' "$OUT/pytest-triton.log") failed")
fi
if (( ${#other_ids[@]} )); then
  t=$(date +%s)
  if [ "${SA2VP_SKIP_BUILD:-0}" != "1" ]; then
    timeout 300 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
      && summary+=("build: ok in $(( $(date +%s) - t )) s") || summary+=("build: FAILED (see build.log)")
  fi
  timeout "${SA2VP_TESTS_TIMEOUT:-150}" "$PY" -m pytest "${other_ids[@]}" "${opts[@]}" >"$OUT/pytest-other.log" 2>&1
  summary+=("other tests (rc $?): $(grep -c ' PASSED' "$OUT/pytest-other.log") passed, $(grep -c ' FAILED' "$OUT/pytest-other.log") failed")
fi
[ -s "$OUT/failures.log" ] && cut -c1-300 "$OUT/failures.log" | head -n 120
printf '%s\n' "${summary[@]}"
