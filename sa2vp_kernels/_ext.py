"""Loading of the compiled extension ``sa2vp_kernels._C`` and queries about what it provides."""
from __future__ import annotations

import torch

_IMPORT_ERROR: BaseException | None = None
try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.sa2vp_kernels operators)
except ImportError as exc:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = exc

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(CUDA kernels are compiled when nvcc is found; SA2VP_SKIP_CUDA=1 skips them)"
)


def extension_available() -> bool:
    return _IMPORT_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``sa2vp_kernels::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if _IMPORT_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sa2vp_kernels::{op}", dispatch_key)


def require_kernel(op: str, backend: str) -> None:
    """Raise a clear error when the compiled ``backend`` ("cpu" or "cuda") of ``op`` is missing."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(
            f"backend={backend!r} needs the compiled extension sa2vp_kernels._C, which failed to import "
            f"({_IMPORT_ERROR}); {BUILD_HINT}"
        )
    key = "CUDA" if backend == "cuda" else "CPU"
    if not has_kernel(op, key):
        raise RuntimeError(
            f"backend={backend!r}: sa2vp_kernels._C was built without {key} kernels for {op!r}; {BUILD_HINT}"
        )


CPU_ISAS = ("generic", "avx2", "avx512")


def _require_extension():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"sa2vp_kernels._C failed to import ({_IMPORT_ERROR}); {BUILD_HINT}")


def cpu_isa() -> tuple[str, str]:
    """``(in_use, supported)``: the instruction set the float32 CPU kernels use now and the best one this
    processor supports, each ``"generic"``, ``"avx2"`` or ``"avx512"``.

    The environment variable ``SA2VP_CPU_ISA`` (one of those names) caps the one in use; it is read at
    every call of a CPU kernel.
    """
    _require_extension()
    in_use, supported = torch.ops.sa2vp_kernels.cpu_isa()
    return in_use, supported


def cpu_threads() -> int:
    """How many threads the CPU kernels run on now: ``torch.get_num_threads()`` (they share torch's
    OpenMP thread pool), or 1 when the extension was built without OpenMP (with a torch that has none).

    Measured, not looked up: one parallel loop of the kind every CPU kernel uses, counting the threads
    that ran it.
    """
    _require_extension()
    return int(torch.ops.sa2vp_kernels.cpu_threads())
