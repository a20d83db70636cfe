#!/usr/bin/env bash
# GPU check of sa2vp-kernels in one go (about 7 minutes on an H100, the build included):
#   1. build the extension in place for the card and check that `import sa2vp_kernels` works;
#   2. run the GPU tests (`pytest -m gpu tests`, each test under a 60 s limit; each failure's report is
#      written to failures.log as it happens);
#   3. benchmark every op and the SA2VP model against the alternatives (bench/run_gpu.py);
#   4. write Markdown tables and a plot (bench/report.py) and print a summary last.
# Everything lands in $OUT (<device>-<date>.json/.md/.png, and the logs packed into logs.tar.gz at the end:
# the device tool brings back at most 8 files); the results also go to bench/results/ (not with
# SA2VP_NO_COPY=1).
#
#   bash bench/gpu_check.sh          # or: make gpu-check
#
# Environment: PYTHON (default python3), OUT (default bench/results/gpu-check-<time>),
# SA2VP_GPU_BUDGET (seconds for the whole script, default 470), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 16), SA2VP_TEST_WORKERS (pytest-xdist workers, default 8), SA2VP_SKIP_BUILD=1 (use
# the extension already built), SA2VP_NO_COPY=1 (results stay in $OUT), SA2VP_GPU_TESTS (test files to run, default all), SA2VP_BENCH_ARGS (extra arguments of bench/run_gpu.py, e.g.
# "--sections attention,prompt_add"). Needs no network and no virtual environment.
# To re-run only some tests with their failure reports: bash bench/gpu_rerun.sh FILE_OF_NODE_IDS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${SA2VP_GPU_BUDGET:-470}
T0=$(date +%s)
OUT=${OUT:-$ROOT/bench/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
source bench/pack_logs.sh

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | head -n 4
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")'
command -v nvcc >/dev/null && nvcc --version | tail -n 1

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t=$(date +%s)
if [ "${SA2VP_SKIP_BUILD:-0}" = "1" ]; then
  build="skipped (SA2VP_SKIP_BUILD=1)"
  : >"$OUT/build.log"
elif timeout "$(clamp $(( $(left) - 200 )) 60 300)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  build="ok in $(( $(date +%s) - t )) s"
else
  build="FAILED (rc $?, see build.log) after $(( $(date +%s) - t )) s"
fi
echo "build: $build"
tail -n 3 "$OUT/build.log"
"$PY" -c 'import sa2vp_kernels as sk
from sa2vp_kernels import _ext
print("import sa2vp_kernels: ok | extension loaded:", sk.extension_available(), "| CUDA kernels:",
      {op: _ext.has_kernel(op, "CUDA") for op in ("local_attn_fwd", "prompt_add_fwd", "prompt_map_fwd")})' \
  || echo "import sa2vp_kernels FAILED"

echo "== GPU tests"
tests_budget=$(clamp $(( $(left) - 170 )) 0 180)
if (( tests_budget >= 20 )); then
  opts=()
  # a hung test fails after 60 s instead of holding the run until the time limit
  "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=60)
  # with pytest-xdist a test that crashes the interpreter takes down one worker, not the whole run
  "$PY" -c "import xdist" 2>/dev/null && opts+=(-n "${SA2VP_TEST_WORKERS:-8}")
  t=$(date +%s)
  # The compiled kernels' tests first (their first run on a GPU), then the rest. One line per test
  # (-v): if the time limit cuts the run, the results so far are still in the log.
  # each failure's report is written as it happens (tests/conftest.py), so a cut run keeps them
  # SA2VP_GPU_TESTS: the test files (or node ids) to run instead, e.g. after a change to one op.
  read -r -a test_paths <<<"${SA2VP_GPU_TESTS:-tests/test_local_attention_cuda.py tests/test_prompt_add.py tests/test_prompt_map.py tests}"
  SA2VP_FAILURE_LOG="$OUT/failures.log" timeout "$tests_budget" "$PY" -m pytest -m gpu "${test_paths[@]}" \
    -v -rfE -p no:cacheprovider ${opts[@]+"${opts[@]}"} -o faulthandler_timeout=100 >"$OUT/pytest-gpu.log" 2>&1
  rc=$?
  tests=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/pytest-gpu.log" | tail -n 1)
  tests="${tests:-no pytest summary} (rc $rc, $(( $(date +%s) - t )) s)"
  (( rc == 124 )) && tests="$tests, CUT at the time limit"
  (( rc > 128 )) && tests="$tests, pytest CRASHED (signal $(( rc - 128 )))"
  passed=$(grep -c " PASSED" "$OUT/pytest-gpu.log"); failed=$(grep -c " FAILED" "$OUT/pytest-gpu.log")
  tests="$tests; lines: $passed PASSED, $failed FAILED"
  grep -E "^(FAILED|ERROR) | FAILED|crashed while running|Fatal Python error" "$OUT/pytest-gpu.log" | head -n 20
else
  tests="not run: no time left"
fi
echo "GPU tests: $tests"

echo "== benchmarks"
bench_budget=$(clamp $(( $(left) - 25 )) 30 3600)
nocopy=()
[ "${SA2VP_NO_COPY:-0}" = "1" ] && nocopy=(--no-copy)
timeout $(( bench_budget + 15 )) "$PY" bench/run_gpu.py --out "$OUT" --budget "$bench_budget" ${nocopy[@]+"${nocopy[@]}"} \
  ${SA2VP_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"

json=$(ls -t "$OUT"/*.json 2>/dev/null | head -n 1)
echo "== summary ($(( $(date +%s) - T0 )) s in all; logs and results in $OUT)"
echo "build: $build"
echo "GPU tests: $tests"
if [ -s "$OUT/failures.log" ]; then
  echo "failures (first lines of each; all of them in failures.log):"
  awk '/^==== /{n=0} {if (n++ < 6) print substr($0, 1, 300)}' "$OUT/failures.log" | head -n 60
fi
if [ -n "$json" ]; then
  "$PY" bench/report.py "$json" >/dev/null 2>"$OUT/report.err" || cat "$OUT/report.err"
  rm -f "$OUT/report.err"
  if [ "${SA2VP_NO_COPY:-0}" != "1" ]; then
    cp "$json" "${json%.json}.md" bench/results/ 2>/dev/null
    [ -f "${json%.json}.png" ] && cp "${json%.json}.png" bench/results/
  fi
  "$PY" bench/report.py "$json" --summary --no-plot 2>/dev/null
else
  echo "no results file was written (see bench.log)"
fi
pack_logs "$OUT"
