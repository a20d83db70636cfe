"""Shared pieces of the benchmarks: workloads, providers (our backends and the alternatives), timing,
byte counts and the results file.

Used by the pytest-benchmark suites (``bench/test_bench_*.py``) and by the GPU script
(``bench/run_gpu.py``).  A provider that cannot run on this machine raises :class:`Unavailable`; the
suites skip it and the GPU script records the reason.

Cost model (``/work/shared/SA2VP.md``): every op here is memory-bound, so each workload counts the
fewest bytes it must move (every input read once, every output written once) and results quote the
achieved fraction of the card's measured copy bandwidth.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

PASSES = ("fwd", "bwd", "fwd+bwd")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")
ATTN_PEERS = ("reference", "sdpa_masked", "flex", "natten")
# Error messages of sa2vp_kernels' backend resolution that mean "this backend cannot run here".
_UNAVAILABLE_MARKERS = (
    "needs the compiled extension",
    "was built without",
    "runs on CUDA tensors",
    "runs on CPU tensors",
    "needs the triton package",
    "unavailable",
    "not available",
)


class Unavailable(Exception):
    """A provider cannot run on this machine (missing backend, package or feature)."""


def is_unavailable_error(exc: BaseException) -> bool:
    return isinstance(exc, Unavailable) or (
        isinstance(exc, (RuntimeError, ValueError, ImportError, NotImplementedError))
        and any(m in str(exc) for m in _UNAVAILABLE_MARKERS)
    )


def use_triton_interpreter_without_gpu() -> None:
    """Run Triton kernels under the interpreter on machines without a GPU (call before importing triton)."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------
# sa2vp_kernels ops and backends
# ---------------------------------------------------------------------------------------------------

def get_op(name: str) -> Callable:
    """The public functional op ``sa2vp_kernels.<name>``, or :class:`Unavailable` if it is not importable."""
    import sa2vp_kernels

    op = getattr(sa2vp_kernels, name, None)
    if op is None or not callable(op):
        try:
            module = importlib.import_module(f"sa2vp_kernels.{name}")
        except ImportError as exc:
            raise Unavailable(f"sa2vp_kernels.{name} is not importable ({exc})") from None
        op = getattr(module, name, None)
    if op is None or not callable(op):
        raise Unavailable(f"sa2vp_kernels.{name} is not importable")
    return op


def check_backend(backend: str, device: torch.device, schema_op: str) -> None:
    """Raise :class:`Unavailable` unless ``backend`` of ``sa2vp_kernels::<schema_op>`` runs on ``device``."""
    from sa2vp_kernels._dispatch import resolve_backend

    try:
        resolve_backend(backend, torch.device(device), schema_op)
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(str(exc)) from None
    if backend == "triton":
        import sa2vp_kernels  # noqa: F401  (importing registers the Triton ops)

        if not hasattr(torch.ops.sa2vp_kernels, f"{schema_op}_triton"):
            raise Unavailable(f"the Triton op sa2vp_kernels::{schema_op}_triton is not registered")
    elif backend in ("cpu", "cuda") and not hasattr(torch.ops.sa2vp_kernels, schema_op):
        raise Unavailable(f"the compiled op sa2vp_kernels::{schema_op} is not registered")


def kernel_backends(device: torch.device) -> tuple[str, ...]:
    """The compiled/Triton backends worth timing on ``device`` (Triton's CPU interpreter is not)."""
    return ("triton", "cuda") if torch.device(device).type == "cuda" else ("cpu",)


def isa_variants(device: torch.device) -> tuple[str, ...]:
    """The ``cpu`` backend capped to lower instruction sets (bench/conftest.py's ``isa_backend``)."""
    return () if torch.device(device).type == "cuda" else ("cpu-avx2", "cpu-generic")


