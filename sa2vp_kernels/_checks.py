"""Argument checks shared by every public op (one place, clear messages naming the argument)."""
from __future__ import annotations

from typing import Sequence

import torch

CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")


def check_dtype_for_device(name: str, t: torch.Tensor) -> None:
    allowed = CPU_DTYPES if t.device.type == "cpu" else GPU_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}; on {t.device.type} the supported dtypes are {names}")


def check_same(ref_name: str, ref: torch.Tensor, others: dict) -> None:
    """All tensors in ``others`` share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_grid(grid) -> tuple[int, int]:
    if isinstance(grid, int) or not isinstance(grid, Sequence) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (height, width) of positive ints, got {grid!r}")
    gh, gw = grid
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in (gh, gw)) or gh < 1 or gw < 1:
        raise ValueError(f"grid must be a pair (height, width) of positive ints, got {grid!r}")
    return int(gh), int(gw)


def check_int(name: str, value, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
