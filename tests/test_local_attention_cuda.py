"""CUDA kernels of the local cross attention (``backend="cuda"``) against the PyTorch references.

Low-precision results are compared to a float64 reference computed from the same (rounded) inputs;
the allowed error is tied to what plain PyTorch achieves in that dtype: error(cuda) <= 2 x
error(vectorised reference run in the same dtype) + a small absolute slack.
"""
import pytest
import torch

from sa2vp_kernels import local_cross_attention
from sa2vp_kernels.reference import (
    local_cross_attention_lse,
    local_cross_attention_oracle,
    local_cross_attention_vectorized,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
BORDERS = ("clip", "zero")
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (grid, window, num_prefix, heads, head_dim)
CASES = [
    ((5, 7), 3, 1, 2, 64),
    ((3, 4), 1, 0, 1, 8),
    ((7, 5), 5, 3, 3, 24),
    ((4, 9), 7, 1, 1, 40),
    ((1, 1), 3, 1, 2, 16),  # one cell: the window is larger than the grid
    ((2, 3), 9, 0, 1, 768),
    ((6, 5), 3, 2, 1, 20),  # head dim not a multiple of the 16-byte vector (padded copy)
    ((3, 3), 3, 1, 3, 3),
    ((17, 16), 3, 2, 1, 8),  # N > 256: more keys than the groups of a prefix block
    ((5, 3), 5, 1, 1, 300),  # several vectors per lane
]


def _case_id(case):
    (gh, gw), window, num_prefix, heads, dim = case
    return f"{gh}x{gw}-w{window}-p{num_prefix}-{heads}x{dim}"


def _randn(*shape, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def _scale(dim):
    return dim ** -0.5


def _run(fn, bases, make_qkv, grad_out, grid, window, num_prefix, border):
    """Output of fn and its gradients with respect to detached leaf copies of ``bases``;
    ``make_qkv(*leaves)`` builds the (possibly strided) q, k, v views."""
    leaves = [t.detach().clone().requires_grad_(True) for t in bases]
    out = fn(*make_qkv(*leaves), grid, window=window, num_prefix=num_prefix, border=border)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), *grads)


def _identity(*qkv):
    return qkv


def _cuda(q, k, v, grid, *, window, num_prefix, border):
    return local_cross_attention(q, k, v, grid, window=window, num_prefix=num_prefix, border=border,
                                 scale=_scale(q.shape[-1]), backend="cuda")


def _vectorized(q, k, v, grid, *, window, num_prefix, border):
    return local_cross_attention_vectorized(q, k, v, grid, window, num_prefix, border, _scale(q.shape[-1]))


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def _assert_like_pytorch(got, baseline, ref, dtype, what):
    """got (our kernel) and baseline (PyTorch in the same dtype) against the float64 reference."""
    err, base = _max_err(got, ref), _max_err(baseline, ref)
    assert err <= 2 * base + SLACK[dtype], (
        f"{what}: max error {err:.3g} vs float64, PyTorch {dtype} reaches {base:.3g}")


def _check_against_references(bases, grid, window, num_prefix, border, make_qkv=_identity, seed=0):
    """bases: CUDA leaf tensors in the dtype under test; make_qkv(*bases) gives the q, k, v views."""
    dtype = bases[0].dtype
    shape = make_qkv(*bases)[0].shape
    grad_out = _randn(*shape, dtype=dtype, seed=seed + 7)
    got = _run(_cuda, bases, make_qkv, grad_out, grid, window, num_prefix, border)
    ref = _run(_vectorized, [t.double() for t in bases], make_qkv, grad_out.double(), grid, window,
               num_prefix, border)
    names = ["out"] + [f"grad of input {i}" for i in range(len(bases))]
    for name, g, like in zip(names, got, [grad_out, *bases]):
        assert g.dtype == dtype and g.shape == like.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
    if dtype == torch.float64:
        for name, g, r in zip(names, got, ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=name)
        return
    base = _run(_vectorized, bases, make_qkv, grad_out, grid, window, num_prefix, border)
    for name, g, b, r in zip(names, got, base, ref):
        _assert_like_pytorch(g, b, r, dtype, name)


def _qkv(batch, heads, n, dim, dtype, seed=0):
    return tuple(_randn(batch, heads, n, dim, dtype=dtype, seed=seed + i) for i in range(3))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, border, dtype):
    grid, window, num_prefix, heads, dim = case
    n = num_prefix + grid[0] * grid[1]
    _check_against_references(_qkv(2, heads, n, dim, dtype), grid, window, num_prefix, border)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", CASES[:6], ids=_case_id)
def test_float64_matches_reference(case, border):
    grid, window, num_prefix, heads, dim = case
    bases = _qkv(2, heads, num_prefix + grid[0] * grid[1], dim, torch.float64, seed=3)
    _check_against_references(bases, grid, window, num_prefix, border)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("grid,window,num_prefix", [((3, 4), 3, 1), ((2, 5), 5, 2), ((4, 3), 1, 0)])