# ---------------------------------------------------------------------------------------------------
# Workloads: rotating input sets, the call, what to differentiate, bytes moved
# ---------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """One provider on one case, ready to time.

    ``args[i]`` are the call arguments of input set ``i`` (sets rotate so nothing stays in cache) and
    ``wrt[i]`` the tensors its backward differentiates with respect to.
    """

    forward: Callable
    args: list
    wrt: list
    note: str = ""
    differentiable: bool = True
    douts: list = field(default_factory=list)

    def ensure_douts(self, seed: int = 1234) -> torch.Tensor:
        """Run the forward once (also a warm-up/compile) and draw one output gradient per input set."""
        out = self.forward(*self.args[0])
        if not self.douts:
            g = torch.Generator(device=out.device).manual_seed(seed)
            self.douts = [torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=g)
                          for _ in self.args]
        return out

    def runner(self, pass_: str) -> Callable[[], object]:
        """A zero-argument callable running ``pass_`` on the next input set at every call."""
        if pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
        if pass_ != "fwd" and not self.differentiable:
            raise Unavailable(f"no backward here ({self.note})")
        self.ensure_douts()
        order = itertools.cycle(range(len(self.args)))
        forward, args, wrt, douts = self.forward, self.args, self.wrt, self.douts
        if pass_ == "fwd":
            def run():
                return forward(*args[next(order)])
        elif pass_ == "fwd+bwd":
            def run():
                i = next(order)
                return torch.autograd.grad(forward(*args[i]), wrt[i], douts[i])
        else:
            outs = [forward(*a) for a in args]

            def run():
                i = next(order)
                return torch.autograd.grad(outs[i], wrt[i], douts[i], retain_graph=True)
        return run


def input_sets(device: torch.device, seed: int, n_sets: int, make: Callable[[torch.Generator], tuple]) -> list:
    """``n_sets`` independent random input tuples from ``make(generator)``."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [make(g) for _ in range(n_sets)]


