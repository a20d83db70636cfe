"""Compile every Triton kernel launch of the package for a GPU architecture, without a GPU.

    python -m sa2vp_kernels.triton.aot [--arch 90 --arch 80] [--quick] [--json FILE]

The launchers of the three Triton ops run on ``meta`` tensors (no memory, no device) with
``wrap_triton`` replaced by a recorder, so each records exactly the kernels, arguments, constexprs
and launch options it would use on a GPU for that shape and dtype. Each recorded launch is then
bound the way Triton's JIT binds a real launch (same argument specialisation) and compiled down to
a cubin for the requested ``sm_XX`` target with Triton's own compiler and ``ptxas``. The report
lists, per kernel and configuration, the registers per thread, spill stores/loads and the shared
memory each program needs, and flags configurations that could not launch on that architecture
(shared memory over the per-block limit) or that failed to compile.

What this catches before a GPU run: compile errors that the interpreter (``TRITON_INTERPRET=1``,
which executes the kernels in numpy) never sees, such as invalid ``tl.dot`` shapes, dtype mismatches
in the MLIR lowering and non-constexpr block sizes; shared-memory budgets; register spills. It does
not run anything: numerical correctness on the GPU is the ``gpu`` tests' job.

Needs a Triton with the NVIDIA backend (it ships its own ``ptxas``) and ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

# Largest dynamic shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@dataclass
class Launch:
    """One recorded kernel launch."""

    op: str
    case: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Result:
    op: str
    case: str
    kernel: str
    arch: int
    ok: bool
    seconds: float
    num_warps: int = 0
    num_stages: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    shared_limit: int = 0
    constexprs: dict = field(default_factory=dict)
    dtype: str = ""  # of the first tensor argument
    error: str = ""
    # float arguments a GPU launch would round: a Python float goes to the kernel as float32 unless its
    # parameter is annotated tl.float64, and as float32 under Inductor even then (the interpreter keeps
    # the full double, so only this sees it)
    lossy_floats: list = field(default_factory=list)
    # tl.dot operations the compiler runs in TF32 (Triton 3.6 turns some broadcast-and-sum reductions of
    # float32 into dots in TF32 on its own; every dot of this package is meant to be exact)
    tf32_dots: int = 0

    @property
    def fits(self) -> bool:
        return self.ok and 0 <= self.shared <= self.shared_limit


# ---------------------------------------------------------------------------------------------------
# Cases: the shapes the GPU benchmarks and tests use, plus odd ones.
# ---------------------------------------------------------------------------------------------------

def _attention_cases(quick: bool):
    import torch
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # (label, B, heads, grid_h, grid_w, head_dim, num_prefix, window, dtype)
    cases = [
        ("bench 12x64 bf16", 64, 12, 14, 14, 64, 1, 3, bf16),
        ("bench 1x768 bf16", 64, 1, 14, 14, 768, 1, 3, bf16),
    ]
    if not quick:
        cases += [
            ("12x64 fp16", 2, 12, 14, 14, 64, 1, 3, fp16),
            ("12x64 fp32", 2, 12, 14, 14, 64, 1, 3, fp32),
            ("1x768 fp32", 2, 1, 14, 14, 768, 1, 3, fp32),
            ("head_dim 40, 5x4, 3 prefix, window 5", 2, 3, 5, 4, 40, 3, 5, bf16),
            ("head_dim 24 fp32, 7x7, no prefix", 2, 1, 7, 7, 24, 0, 3, fp32),
            ("64x64 grid bf16", 2, 12, 64, 64, 64, 1, 3, bf16),
            ("window 7, 20x37 grid fp16", 2, 4, 20, 37, 32, 1, 7, fp16),
            ("window 9, 32x32 grid (window-walking) bf16", 2, 2, 32, 32, 64, 1, 9, bf16),
            ("window 17, 20x40 grid (window-walking) fp32", 2, 1, 20, 40, 768, 2, 17, fp32),
        ]
    return cases


def _record_attention(quick: bool):
    import torch
    from . import local_attn as mod
    fwd, bwd = mod.local_attn_fwd, mod.local_attn_bwd
    cases = _attention_cases(quick)
    # the forward with the prefix queries fused into the grid tiles (FWD_FUSED_PREFIX), where it applies
    # (and the bench shapes also with the values loaded early, FWD_EARLY_V)
    fused = [(f"{c[0]} fused prefix", *c[1:]) for c in cases if 1 <= c[6] <= mod._FUSED_PREFIX_MAX
             and "window-walking" not in c[0] and "64x64" not in c[0]]
    fused += [(f"{c[0]} fused prefix early-v", *c[1:]) for c in cases if c[0].startswith("bench")]
    # and with each prefix query's keys split among programs (FWD_PREFIX_SPLITS), off the bench shapes
    # (their splits are among the tune settings below)
    split = [(f"{c[0]} split prefix", *c[1:]) for c in cases if c[6] >= 1 and not c[0].startswith("bench")
             and "window-walking" not in c[0]]
    # and the row-streaming forward and backward (FWD_STREAM, BWD_STREAM) wherever they apply, whatever the batch
    stream = [(f"{c[0]} stream", *c[1:]) for c in cases
              if mod._stream_fits(mod._STREAM_MIN_PROGRAMS, c[4], c[7], c[6], c[5])]
    defaults = (mod.FWD_FUSED_PREFIX, mod.BWD_FUSED_PREFIX, mod.FWD_EARLY_V, mod.FWD_PREFIX_SPLITS, mod.FWD_STREAM,
                mod.BWD_STREAM, mod._STREAM_MIN_PROGRAMS)
    for label, B, H, gh, gw, D, T, window, dtype in cases + fused + split + stream:
        N = T + gh * gw
        q, k, v = (torch.empty((B, H, N, D), dtype=dtype, device="meta") for _ in range(3))
        mod.FWD_FUSED_PREFIX = mod.BWD_FUSED_PREFIX = "fused prefix" in label
        mod.FWD_EARLY_V = label.endswith("early-v")
        mod.FWD_PREFIX_SPLITS = 4 if label.endswith("split prefix") else 0
        mod.FWD_STREAM = mod.BWD_STREAM = label.endswith(" stream")
        mod._STREAM_MIN_PROGRAMS = 1
        try:
            with _recording(mod, "local_cross_attention", label) as rec:
                out, lse = fwd(q, k, v, gh, gw, window, T, False, D ** -0.5)
                bwd(torch.empty_like(out), q, k, v, out, lse, gh, gw, window, T, False, D ** -0.5)
        finally:
            (mod.FWD_FUSED_PREFIX, mod.BWD_FUSED_PREFIX, mod.FWD_EARLY_V, mod.FWD_PREFIX_SPLITS, mod.FWD_STREAM,
             mod.BWD_STREAM, mod._STREAM_MIN_PROGRAMS) = defaults
        yield from rec
    if quick:
        return
    # the forward launch settings bench/gpu_variants.py times (and a tuned file may choose), at the
    # benchmark shapes
    from . import tuning
    for label, B, H, gh, gw, D, T, window, dtype in [c for c in cases if c[0].startswith("bench")]:
        q, k, v = (torch.empty((B, H, T + gh * gw, D), dtype=dtype, device="meta") for _ in range(3))
        for settings in mod.TUNE_SETTINGS:
            with tuning.override(local_attention=settings), \
                    _recording(mod, "local_cross_attention", f"{label} tune {mod.settings_label(settings)}") as rec:
                fwd(q, k, v, gh, gw, window, T, False, D ** -0.5)
            yield from rec


def _record_prompt_add(quick: bool):
    import torch
    from . import prompt_add as mod
    fwd, bwd = mod.prompt_add_fwd, mod.prompt_add_bwd
    # (label, B, N, C, r, deep, dropout_p, dtype)
    cases = [("bench C=768 r=16 bf16 p=0.1 deep", 64, 197, 768, 16, True, 0.1, torch.bfloat16)]
    if not quick:
        cases += [
            ("C=768 r=16 fp32 p=0", 4, 197, 768, 16, False, 0.0, torch.float32),
            ("C=768 r=64 fp16 p=0.1", 4, 197, 768, 64, False, 0.1, torch.float16),
            ("C=1024 r=8 bf16", 4, 197, 1024, 8, True, 0.0, torch.bfloat16),
            ("C=2048 r=16 bf16", 2, 7, 2048, 16, True, 0.1, torch.bfloat16),
            ("C=1024 r=16 fp32", 2, 7, 1024, 16, True, 0.1, torch.float32),
            ("C=1280 r=16 fp32 (chunked rows)", 2, 7, 1280, 16, True, 0.1, torch.float32),
            ("C=1024 r=64 fp32 (chunked rows)", 2, 7, 1024, 64, False, 0.0, torch.float32),
            ("C=4096 r=16 bf16 (chunked rows)", 2, 7, 4096, 16, True, 0.1, torch.bfloat16),
            ("C=40 r=3 fp32", 3, 7, 40, 3, True, 0.1, torch.float32),
            ("C=100 r=17 bf16", 3, 21, 100, 17, False, 0.0, torch.bfloat16),
        ]
    for label, B, N, C, r, deep, p, dtype in cases:
        def t(*shape):
            return torch.empty(shape, dtype=dtype, device="meta")
        with _recording(mod, "prompt_add", label) as rec:
            out, mean, rstd, z = fwd(t(B, N, C), t(B, N, C), t(C), t(C), t(r, C), t(r), t(C, r), t(C),
                                     t(1, N, C) if deep else None, t(C) if deep else None, 0.7, p, 1e-6, 1234)
            bwd(torch.empty_like(out), t(B, N, C), mean, rstd, z, t(C), t(C), t(r, C), t(r), t(C, r), 0.7, p, 1234)
        yield from rec
    if quick:
        return
    # the forward launch configurations bench/gpu_variants.py times (and a tuned file may choose; the
    # backward keeps the default's), at the benchmark shape
    from . import tuning
    label, B, N, C, r, deep, p, dtype = cases[0]
    for m, w, c in mod.TUNE_CONFIGS:
        def t(*shape):
            return torch.empty(shape, dtype=dtype, device="meta")
        settings = {k: v for k, v in zip(("block_m", "num_warps", "block_c"), (m, w, c)) if v}
        with tuning.override(prompt_add=settings), \
                _recording(mod, "prompt_add", f"{label} tune m{m} w{w} c{c}") as rec:
            fwd(t(B, N, C), t(B, N, C), t(C), t(C), t(r, C), t(r), t(C, r), t(C), t(1, N, C) if deep else None,
                t(C) if deep else None, 0.7, p, 1e-6, 1234)
        yield from rec


def _record_prompt_map(quick: bool):
    import torch
    from . import prompt_map as mod
    fwd, bwd = mod.prompt_map_fwd, mod.prompt_map_bwd
    # (label, grid, embed grid, C, r, num_prefix, dtype)
    cases = [("bench 14x14 C=768 r=16 bf16", (14, 14), (14, 14), 768, 16, 1, torch.bfloat16)]
    if not quick:
        cases += [
            ("28x28 from 14x14 fp32", (28, 28), (14, 14), 768, 16, 1, torch.float32),
            ("7x9 from 5x4 r=3 C=40 fp16", (7, 9), (5, 4), 40, 3, 3, torch.float16),
            ("14x14 from 20x21 r=64 bf16", (14, 14), (20, 21), 768, 64, 0, torch.bfloat16),
        ]
    for label, (gh, gw), (eh, ew), C, r, T, dtype in cases:
        def t(*shape):
            return torch.empty(shape, dtype=dtype, device="meta")
        with _recording(mod, "prompt_map", label) as rec:
            out = fwd(t(T + eh * ew, r), t(C, r), t(C), t(1, T + gh * gw, C), gh, gw, eh, ew, T)
            bwd(torch.empty_like(out), t(T + eh * ew, r), t(C, r), gh, gw, eh, ew, T)
        yield from rec


@contextlib.contextmanager
def _recording(module, op: str, case: str):
    """Replace ``module.wrap_triton`` by a recorder of launches (nothing runs)."""
    launches: list[Launch] = []

    def fake_wrap_triton(kernel):
        class _Indexed:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(Launch(op, case, kernel, tuple(grid), args, dict(kwargs)))
                return launch
        return _Indexed()

    saved = module.wrap_triton
    module.wrap_triton = fake_wrap_triton
    try:
        yield launches
    finally:
        module.wrap_triton = saved


# ---------------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------------

class _MetaArg:
    """What Triton's binder reads from a tensor argument, for a meta tensor (16-byte aligned)."""

    def __init__(self, t):
        self.dtype = t.dtype

    def data_ptr(self):
        return 0


