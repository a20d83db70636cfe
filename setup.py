"""Build script for sa2vp-kernels.

Builds the extension ``sa2vp_kernels._C`` with ninja:

* the C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always;
* the CUDA kernels (``csrc/cuda/*.cu``) whenever ``nvcc`` is found, even on a machine without a GPU.
  ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` when unset.  Set ``SA2VP_SKIP_CUDA=1`` to skip them.

Install with ``pip install --no-build-isolation -e .`` (build isolation would fetch a second torch).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a symlink outside the toolkit.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cuda_wanted():
    if os.environ.get("SA2VP_SKIP_CUDA", "0") not in ("", "0"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _openmp_flags():
    """``-fopenmp`` when torch runs its CPU threads on OpenMP (the Linux wheels).

    ``at::parallel_for`` is a header template: compiled without ``-fopenmp`` it runs its loop serially on
    the calling thread, whatever ``torch.set_num_threads`` says. With it, the kernels share torch's
    OpenMP thread pool (the extension binds to the ``libgomp.so.1`` that torch has already loaded).
    """
    import torch

    if os.name == "nt":  # MSVC spells it /openmp; torch's Windows wheels are not a target here
        return []
    if not torch.backends.openmp.is_available():
        return []
    if not _compiler_has_openmp():
        print("WARNING: the C++ compiler cannot build with -fopenmp (is gcc's libgomp missing?): the CPU kernels "
              "of sa2vp_kernels will run on one thread; sa2vp_kernels.cpu_threads() reports 1", file=sys.stderr)
        return []
    return ["-fopenmp"]


def _compiler_has_openmp():
    """Whether the C++ compiler builds a shared library with ``-fopenmp`` (it needs gcc's libgomp)."""
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension uses
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint sa2vp_probe() {\n  int n = 0;\n#pragma omp parallel\n"
                    "  { n = omp_get_num_threads(); }\n  return n;\n}\n")
        cmd = [cxx, "-fopenmp", "-fPIC", "-shared", src, "-o", os.path.join(tmp, "omp_probe.so")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    link_flags = _openmp_flags()  # (compiles a probe: once)
    cxx_flags = ["-O3", "-fvisibility=hidden"] + link_flags
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _cuda_wanted():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "sa2vp_kernels._C",
                cpp_sources + rel("csrc/cuda/*.cu"),
                include_dirs=include_dirs,
                define_macros=[("SA2VP_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "sa2vp_kernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="sa2vp-kernels",
    version="0.1.0",
    description="Fused Triton/CUDA/C++ kernels and a fast SA2VP implementation on timm backbones",
    packages=find_packages(include=["sa2vp_kernels", "sa2vp_kernels.*", "sa2vp", "sa2vp.*"]),
    package_data={"sa2vp_kernels.triton": ["tuned/*.json"]},  # per-GPU launch settings (triton/tuning.py)
    python_requires=">=3.10",
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    entry_points={"console_scripts": ["sa2vp=sa2vp.cli:main"]},
    zip_safe=False,
)