def test_matches_oracle(grid, window, num_prefix, border):
    q, k, v = _qkv(2, 3, num_prefix + grid[0] * grid[1], 12, torch.float64, seed=11)
    out = _cuda(q, k, v, grid, window=window, num_prefix=num_prefix, border=border)
    ref = local_cross_attention_oracle(q, k, v, grid, window, num_prefix, border, _scale(12))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("border", BORDERS)
def test_lse(border, dtype):
    grid, window, num_prefix = (5, 6), 3, 2
    q, k, v = _qkv(2, 3, num_prefix + 30, 40, dtype, seed=5)
    out, lse = torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, grid[0], grid[1], window, num_prefix,
                                                      border == "zero", _scale(40))
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.is_contiguous() and out.dtype == dtype
    ref = local_cross_attention_lse(q.double(), k.double(), grid, window, num_prefix, border, _scale(40))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(lse.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 1032), (torch.float32, 1028), (torch.float64, 520)],
                         ids=["bf16-1032", "fp32-1028", "fp64-520"])
@pytest.mark.parametrize("border", BORDERS)
def test_wide_heads_in_slabs(dtype, dim, border):
    """Rows wider than one warp's registers are processed in several slabs."""
    grid, window, num_prefix = (3, 4), 3, 1
    _check_against_references(_qkv(1, 2, num_prefix + 12, dim, dtype, seed=2), grid, window, num_prefix,
                              border)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_qkv_views(dtype):
    """q, k, v as strided views of one fused projection output (B, N, 3, heads, D)."""
    batch, heads, dim, grid, num_prefix = 2, 3, 24, (4, 5), 1
    qkv = _randn(batch, num_prefix + 20, 3, heads, dim, dtype=dtype, seed=4)

    def split(qkv):
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))

    assert not split(qkv)[0].is_contiguous()
    for border in BORDERS:
        _check_against_references([qkv], grid, 3, num_prefix, border, make_qkv=split)


def test_expanded_batch_and_odd_views():
    """Batch stride 0, a misaligned view and a view with non-unit feature stride."""
    dtype, heads, dim, grid, num_prefix = torch.bfloat16, 2, 16, (3, 5), 1
    n = num_prefix + 15
    bases = [
        _randn(3, heads, n, dim, dtype=dtype, seed=1),
        _randn(1, heads, n, dim, dtype=dtype, seed=2),
        _randn(3, heads, n, dim + 1, dtype=dtype, seed=3),
    ]

    def views(q, k, v):
        # k: batch stride 0; v: starts 2 bytes into its rows, so it is not 16-byte aligned
        return q, k.expand(3, -1, -1, -1), v[..., 1:]

    q, k, v = views(*bases)
    assert k.stride(0) == 0 and v.data_ptr() % 16 != 0
    for border in BORDERS:
        _check_against_references(bases, grid, 5, num_prefix, border, make_qkv=views)
    # The op itself also accepts a feature stride other than 1.
    qt = _randn(3, heads, dim, n, dtype=dtype, seed=5).transpose(2, 3)
    out, _ = torch.ops.sa2vp_kernels.local_attn_fwd(qt, k, v, grid[0], grid[1], 3, num_prefix, False,
                                                    _scale(dim))
    ref = _vectorized(qt.double(), k.double(), v.double(), grid, window=3, num_prefix=num_prefix,
                      border="clip")
    base = _vectorized(qt, k, v, grid, window=3, num_prefix=num_prefix, border="clip")
    _assert_like_pytorch(out, base, ref, dtype, "out (feature stride != 1)")


