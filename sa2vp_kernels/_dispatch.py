"""Backend selection for every op, in one place.

Backends: ``"triton"``, ``"cuda"`` (compiled CUDA kernels), ``"cpu"`` (compiled C++ kernels),
``"reference"`` (pure PyTorch) and ``"auto"``.  A backend that cannot run on the given tensors is a
clear error; nothing falls back silently to another backend.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def eager_triton(*tensors) -> bool:
    """Whether a Triton op may run its launcher directly instead of through its ``torch.library``
    registration: in eager mode, on plain tensors or parameters, with no functorch transform or dispatch
    mode active.

    The registered op is what ``torch.compile``, export, opcheck and dispatch modes (fake tensors, flop
    counters) see, and it stays the path there. In eager mode its Python dispatch and generated autograd
    wrapper cost more host time than the work they wrap (bench/test_bench_host.py), which is most of an
    eager call on a GPU; a plain ``torch.autograd.Function`` around the launchers does the same work.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    # plain tensors and parameters (which disable __torch_function__); no other subclass
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)

try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # a torch whose wrap_triton has no such switch
    _set_wrap_triton_enabled = None


def direct_launches(*tensors):
    """Context for the launchers of an eager call (``eager_triton(*tensors)``): their
    ``wrap_triton(kernel)[grid](...)`` launches the kernel itself rather than through torch's
    higher-order-op dispatch, which only tracing needs and which costs hundreds of microseconds of
    host time per launch on a GPU (where the kernels take tens). The registered ``triton_op``s do
    the same for their real-tensor implementation. Where ``eager_triton`` is false (tracing, modes,
    subclasses) the launches keep going through ``wrap_triton``.
    """
    if _set_wrap_triton_enabled is None or not eager_triton(*tensors):
        return contextlib.nullcontext()
    return _set_wrap_triton_enabled(False)


def first_derivative_only(what: str):
    """Decorator of a ``torch.autograd.Function`` backward whose kernels have no derivative themselves.

    The backward runs without recording a graph. Under ``create_graph=True`` with incoming gradients or
    saved inputs that require grad, its results get a grad_fn that raises a clear error if a second
    derivative is ever taken through them (like the registered ops, whose backward ops have no
    autograd), instead of silently leaving them out of the graph.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            with torch.no_grad():
                outputs = fn(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            inputs = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not inputs:
                return outputs
            present = [i for i, o in enumerate(outputs) if o is not None]
            # One node over the results and the inputs they depend on: backpropagating from a result
            # reaches it (and raises) on the way to those inputs.
            err = torch._C._functions.DelayedError(
                f"{what} has no second derivative (the backward of its backward)".encode(),
                len(present) + len(inputs))
            aliased = err(*[outputs[i].detach() for i in present], *inputs)
            outputs = list(outputs)
            for i, t in zip(present, aliased):
                outputs[i] = t
            return tuple(outputs)

        return backward

    return decorate
