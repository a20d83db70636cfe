"""torch.compile with its default backend (Inductor) over all three compiled ops, forward and backward.

The per-op tests compile with ``aot_eager``; this one also goes through Inductor's code generation,
which treats the ops as extern kernels described by their fake implementations, and through the C++
autograd of csrc/autograd.cpp when AOTAutograd traces the backward.
"""
import pytest
import torch

import sa2vp_kernels as sk
from sa2vp_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="no compiled CPU kernels")


def _assert_same(compiled, f, args, weights, **tol):
    """compiled(*args) and eager f(*args): the same value and gradients for args + weights."""
    out = compiled(*args)
    grads = torch.autograd.grad(out, args + tuple(weights))
    want = f(*args)
    want_grads = torch.autograd.grad(want, args + tuple(weights))
    torch.testing.assert_close(out, want, **tol)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)


def _assert_compiled_matches_eager(f, args, weights, **tol):
    """f compiled with Inductor (fullgraph) and eager f: the same value and gradients for args + weights."""
    _assert_same(torch.compile(f, fullgraph=True), f, args, weights, **tol)


def test_inductor_forward_and_backward_match_eager():
    g = torch.Generator().manual_seed(0)
    B, N, C, r = 2, 7, 24, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    weights = [rnd(C), rnd(C), rnd(r, C), rnd(r), rnd(C, r), rnd(C)]
    args = (rnd(B, N, C), rnd(B, N, C), rnd(1, 2, 7, 8), rnd(1, 2, 7, 8), rnd(1, 2, 7, 8), rnd(7, r), rnd(C, r))

    def f(target, message, q, k, v, embed, weight):
        a = sk.prompt_add(target * 2, message, 0.5, *weights, dropout_p=0.2, seed=4, backend="cpu")
        b = sk.local_cross_attention(q * 2, k, v, (2, 3), backend="cpu")
        c = sk.prompt_map(embed, weight, None, None, (2, 3), backend="cpu")
        return (a * a).sum() + (b * b).sum() + (c * c).sum()

    _assert_compiled_matches_eager(f, args, weights)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,variants", [(torch.float32, ""), (torch.float64, ""),
                                            (torch.float32, "chunked-rows-fused-prefix"),
                                            (torch.float64, "chunked-rows-fused-prefix"), (torch.float64, "stream"),
                                            (torch.bfloat16, "stream"), (torch.float64, "stream-inline")],
                         ids=str)