def rotation(set_bytes: int, device: torch.device, minimum: int = 2, maximum: int = 8) -> int:
    """How many input sets to rotate so that together they are at least 4x the last-level cache."""
    dev = torch.device(device)
    if dev.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20) or (64 << 20)
    else:
        l2 = 32 << 20
    return max(minimum, min(maximum, -(-4 * l2 // max(set_bytes, 1))))


def randn(shape, g, device, dtype, requires_grad=False):
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------
# Local cross attention
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttnCase:
    batch: int
    heads: int
    head_dim: int
    grid: tuple
    window: int = 3
    num_prefix: int = 1
    border: str = "clip"
    dtype: torch.dtype = torch.float32

    @property
    def tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def label(self) -> str:
        return (f"B{self.batch} N{self.tokens} {self.heads}x{self.head_dim} w{self.window} "
                f"{self.border} {dtype_name(self.dtype)}")

    def params(self) -> dict:
        return {"B": self.batch, "N": self.tokens, "grid": list(self.grid), "heads": self.heads,
                "head_dim": self.head_dim, "window": self.window, "num_prefix": self.num_prefix,
                "border": self.border, "dtype": dtype_name(self.dtype)}

    def tensor_bytes(self) -> int:
        return self.batch * self.tokens * self.width * torch.empty((), dtype=self.dtype).element_size()

    def bytes(self, pass_: str) -> int:
        """Fewest bytes moved: fwd reads q, k, v and writes o; bwd reads q, k, v, o, dO, writes dq, dk, dv."""
        return {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[pass_] * self.tensor_bytes()


def neighbourhood_mask(grid, window: int, num_prefix: int, device) -> torch.Tensor:
    """(N, N) bool mask with our semantics (clip border): prefix rows see everything, a grid row only
    the grid keys in its window."""
    gh, gw = grid
    T, rad = num_prefix, window // 2
    ys = torch.arange(gh, device=device).repeat_interleave(gw)
    xs = torch.arange(gw, device=device).repeat(gh)
    near = ((ys[:, None] - ys[None, :]).abs() <= rad) & ((xs[:, None] - xs[None, :]).abs() <= rad)
    mask = torch.zeros(T + gh * gw, T + gh * gw, dtype=torch.bool, device=device)
    mask[:T] = True
    mask[T:, T:] = near
    return mask


@functools.lru_cache(maxsize=None)
def _flex_block_mask(grid: tuple, window: int, num_prefix: int, device: str):
    """One block mask (and mask_mod) per neighbourhood, so compiled FlexAttention is reused, not recompiled."""
    from torch.nn.attention.flex_attention import create_block_mask

    T, gw, rad = num_prefix, grid[1], window // 2
    N = T + grid[0] * grid[1]

    def mask_mod(b, h, q_idx, kv_idx):
        qg, kg = q_idx - T, kv_idx - T
        near = ((qg // gw - kg // gw).abs() <= rad) & ((qg % gw - kg % gw).abs() <= rad)
        return (q_idx < T) | ((kv_idx >= T) & near)

    return create_block_mask(mask_mod, None, None, N, N, device=device)


_COMPILED_FLEX = None


def compile_for_benchmarks(fn):
    """``torch.compile(fn)`` set up for timing: backward passes may be replayed on a retained graph (the
    "bwd" pass), and many shapes may be compiled without Dynamo falling back to eager mode once its
    default recompilation limit (8) is reached."""
    import torch._dynamo
    import torch._functorch.config

    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, dynamic=False)


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = compile_for_benchmarks(flex_attention)
    return _COMPILED_FLEX


def attention_workload(provider: str, case: AttnCase, device, *, n_sets: int = 2, seed: int = 0,
                       compile_flex: bool = True) -> Workload:
    """``provider`` of local cross attention on ``case``: one of :data:`KERNEL_BACKENDS` (through
    ``sa2vp_kernels.local_cross_attention``) or :data:`ATTN_PEERS`."""
    device = torch.device(device)
    grid, window, T, border, scale = case.grid, case.window, case.num_prefix, case.border, case.scale
    note = ""
    prepare = None
    differentiable = True
    if provider in KERNEL_BACKENDS:
        from sa2vp_kernels import local_cross_attention

        check_backend(provider, device, "local_attn_fwd")

        def forward(q, k, v):
            return local_cross_attention(q, k, v, grid, window=window, num_prefix=T, border=border,
                                         backend=provider)
    elif provider == "reference":
        from sa2vp_kernels.reference import local_cross_attention_vectorized

        def forward(q, k, v):
            return local_cross_attention_vectorized(q, k, v, grid, window, T, border, scale)
    elif provider == "sdpa_masked":
        if border != "clip":
            raise Unavailable("a boolean attention mask cannot express border='zero'")
        mask = neighbourhood_mask(grid, window, T, device)
        note = "dense F.scaled_dot_product_attention with a (N, N) boolean neighbourhood mask"

        def forward(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif provider == "flex":
        if border != "clip":
            raise Unavailable("a FlexAttention block mask cannot express border='zero'")
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as exc:
            raise Unavailable(f"FlexAttention is not available in torch {torch.__version__} ({exc})") from None
        block_mask = _flex_block_mask(tuple(grid), window, T, str(device))
        attend = _compiled_flex() if compile_flex else flex_attention
        note = "torch.nn.attention.flex_attention with a block mask" + (", torch.compile'd" if compile_flex else ", eager")
        differentiable = device.type != "cpu"  # FlexAttention has no backward on the CPU

        def forward(q, k, v):
            return attend(q, k, v, block_mask=block_mask, scale=scale)
    elif provider == "natten":
        try:
            from natten.functional import na2d
        except ImportError as exc:
            raise Unavailable(f"NATTEN is not importable ({exc})") from None
        gh, gw = grid
        note = "NATTEN na2d on the grid tokens only (no prefix); its window shifts at the border (timing only)"

        def prepare(q, k, v):
            return tuple(t.detach()[:, :, T:].reshape(case.batch, case.heads, gh, gw, case.head_dim)
                         .permute(0, 2, 3, 1, 4).contiguous().requires_grad_(True) for t in (q, k, v))

        def forward(q, k, v):
            return na2d(q, k, v, kernel_size=window, scale=scale)
    else:
        raise ValueError(f"unknown attention provider {provider!r}")

    shape = (case.batch, case.heads, case.tokens, case.head_dim)

    def make(g):
        qkv = tuple(randn(shape, g, device, case.dtype, requires_grad=differentiable) for _ in range(3))
        return prepare(*qkv) if prepare is not None else qkv

    sets = input_sets(device, seed, n_sets, make)
    return Workload(forward, sets, sets, note, differentiable)


def attention_errors(workload: Workload, case: AttnCase) -> dict:
    """Relative errors (||x - ref|| / ||ref||) of the output and of the input gradients on input set 0,
    against the vectorised reference in float32 (float64 for float64 inputs)."""
    from sa2vp_kernels.reference import local_cross_attention_vectorized

    q, k, v = workload.args[0]
    ref_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v))
    workload.ensure_douts()
    dout = workload.douts[0]
    ref = local_cross_attention_vectorized(qr, kr, vr, case.grid, case.window, case.num_prefix, case.border,
                                           case.scale)
    out = workload.forward(q, k, v)
    errors = {"rel_err_out": rel_err(out, ref)}
    if workload.differentiable:
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.to(ref_dtype))
        grads = torch.autograd.grad(out, (q, k, v), dout)
        errors["rel_err_grad"] = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    return errors


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# prompt_add: target + s * dropout(up(dropout(gelu(down(LN(message))))))
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptAddCase:
    batch: int = 8
    tokens: int = 197
    width: int = 768
    rank: int = 16
    scale: float = 0.1
    dropout_p: float = 0.1
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"B{self.batch} N{self.tokens} C{self.width} r{self.rank} p{self.dropout_p:g} {dtype_name(self.dtype)}"

    def params(self) -> dict:
        return {"B": self.batch, "N": self.tokens, "C": self.width, "r": self.rank, "scale": self.scale,
                "dropout_p": self.dropout_p, "dtype": dtype_name(self.dtype)}

    def tensor_bytes(self) -> int:
        return self.batch * self.tokens * self.width * torch.empty((), dtype=self.dtype).element_size()

    def bytes(self, pass_: str) -> int:
        """fwd reads target and message, writes out; bwd reads dout and message, writes dmessage
        (dtarget is dout itself)."""
        return {"fwd": 3, "bwd": 3, "fwd+bwd": 6}[pass_] * self.tensor_bytes()


class UnfusedPromptAdd(nn.Module):
    """The plain nn composition the fused op replaces (SA2VP's adapter and the scaled add)."""

    def __init__(self, width: int, rank: int, dropout_p: float, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.down = nn.Linear(width, rank)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout_p)
        self.up = nn.Linear(rank, width)

    def forward(self, target, message, scale: float):
        return target + scale * self.drop(self.up(self.drop(self.act(self.down(self.norm(message))))))


@functools.lru_cache(maxsize=None)
def _unfused_prompt_add(case: PromptAddCase, device: str, compiled: bool):
    """The unfused module with :func:`prompt_add_params`' values, and what to call (itself or its compiled
    form; one per case, so a compiled module is not compiled again)."""
    module = UnfusedPromptAdd(case.width, case.rank, case.dropout_p).to(device=device, dtype=case.dtype)
    with torch.no_grad():
        for dst, src in zip(module.parameters(), prompt_add_params(case, torch.device(device))):
            dst.copy_(src)
    module.train()
    return module, (compile_for_benchmarks(module) if compiled else module)


def prompt_add_params(case: PromptAddCase, device, seed: int = 7) -> tuple:
    """(norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias), trainable, non-trivial."""
    g = torch.Generator(device=device).manual_seed(seed)
    C, r, dt = case.width, case.rank, case.dtype
    return (
        (1.0 + 0.1 * randn((C,), g, device, torch.float32)).to(dt).requires_grad_(True),
        randn((C,), g, device, dt, requires_grad=True),
        (randn((r, C), g, device, torch.float32) * C ** -0.5).to(dt).requires_grad_(True),
        randn((r,), g, device, dt, requires_grad=True),
        (randn((C, r), g, device, torch.float32) * r ** -0.5).to(dt).requires_grad_(True),
        randn((C,), g, device, dt, requires_grad=True),
    )


def prompt_add_workload(provider: str, case: PromptAddCase, device, *, n_sets: int = 2, seed: int = 0) -> Workload:
    """``provider`` of prompt_add: a kernel backend, ``"reference"`` (sa2vp_kernels' own), ``"unfused"``
    (:class:`UnfusedPromptAdd`) or ``"unfused_compiled"`` (the same, torch.compile'd)."""
    device = torch.device(device)
    params = prompt_add_params(case, device)
    shape = (case.batch, case.tokens, case.width)

    def make(g):
        return (randn(shape, g, device, case.dtype, requires_grad=True),
                randn(shape, g, device, case.dtype, requires_grad=True))

    sets = input_sets(device, seed, n_sets, make)
    if provider in KERNEL_BACKENDS or provider == "reference":
        op = get_op("prompt_add")
        if provider != "reference":
            check_backend(provider, device, "prompt_add_fwd")

        def forward(target, message, *p):
            return op(target, message, case.scale, *p, dropout_p=case.dropout_p, eps=1e-6, backend=provider)

        return Workload(forward, [s + params for s in sets], [s + params for s in sets])
    if provider in ("unfused", "unfused_compiled"):
        module, call = _unfused_prompt_add(case, str(device), provider == "unfused_compiled")

        def forward(target, message):
            return call(target, message, case.scale)

        weights = tuple(module.parameters())
        note = "nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout and adds" + (", torch.compile'd" if provider == "unfused_compiled" else "")
        return Workload(forward, sets, [s + weights for s in sets], note)
    if provider == "gemms":
        # Only the two low-rank matmuls of the forward (and, through autograd, the four of the backward):
        # no LayerNorm, GELU, dropout or adds. Any implementation that keeps float32 products does at
        # least this work, so its time bounds every provider's from below.
        down_w, up_w = params[2], params[4]

        def forward(target, message):
            return torch.matmul(torch.matmul(message, down_w.t()), up_w.t())

        return Workload(forward, sets, [(s[1], down_w, up_w) for s in sets],
                        "the six low-rank matmuls alone (a lower bound)")
    raise ValueError(f"unknown prompt_add provider {provider!r}")


def prompt_add_errors(workload: Workload, case: PromptAddCase, device) -> dict:
    """Relative error of the output against the unfused composition in float32 (only without dropout)."""
    if case.dropout_p > 0:
        return {}
    target, message = workload.args[0][:2]
    ref_case = PromptAddCase(case.batch, case.tokens, case.width, case.rank, case.scale, 0.0, torch.float32)
    ref_mod = UnfusedPromptAdd(case.width, case.rank, 0.0).to(device)
    with torch.no_grad():
        for dst, src in zip(ref_mod.parameters(), prompt_add_params(case, device)):
            dst.copy_(src.float())
    ref = ref_mod(target.detach().float(), message.detach().float(), ref_case.scale)
    return {"rel_err_out": rel_err(workload.forward(*workload.args[0]), ref)}


# ---------------------------------------------------------------------------------------------------
# prompt_map: resample(embed) @ weight.T + bias + pos_embed
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptMapCase:
    grid: tuple = (14, 14)
    embed_grid: tuple = (14, 14)
    width: int = 768
    rank: int = 16
    num_prefix: int = 1
    dtype: torch.dtype = torch.float32

    @property
    def tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def label(self) -> str:
        return (f"grid {self.grid[0]}x{self.grid[1]} from {self.embed_grid[0]}x{self.embed_grid[1]} "
                f"C{self.width} r{self.rank} {dtype_name(self.dtype)}")

    def params(self) -> dict:
        return {"N": self.tokens, "grid": list(self.grid), "embed_grid": list(self.embed_grid),
                "C": self.width, "r": self.rank, "dtype": dtype_name(self.dtype)}

    def bytes(self, pass_: str) -> int:
        """fwd reads pos_embed and writes out ((1, N, C) each); bwd reads dout (the small embed and
        weight traffic is left out)."""
        per = self.tokens * self.width * torch.empty((), dtype=self.dtype).element_size()
        return {"fwd": 2, "bwd": 1, "fwd+bwd": 3}[pass_] * per


def prompt_map_workload(provider: str, case: PromptMapCase, device, *, n_sets: int = 2, seed: int = 0) -> Workload:
    """``provider`` of prompt_map: a kernel backend or ``"reference"`` (F.interpolate + F.linear + add,
    the unfused composition)."""
    device = torch.device(device)
    op = get_op("prompt_map")
    if provider != "reference":
        check_backend(provider, device, "prompt_map_fwd")
    eh, ew = case.embed_grid
    embed_grid = None if tuple(case.embed_grid) == tuple(case.grid) else tuple(case.embed_grid)

    def make(g):
        embed = randn((case.num_prefix + eh * ew, case.rank), g, device, case.dtype, requires_grad=True)
        weight = randn((case.width, case.rank), g, device, case.dtype, requires_grad=True)
        bias = randn((case.width,), g, device, case.dtype, requires_grad=True)
        pos = randn((1, case.tokens, case.width), g, device, case.dtype)
        return embed, weight, bias, pos

    sets = input_sets(device, seed, n_sets, make)

    def forward(embed, weight, bias, pos):
        return op(embed, weight, bias, pos, tuple(case.grid), num_prefix=case.num_prefix,
                  embed_grid=embed_grid, backend=provider)

    return Workload(forward, sets, [s[:3] for s in sets])


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, device, *, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median time of ``fn`` in ms, with the first and third quartiles and the minimum.

    CUDA: ``triton.testing.do_bench`` (CUDA events; it also flushes L2 between calls).  CPU: a host
    timer around each call after one warm-up call.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        med, q1, q3, low = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75, 0.0])
        return {"ms": float(med), "ms_q1": float(q1), "ms_q3": float(q3), "ms_min": float(low)}
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"ms": float(statistics.median(times)), "ms_q1": float(q1), "ms_q3": float(q3), "ms_min": min(times)}


