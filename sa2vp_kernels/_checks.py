"""Argument checks shared by every public op (one place, clear messages naming the argument)."""
from __future__ import annotations

import contextlib
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


def autocast_device(first) -> str | None:
    """``"cpu"`` or ``"cuda"`` if ``first`` is a tensor there and ``torch.autocast`` is on for that device,
    else None (called on every op call, so it only reads attributes)."""
    if not isinstance(first, torch.Tensor):
        return None
    if first.is_cuda:
        device_type = "cuda"
    elif first.is_cpu:
        device_type = "cpu"
    else:
        return None
    return device_type if torch.is_autocast_enabled(device_type) else None


def autocast_inputs(device_type: str, *tensors) -> tuple:
    """The floating tensors among ``tensors`` in the one dtype an op computes in under autocast.

    Under autocast an op's inputs may come in mixed dtypes (16-bit activations from autocast matmuls
    beside float32 parameters and residual streams). The ops then compute in the widest of the dtypes,
    and at least in float32 on the CPU, whose kernels are float32/float64: bfloat16 activations under
    CPU autocast run the float32 kernels and give a float32 result, as autocast does for LayerNorm.
    The casts are differentiable, so each input's gradient comes back in its own dtype. Entries that
    are not floating tensors (None, or bad arguments for the checks to name) pass through unchanged.
    """
    try:  # the common case first: one dtype the kernels take, nothing to cast
        dtypes = {t.dtype for t in tensors if t is not None}
        if len(dtypes) == 1:
            (dtype,) = dtypes
            if dtype.is_floating_point and (device_type != "cpu" or dtype in CPU_DTYPES):
                return tensors
    except AttributeError:  # an entry that is not a tensor: the general case leaves it to the checks
        pass
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return tensors
    dtype = torch.float32 if device_type == "cpu" else floats[0].dtype
    for t in floats:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )


def autocast_off(device_type: str | None):
    """A context with autocast off for ``device_type`` (none needed when it is None): the pure-PyTorch
    references then compute in their inputs' dtype, as the kernels do. (The compiled and Triton ops are
    not on autocast's lists, so autocast leaves them alone either way.)"""
    return contextlib.nullcontext() if device_type is None else torch.autocast(device_type, enabled=False)