def _resource_usage(cubin: bytes) -> dict:
    """Registers, spill stores/loads and static shared memory of a cubin, from ``cuobjdump``."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared_static"),
                      ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            usage[name] = int(m.group(1))
    return usage


def _spills(ptx: str, arch: int) -> tuple[int, int]:
    """Spill stores/loads as ptxas reports them (``-v``)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(tool):
        tool = "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_flag = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
        proc = subprocess.run([tool, "-v", f"--gpu-name={arch_flag}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr + proc.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def compile_launch(launch: Launch, arch: int) -> Result:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    result = Result(launch.op, launch.case, name, arch, ok=False, seconds=0.0,
                    shared_limit=SHARED_LIMIT.get(arch, 101376),
                    dtype=next((str(a.dtype).replace("torch.", "") for a in launch.args if hasattr(a, "dtype")), ""))
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = tuple(_MetaArg(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
        kwargs = dict(launch.kwargs)
        kwargs.setdefault("debug", False)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        md = compiled.metadata
        result.num_warps, result.num_stages = md.num_warps, md.num_stages
        result.shared = int(md.shared)
        usage = _resource_usage(compiled.asm["cubin"])
        result.registers = usage.get("registers", -1)
        result.spill_stores, result.spill_loads = _spills(compiled.asm["ptx"], arch)
        names = [p.name for p in fn.params]
        result.constexprs = {names[path[0]]: value for path, value in constexprs.items()
                             if len(path) == 1 and isinstance(value, (int, float, bool))}
        # (16-bit operands carry the attribute too, where it changes nothing: only float32 ones count)
        result.tf32_dots = len(re.findall(r"inputPrecision = tf32 : tensor<[0-9x]+xf32\b",
                                          compiled.asm.get("ttgir", "")))
        result.ok = True
    except Exception as exc:  # reported, not raised: one failing config must not hide the others
        result.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
    result.lossy_floats = lossy_float_args(launch)
    result.seconds = time.perf_counter() - start
    return result


def lossy_float_args(launch: Launch) -> list[str]:
    """Names of the parameters that receive a Python float that float32 cannot hold exactly, without
    a ``tl.float64`` annotation: on a GPU (not in the interpreter) the kernel would see it rounded."""
    import numpy as np
    params = launch.kernel.params
    values = dict(zip((p.name for p in params), launch.args))
    values.update(launch.kwargs)
    lossy = []
    for p in params:
        v = values.get(p.name)
        if (isinstance(v, float) and not p.is_constexpr and p.annotation_type != "fp64"
                and float(np.float32(v)) != v):
            lossy.append(p.name)
    return lossy


def record(quick: bool = False, ops: tuple[str, ...] = ("local_cross_attention", "prompt_add", "prompt_map")):
    """All distinct launches of the cases (a kernel with identical constexprs and options once)."""
    recorders = {"local_cross_attention": _record_attention, "prompt_add": _record_prompt_add,
                 "prompt_map": _record_prompt_map}
    unknown = set(ops) - set(recorders)
    if unknown:
        raise ValueError(f"ops must be among {sorted(recorders)}, got {sorted(unknown)}")
    seen, launches = set(), []
    for op in ops:
        for launch in recorders[op](quick):
            fn = launch.kernel
            constexpr_names = {p.name for p in fn.params if p.is_constexpr}
            sig = tuple((k, v) for k, v in sorted(launch.kwargs.items()) if k in constexpr_names or k.startswith("num_"))
            dtypes = tuple(str(a.dtype) for a in launch.args if hasattr(a, "dtype"))
            key = (fn.fn.__name__, sig, dtypes)
            if key not in seen:
                seen.add(key)
                launches.append(launch)
    return launches


def check(archs=(90,), quick=False, ops=("local_cross_attention", "prompt_add", "prompt_map"), progress=True):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted Python, there is nothing "
                           "to compile (unset it)")
    for arch in archs:
        if not isinstance(arch, int) or arch < 70:
            raise ValueError(f"arch must be an integer compute capability such as 80 or 90, got {arch!r}")
    launches = record(quick, tuple(ops))
    results = []
    total = len(launches) * len(archs)
    for arch in archs:
        for launch in launches:
            res = compile_launch(launch, arch)
            results.append(res)
            if progress:
                status = "ok" if res.fits else ("SHARED" if res.ok else "FAILED")
                print(f"[{len(results)}/{total}] sm_{arch} {res.op} / {res.case} / {res.kernel}: {status} "
                      f"regs {res.registers} spills {res.spill_stores}/{res.spill_loads} "
                      f"shared {res.shared} ({res.seconds:.1f} s)", file=sys.stderr, flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability to compile for, e.g. 90 (H100/H200) or 80 (A100); repeatable "
                             "(default: 90)")
    parser.add_argument("--quick", action="store_true", help="only the benchmark shapes")
    parser.add_argument("--op", action="append", choices=["local_cross_attention", "prompt_add", "prompt_map"],
                        help="restrict to one op (repeatable)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    ops = tuple(args.op) if args.op else ("local_cross_attention", "prompt_add", "prompt_map")
    try:
        results = check(tuple(args.arch or [90]), args.quick, ops)
    except (RuntimeError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    rows = [asdict(r) | {"fits": r.fits} for r in results]
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    bad = [r for r in results if not r.fits]
    lossy = [r for r in results if r.lossy_floats]
    tf32 = [r for r in results if r.tf32_dots]
    spilled = [r for r in results if r.ok and r.spill_stores > 0]
    print(f"{len(results)} kernel configurations, {len(bad)} failed or over the shared-memory limit, "
          f"{len(spilled)} with register spills, {len(lossy)} rounding float arguments to float32, "
          f"{len(tf32)} with TF32 dots")
    for r in lossy:
        print(f"  float32 rounding: {r.op} / {r.case} / {r.kernel}: {', '.join(r.lossy_floats)}")
    for r in tf32:
        print(f"  TF32 dots: sm_{r.arch} {r.op} / {r.case} / {r.kernel}: {r.tf32_dots}")
    for r in bad:
        print(f"  sm_{r.arch} {r.op} / {r.case} / {r.kernel}: "
              + (r.error.splitlines()[0] if r.error else f"shared {r.shared} > {r.shared_limit}"))
    for r in spilled:
        print(f"  spills: sm_{r.arch} {r.op} / {r.case} / {r.kernel}: {r.spill_stores} B stores, "
              f"{r.spill_loads} B loads, {r.registers} registers")
    return 1 if bad or lossy or tf32 else 0


if __name__ == "__main__":
    sys.exit(main())