def profile_kernels(fn: Callable, device, *, iters: int = 10) -> dict:
    """Device kernels of ``fn`` (torch.profiler): per kernel name the calls and ms per call of ``fn``,
    sorted by time, with the total kernel time and the wall time per call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize(dev)
        wall = (time.perf_counter() - t0) * 1e3 / iters
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0)
        if cuda and us > 0 and evt.device_type != torch.autograd.DeviceType.CPU:
            kernels.append((evt.key, int(round(evt.count / iters)), us / 1e3 / iters))
    if not cuda:  # on a CPU the operators stand in for kernels
        kernels = [(e.key, int(round(e.count / iters)), e.self_cpu_time_total / 1e3 / iters)
                   for e in prof.key_averages() if e.self_cpu_time_total > 0 and e.key.startswith("sa2vp")]
    kernels.sort(key=lambda k: -k[2])
    return {"kernels": kernels, "kernel_ms": sum(k[2] for k in kernels), "wall_ms": wall}


def time_cuda_graph(fn: Callable, device, *, rep_ms: float = 10, samples: int = 5, max_calls: int = 200) -> dict:
    """Median and minimum time of ``fn`` in ms from replays of a CUDA graph of many unrolled calls.

    This leaves out the host's launch and dispatch overhead, which dominates eager timings of kernels
    that run for tens of microseconds.  The calls rotate over the input sets as ``fn`` does, so the graph
    does not re-read one set from L2.  Raises if ``fn`` cannot be captured (a host sync, for instance);
    the current stream is restored either way.
    """
    dev = torch.device(device)
    stream = torch.cuda.current_stream(dev)
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        stream.wait_stream(side)
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def capture(n):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(n):
                    fn()
            graph.replay()
            torch.cuda.synchronize(dev)
            return graph

        graph = capture(1)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        end.synchronize()
        n = int(min(max_calls, max(1, rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        del graph
        graph = capture(n)
        times = []
        for _ in range(samples):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n)
        del graph
    finally:
        torch.cuda.set_stream(stream)
    return {"ms_graph": float(statistics.median(times)), "ms_graph_min": float(min(times)), "graph_calls": n}


def peak_memory_mib(fn: Callable, device) -> dict:
    """Peak allocated CUDA memory during one call of ``fn``, total and above what was allocated before."""
    if torch.device(device).type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "extra_mib": (peak - base) / 2**20}


@contextmanager
def environment(**values: str):
    """Environment variables set for the block and restored after it (the kernel variants that the
    extension reads at every launch, e.g. SA2VP_CUDA_PROMPT_ADD_STAGED)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def copy_bandwidth(device, nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup_ms=25, rep_ms=200)
    return {"bytes": 2 * n * 4, "ms": t["ms"], "gbps": 2 * n * 4 / (t["ms"] * 1e-3) / 1e9}


