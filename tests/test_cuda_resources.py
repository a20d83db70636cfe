"""Resource usage of the compiled CUDA kernels, read from the built extension (no GPU needed).

``cuobjdump -res-usage`` lists, for every kernel of every architecture in the extension's fatbin, its
registers per thread and its stack frame. A stack frame means local memory: register spills, or an
array the compiler could not keep in registers (a dynamically indexed one), which costs memory
traffic in the hottest loops. These tests keep the kernels free of it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sa2vp_kernels import _ext

OPS = ("local_attn", "prompt_add", "prompt_map")


def _cuobjdump() -> str | None:
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(cuda_home) / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else shutil.which("cuobjdump")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.fixture(scope="module")
def kernels():
    """[(arch, op, kernel signature, registers, stack bytes)] of the extension's CUDA kernels."""
    if not _ext.extension_available() or not _ext.has_kernel("prompt_add_fwd", "CUDA"):
        pytest.skip("sa2vp_kernels._C was built without CUDA kernels (SA2VP_SKIP_CUDA=1 or no nvcc)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")
    from sa2vp_kernels import _C
    text = subprocess.run([tool, "-res-usage", _C.__file__], capture_output=True, text=True, check=True).stdout
    rows, arch, mangled = [], None, None
    for line in text.splitlines():
        if m := re.match(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            mangled = m.group(1)
        elif (m := re.search(r"REG:(\d+) STACK:(\d+)", line)) and mangled is not None:
            op = next((o for o in OPS if f"{o}_cu" in mangled), None)
            if op is not None:
                rows.append([arch, op, mangled, int(m.group(1)), int(m.group(2))])
            mangled = None
    for row, name in zip(rows, _demangle([r[2] for r in rows])):
        row[2] = name
    return [tuple(r) for r in rows]


def test_every_op_and_architecture_is_built(kernels):
    arches = {k[0] for k in kernels}
    assert "sm_90" in arches or "sm_80" in arches, arches
    for arch in arches:
        assert {k[1] for k in kernels if k[0] == arch} == set(OPS), arch


def test_no_local_memory_in_16_and_32_bit_kernels_on_sm90(kernels):
    """On sm_90 (H100/H200) no float32/float16/bfloat16 kernel spills or keeps an array in local memory."""
    bad = [f"{k[2]}: {k[4]}-byte stack, {k[3]} registers" for k in kernels
           if k[0] == "sm_90" and k[4] > 0 and "<double" not in k[2]]
    assert not bad, "\n".join(bad)


def test_stack_frames_stay_small(kernels):
    """Everywhere else at most a 16-byte stack frame (a few spilled values), never a local array such as
    the 128-byte per-thread frame a dynamically indexed 32-value accumulator takes."""
    bad = [f"{k[0]} {k[2]}: {k[4]}-byte stack" for k in kernels if k[4] > 16]
    assert not bad, "\n".join(bad)