def test_grad_out_layouts():
    """Backward with an expanded (stride 0) and a transposed grad_out."""
    dtype, grid, num_prefix = torch.float32, (4, 3), 1
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 13, 8, dtype, seed=9))
    out = _cuda(q, k, v, grid, window=3, num_prefix=num_prefix, border="zero")
    grads = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _vectorized(*leaves, grid, window=3, num_prefix=num_prefix, border="zero")
    ref_grads = torch.autograd.grad(ref.sum(), leaves, retain_graph=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    grad_out = _randn(2, 13, 2, 8, dtype=dtype, seed=10).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,dim", [(1, 768), (12, 64)], ids=["1x768", "12x64"])
def test_vit_b_shape(heads, dim):
    """ViT-B/16 at batch 64: 14 x 14 grid plus CLS, bfloat16."""
    bases = _qkv(64, heads, 197, dim, torch.bfloat16, seed=21)
    for border in BORDERS:
        _check_against_references(bases, (14, 14), 3, 1, border)


def test_large_grid():
    """A 64 x 64 grid plus CLS: long prefix rows and many grid blocks."""
    _check_against_references(_qkv(2, 1, 1 + 64 * 64, 768, torch.bfloat16, seed=31), (64, 64), 3, 1, "clip")
    _check_against_references(_qkv(1, 12, 1 + 64 * 64, 64, torch.bfloat16, seed=32), (64, 64), 5, 1, "zero")


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("grid,window,num_prefix,dim", [((3, 4), 3, 1, 5), ((2, 3), 5, 2, 8), ((3, 2), 1, 0, 3)])
def test_gradcheck(grid, window, num_prefix, dim, border):
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, num_prefix + grid[0] * grid[1], dim, torch.float64))

    def fn(q, k, v):
        return _cuda(q, k, v, grid, window=window, num_prefix=num_prefix, border=border)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_wide_heads():
    grid = (2, 3)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 1, 7, 520, torch.float64, seed=8))

    def fn(q, k, v):
        return _cuda(q, k, v, grid, window=3, num_prefix=1, border="zero")

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("heads,dim", [(1, 768), (12, 64), (2, 1032)], ids=["1x768", "12x64", "2x1032"])
def test_backward_deterministic(heads, dim):
    q, k, v = _qkv(8, heads, 197, dim, torch.bfloat16, seed=41)
    grad_out = _randn(8, heads, 197, dim, dtype=torch.bfloat16, seed=42)
    first = _run(_cuda, (q, k, v), _identity, grad_out, (14, 14), 3, 1, "zero")
    second = _run(_cuda, (q, k, v), _identity, grad_out, (14, 14), 3, 1, "zero")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(dtype):
    grid, window, num_prefix, dim = (3, 4), 3, 1, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 13, dim, dtype, seed=51))
    args = (q, k, v, grid[0], grid[1], window, num_prefix, True, _scale(dim))
    torch.library.opcheck(torch.ops.sa2vp_kernels.local_attn_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.sa2vp_kernels.local_attn_fwd(*args)
    grad_out = _randn(2, 2, 13, dim, dtype=dtype, seed=52)
    bwd_args = (grad_out, q.detach(), k.detach(), v.detach(), out, lse, grid[0], grid[1], window,
                num_prefix, True, _scale(dim))
    torch.library.opcheck(torch.ops.sa2vp_kernels.local_attn_bwd.default, bwd_args)


def test_bad_arguments_raise():
    q, k, v = _qkv(1, 1, 5, 8, torch.float32)
    out, lse = torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, 2, 2, 3, 1, False, 0.5)
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        torch.ops.sa2vp_kernels.local_attn_bwd(out, q, k, v, out, lse.double(), 2, 2, 3, 1, False, 0.5)
    with pytest.raises(RuntimeError, match="N"):
        torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, 2, 3, 3, 1, False, 0.5)
    with pytest.raises(RuntimeError, match="window"):
        torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, 2, 2, 2, 1, False, 0.5)


# ---- the prefetching variant (SA2VP_CUDA_ATTN_PREFETCH=1) -----------------------------------------
# Same sums in the same order as the default kernels, with the next key's (query's) rows loaded while
# one is processed. Cases: windows clipped by the grid and walking across window rows, the window of
# one key, num_prefix 0 / 1 / 3 (the queries of a key go from its window to the prefix queries), 1 to
# 3 vectors per lane (the widths with a prefetching kernel) and the slab path, which has none.


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case,dtype", [
    (((5, 7), 3, 1, 2, 64), torch.float32),
    (((7, 5), 5, 3, 3, 24), torch.bfloat16),
    (((3, 4), 1, 0, 1, 8), torch.float16),
    (((1, 1), 3, 1, 2, 16), torch.float32),
    (((4, 9), 7, 0, 1, 768), torch.bfloat16),   # 3 vectors per lane
    (((5, 3), 5, 1, 1, 300), torch.float32),    # 3 vectors per lane in float32
    (((3, 5), 3, 1, 1, 2048), torch.float32),   # slab path (no prefetching variant)
    (((6, 5), 3, 2, 2, 40), torch.float64),
], ids=lambda c: _case_id(c) if isinstance(c, tuple) else str(c).replace("torch.", ""))
def test_prefetching_kernels_match_the_default(monkeypatch, case, dtype, border):
    grid, window, num_prefix, heads, dim = case
    N = num_prefix + grid[0] * grid[1]
    bases = [_randn(2, heads, N, dim, dtype=dtype, seed=70 + i) for i in range(3)]
    grad_out = _randn(2, heads, N, dim, dtype=dtype, seed=74)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_ATTN_PREFETCH", flag)
        results[flag] = _run(_cuda, bases, _identity, grad_out, grid, window, num_prefix, border)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["0"], results["1"]):
        # the same operations in the same order: equal up to how the compiler contracts a multiply-add
        bound = 4 * eps * max(a.abs().max().item(), 1e-30)
        assert (a.double() - b.double()).abs().max().item() <= bound, name
