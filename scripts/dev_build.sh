#!/usr/bin/env bash
# Rebuild sa2vp_kernels/_C*.so in place (for development), safely when several shells build at once:
# builds run one at a time under a lock, and the finished library replaces the old one atomically.
# CUDA sources are skipped unless SA2VP_SKIP_CUDA=0 is set explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export SA2VP_SKIP_CUDA=${SA2VP_SKIP_CUDA:-1}
export MAX_JOBS=${MAX_JOBS:-2}
tag=$([ "$SA2VP_SKIP_CUDA" = "0" ] && echo cuda || echo cpu)
exec 9>/tmp/sa2vp_build.lock
flock 9
"$PY" setup.py -q build_ext --build-temp "build/temp-$tag" --build-lib "build/lib-$tag" >/dev/null
so=$(ls build/lib-$tag/sa2vp_kernels/_C*.so)
cp "$so" "sa2vp_kernels/.$(basename "$so").tmp"
mv -f "sa2vp_kernels/.$(basename "$so").tmp" "sa2vp_kernels/$(basename "$so")"
echo "built $(basename "$so") ($tag)"