def test_inductor_with_the_triton_kernels_matches_eager(dtype, variants, monkeypatch):
    """Inductor compiles user Triton kernels itself (from their source, with its own argument
    signature): the compiled function and its gradients must still match eager, float64 included.
    Also with prompt_add's rows chunked (16 channels: its one-pass forward and backward from z) and
    the attention's prefix queries fused into the grid tiles (two kernels and two workspaces), and with
    the attention's row-streaming forward and backward (two segments per slice: their kernels and the
    combines; the streaming backward takes 16-bit inputs only, hence bfloat16 too), also with the
    forward's parts combined in the same launch (an atomic counter in a zeroed workspace)."""
    from sa2vp_kernels.triton import local_attn as tla
    from sa2vp_kernels.triton import prompt_add as tpa
    if variants == "chunked-rows-fused-prefix":
        monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", True)
        monkeypatch.setattr(tpa, "_WIDE_SHARED", 0)
        monkeypatch.setattr(tpa, "_CHUNK_SHARED", 16 * 16 * 2)
    elif variants.startswith("stream"):
        monkeypatch.setattr(tla, "FWD_INLINE_COMBINE", variants == "stream-inline")
        monkeypatch.setattr(tla, "FWD_STREAM", True)
        monkeypatch.setattr(tla, "BWD_STREAM", True)
        monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    g = torch.Generator(device="cuda").manual_seed(1)
    B, N, C, r = 2, 7, 40, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype).requires_grad_(True)

    weights = [rnd(C), rnd(C), rnd(r, C), rnd(r), rnd(C, r), rnd(C)]
    args = (rnd(B, N, C), rnd(B, N, C), rnd(1, 2, 7, 16), rnd(1, 2, 7, 16), rnd(1, 2, 7, 16), rnd(7, r),
            rnd(C, r))

    def f(target, message, q, k, v, embed, weight):
        a = sk.prompt_add(target * 2, message, 0.7, *weights, dropout_p=0.3, seed=4, backend="triton")
        b = sk.local_cross_attention(q * 2, k, v, (2, 3), scale=0.3, backend="triton")
        c = sk.prompt_map(embed, weight, None, None, (2, 3), backend="triton")
        return (a * a).sum() + (b * b).sum() + (c * c).sum()

    _assert_compiled_matches_eager(f, args, weights,
                                   **({"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {}))


def _assert_dynamic_matches_eager(f, make_args, weights, sizes, **tol):
    """f compiled once with dynamic shapes, then called at several sizes: each call matches eager f
    (value and gradients), and no size after the first recompiles."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for i, size in enumerate(sizes):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # a recompilation raises
            _assert_same(compiled, f, make_args(size), weights, **tol)


def _dynamic_case(op, backend, device, dtype):
    """One op in a function compiled with dynamic shapes (one op per case: each compilation stays short,
    and the cases run in parallel under pytest-xdist)."""
    g = torch.Generator(device=device).manual_seed(2)
    C, r = 40, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(True)

    # The batch varies (prompt_add: also the token count; prompt_map has none: its sizes are symbolic in
    # the first compilation all the same). No varying size equals a fixed one (heads 2, N = 7 of the
    # 2 x 3 grid, D = 16, C = 40, r = 3): torch.compile would give both one symbol, and the fixed one
    # specializes it.
    if op == "prompt_add":
        weights = [rnd(C), rnd(C), rnd(r, C), rnd(r), rnd(C, r), rnd(C)]

        def make_args(batch):
            return rnd(batch, 9 + batch, C), rnd(batch, 9 + batch, C)

        def f(target, message):
            a = sk.prompt_add(target * 2, message, 0.7, *weights, dropout_p=0.3, seed=4, backend=backend)
            return (a * a).sum()
    elif op == "local_cross_attention":
        weights = []

        def make_args(batch):
            return rnd(batch, 2, 7, 16), rnd(batch, 2, 7, 16), rnd(batch, 2, 7, 16)

        def f(q, k, v):
            b = sk.local_cross_attention(q * 2, k, v, (2, 3), scale=0.3, backend=backend)
            return (b * b).sum()
    else:
        weights = [rnd(C, r)]

        def make_args(batch):
            return (rnd(7, r),)

        def f(embed):
            c = sk.prompt_map(embed, weights[0], None, None, (2, 3), backend=backend)
            return (c * c).sum()

    return f, make_args, weights


OPS = ("prompt_add", "local_cross_attention", "prompt_map")


@pytest.mark.parametrize("op", OPS)
def test_inductor_dynamic_shapes_match_eager(op):
    f, make_args, weights = _dynamic_case(op, "cpu", "cpu", torch.float32)
    _assert_dynamic_matches_eager(f, make_args, weights, sizes=(4, 5, 6))


@pytest.mark.gpu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("op", OPS)
def test_inductor_dynamic_shapes_with_the_triton_kernels_match_eager(op):
    """The Triton ops' opcheck leaves out its dynamic-shape check (too slow in sympy); this is the
    dynamic-shape check of the Triton ops, through torch.compile (H100, torch 2.11: all three ops in
    one compiled function took more than a minute under 8 pytest workers)."""
    f, make_args, weights = _dynamic_case(op, "triton", "cuda", torch.float32)
    _assert_dynamic_matches_eager(f, make_args, weights, sizes=(4, 5, 6))