# ---------------------------------------------------------------------------------------------------
# Results file
# ---------------------------------------------------------------------------------------------------

def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device) -> str:
    """File-name tag: ``cpu`` on the CPU, the card's name in lower case with dashes on a GPU."""
    from sa2vp_kernels.triton.tuning import device_tag as tag_of  # (the tuned files' names, the same tags)

    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return tag_of(device_name(dev))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def source_digest() -> str:
    """Short SHA-256 of the package and kernel sources (identifies the code where git is unavailable)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "sa2vp_kernels/**/*.py",
                                     "sa2vp/**/*.py") for p in ROOT.glob(pattern))
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def new_results(device, source: str) -> dict:
    import sa2vp_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.device(device)
    meta = {
        "device": device_name(dev),
        "device_tag": device_tag(dev),
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "source": source,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        # threads the compiled CPU kernels actually run on (1 for a build without OpenMP)
        "kernel_cpu_threads": sa2vp_kernels.cpu_threads() if sa2vp_kernels.extension_available() else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "extension": sa2vp_kernels.extension_available(),
        "git": git_commit(),
        "source_digest": source_digest(),
    }
    try:  # the Triton launch settings in force (sa2vp_kernels/triton/tuning.py), relative to the repository
        from sa2vp_kernels.triton import tuning

        tuned = tuning.active_file(dev)
        root = Path(__file__).resolve().parent.parent
        inside = tuned is not None and Path(tuned).resolve().is_relative_to(root)
        meta["triton_tuned"] = str(Path(tuned).resolve().relative_to(root)) if inside else tuned
    except (ImportError, ValueError) as exc:
        meta["triton_tuned"] = f"error: {exc}"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    l2_mib=getattr(props, "L2_cache_size", 0) / 2**20, capability=f"{props.major}.{props.minor}")
    return {"meta": meta, "records": [], "ratios": [], "skipped": [], "errors": {}}


def results_path(results: dict, directory: Path = RESULTS_DIR) -> Path:
    return Path(directory) / f"{results['meta']['device_tag']}-{results['meta']['date']}.json"


def dumps_results(results: dict) -> str:
    """JSON with one line per record (readable in a diff), top-level keys on their own lines."""
    parts = []
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = ",\n".join("  " + json.dumps(v, default=str) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, default=str)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_json(path: Path, data: dict) -> Path:
    """``data`` as indented JSON at ``path``, written atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_results(results: dict, paths: Sequence[Path]) -> None:
    results["ratios"] = compute_ratios(results["records"])
    text = dumps_results(results)
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# Speed-up targets of the issue: (section, ours, baseline, pass) -> minimum ratio baseline / ours.
TARGETS = {
    ("attention", "cpu", "reference", "fwd+bwd"): 5.0,
    ("prompt_add", "cpu", "unfused", "fwd+bwd"): 3.0,
}
BASELINES = ("reference", "unfused", "unfused_compiled", "sdpa_masked", "flex", "natten")


