"""Every Triton kernel launch compiles for sm_90 and sm_80 (Triton's compiler + ptxas, no GPU needed).

The interpreter the other Triton tests use executes the kernels in numpy and never lowers them, so
it cannot see compile errors, shared-memory overflows or register spills. This test runs
``python -m sa2vp_kernels.triton.aot`` in a subprocess without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = {"local_cross_attention": "local_attn.py", "prompt_add": "prompt_add.py", "prompt_map": "prompt_map.py"}


def _entry_kernels(source: str) -> set[str]:
    """Names of the jitted ``*_kernel`` functions of a module (the ones its launchers start)."""
    return set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", source))


def _run_aot(tmp_path, *args):
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "sa2vp_kernels.triton.aot", *args, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"no results written (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    return _run_aot(tmp_path_factory.mktemp("aot90"), "--arch", "90")


def test_every_launch_compiles_for_sm90(sm90):
    proc, rows = sm90
    failed = [f"{r['op']} / {r['case']} / {r['kernel']}: {r['error'] or 'shared ' + str(r['shared'])}"
              for r in rows if not r["fits"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert all(r["arch"] == 90 and r["registers"] > 0 and r["shared"] <= 232448 for r in rows)


def test_float_arguments_reach_the_gpu_unrounded(sm90):
    """A Python float becomes a float32 kernel argument on a GPU (the interpreter keeps the double):
    every float the launchers pass fits float32 exactly (floats needed in float64 travel as float32
    pairs, sa2vp_kernels/triton/_scalars.py). (A float64 prompt_add on a GPU once used scale, eps and
    1 / (1 - p) rounded to float32.)"""
    _, rows = sm90
    lossy = [f"{r['op']} / {r['case']} / {r['kernel']}: {r['lossy_floats']}" for r in rows if r["lossy_floats"]]
    assert not lossy, "\n".join(lossy)


def test_no_float32_dot_runs_in_tf32(sm90):
    """Every dot on float32 operands is exact (FMAs): none in TF32, explicit or made by the compiler.
    (Triton 3.6 turns a broadcast-and-sum over 16 or more channels into a TF32 dot on its own; the
    Triton of this environment may not, so this guards the package on the GPU machines' Triton.)"""
    _, rows = sm90
    tf32 = [f"{r['op']} / {r['case']} / {r['kernel']}: {r['tf32_dots']}" for r in rows if r["tf32_dots"]]
    assert not tf32, "\n".join(tf32)


def test_every_kernel_is_covered(sm90):
    _, rows = sm90
    for op, filename in OPS.items():
        expected = _entry_kernels((ROOT / "sa2vp_kernels" / "triton" / filename).read_text())
        assert expected, f"no kernels found in {filename}"
        compiled = {r["kernel"] for r in rows if r["op"] == op}
        assert compiled == expected, f"{op}: compiled {sorted(compiled)}, kernels {sorted(expected)}"


def test_benchmark_shapes_do_not_spill(sm90):
    """The configurations the GPU benchmarks time keep everything in registers on sm_90."""
    _, rows = sm90
    bench = [r for r in rows if r["case"].startswith("bench")]
    assert {r["op"] for r in bench} == set(OPS)
    spilled = [f"{r['op']} / {r['case']} / {r['kernel']}: {r['spill_stores']} B" for r in bench
               if r["spill_stores"] != 0 or r["spill_loads"] != 0]
    assert not spilled, "\n".join(spilled)


def test_prompt_add_shared_memory_estimate(sm90):
    """The launcher's estimate of the row kernels' shared memory (its guard against tiles a GPU cannot
    hold) is never below what the compiler allocates."""
    import torch
    from sa2vp_kernels.triton import prompt_add as tp
    _, rows = sm90
    checked = 0
    for r in rows:
        if r["op"] == "prompt_add" and r["kernel"] not in ("_bwd_cols_kernel", "_bwd_finalize_kernel") and r["ok"]:
            c = r["constexprs"]
            estimate = tp._tile_shared_bytes(c["BLOCK_M"], c["BLOCK_C"], c["BLOCK_R"], getattr(torch, r["dtype"]),
                                             wide="wide" in r["kernel"])
            assert r["shared"] <= estimate, (r["case"], r["kernel"], r["shared"], estimate)
            checked += 1
    assert checked >= 16


def test_benchmark_shapes_compile_for_sm80(tmp_path):
    proc, rows = _run_aot(tmp_path, "--arch", "80", "--quick")
    assert rows and all(r["arch"] == 80 for r in rows)
    failed = [f"{r['op']} / {r['kernel']}: {r['error'] or 'shared ' + str(r['shared'])}" for r in rows if not r["fits"]]
    assert not failed, "\n".join(failed)
    assert all(r["shared"] <= 166912 for r in rows)
    assert proc.returncode == 0


def test_refuses_to_run_interpreted(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "sa2vp_kernels.triton.aot", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


def test_bad_arch_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sa2vp_kernels.triton.aot", "--arch", "7"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "arch must be" in proc.stderr
