"""Float arguments of the Triton kernels, exact enough for float64.

On a GPU Triton passes a Python float to a kernel as float32, and so does Inductor when it compiles
the kernels itself, whatever the kernel declares; only the interpreter keeps the double. A float the
kernels need in float64 (a scale, eps, 1 / (1 - p)) therefore travels as two float32 values
``hi + lo`` (``hi`` is the float rounded to float32, ``lo`` the rest, rounded to float32): float64
kernels add them (relative error at most about 2**-48), the others use ``hi``, which is exactly what
float32 arithmetic with that float gives. ``python -m sa2vp_kernels.triton.aot`` reports any float
argument that float32 cannot hold exactly.
"""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl


def split_float(x: float) -> tuple[float, float]:
    """``(hi, lo)``, both exact float32 values, with ``hi + lo`` = ``x`` to about 2**-48 relative."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@triton.jit
def join_float(hi, lo, dtype: tl.constexpr):
    """The float split by ``split_float``, as a scalar of ``dtype`` (float32 kernels: ``hi`` alone)."""
    if dtype == tl.float64:
        return tl.full([], hi, tl.float64) + tl.full([], lo, tl.float64)
    else:
        return tl.full([], hi, dtype)