def compute_ratios(records: list) -> list:
    """Speed-ups of every kernel backend over every baseline measured on the same case and pass, and of
    the fused model over the reference one (end to end)."""
    groups: dict = {}
    for r in records:
        if r.get("ms") is None or r.get("error"):
            continue
        groups.setdefault((r["section"], r["case"], r["pass"]), {})[r["provider"]] = r
    ratios = []
    for (section, case, pass_), by_provider in groups.items():
        if section == "end_to_end":
            ref = by_provider.get("reference")
            for ours in ("auto",):
                if ref and ours in by_provider:
                    ratios.append({"section": section, "case": case, "pass": pass_, "ours": ours,
                                   "baseline": "reference", "speedup": ref["ms"] / by_provider[ours]["ms"]})
            continue
        for ours in KERNEL_BACKENDS:
            if ours not in by_provider:
                continue
            for base in BASELINES:
                if base not in by_provider:
                    continue
                entry = {"section": section, "case": case, "pass": pass_, "ours": ours, "baseline": base,
                         "speedup": by_provider[base]["ms"] / by_provider[ours]["ms"]}
                if by_provider[base].get("ms_min") and by_provider[ours].get("ms_min"):
                    entry["speedup_of_min"] = by_provider[base]["ms_min"] / by_provider[ours]["ms_min"]
                target = TARGETS.get((section, ours, base, pass_))
                if target is not None:
                    entry["target"] = target
                    entry["met"] = entry["speedup"] >= target
                ratios.append(entry)
    return ratios
