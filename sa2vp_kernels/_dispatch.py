"""Backend selection for every op, in one place.

Backends: ``"triton"``, ``"cuda"`` (compiled CUDA kernels), ``"cpu"`` (compiled C++ kernels),
``"reference"`` (pure PyTorch) and ``"auto"``.  A backend that cannot run on the given tensors is a
clear error; nothing falls back silently to another backend.
"""
from __future__ import annotations

import os

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return the concrete backend for running ``op`` on tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda:
            if _ext.has_kernel(op, "CUDA"):
                return "cuda"
            if triton_available():
                return "triton"
            return "reference"
        if device.type == "cpu" and _ext.has_kernel(op, "CPU"):
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, got tensors on {device}")
        _ext.require_kernel(op, "cpu")
    elif backend == "cuda":
        if not on_cuda:
            raise ValueError(f"backend='cuda' runs on CUDA tensors, got tensors on {device}")
        _ext.require_kernel(op, "cuda")
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not on_cuda and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
                f"got tensors on {device}"
            )
    return backend
