"""local_cross_attention on every CPU-runnable backend against the pure-PyTorch oracle."""
import pytest
import torch

import sa2vp_kernels as sk
from sa2vp_kernels.reference import (
    local_cross_attention_lse,
    local_cross_attention_oracle,
    local_cross_attention_vectorized,
)

CPU_BACKENDS = ["reference", "cpu", "triton"]

# (grid, window, num_prefix, heads, head_dim): every value of the matrix appears at least once,
# including windows wider than the grid and grids with a single row/column.
CASES = [
    ((1, 1), 1, 0, 1, 8),
    ((1, 1), 3, 1, 3, 8),
    ((2, 3), 3, 1, 3, 8),
    ((2, 3), 5, 3, 1, 24),
    ((5, 4), 3, 0, 1, 40),
    ((5, 4), 5, 1, 3, 8),
    ((7, 7), 1, 3, 1, 24),
    ((7, 7), 3, 1, 1, 8),
    ((1, 6), 3, 1, 1, 8),
]


def _ids(case):
    grid, window, T, H, D = case
    return f"g{grid[0]}x{grid[1]}-w{window}-T{T}-H{H}-D{D}"


def _rand(B, H, N, D, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("border", ["clip", "zero"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_vectorized_reference_matches_oracle(case, border):
    grid, window, T, H, D = case
    q, k, v = _rand(2, H, T + grid[0] * grid[1], D)
    ref = local_cross_attention_oracle(q, k, v, grid, window, T, border)
    out = local_cross_attention_vectorized(q, k, v, grid, window, T, border)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_oracle_follows_the_definition_by_hand():
    # 1 x 3 grid, window 3: the left query's 3 x 3 window holds keys 0 and 1 and seven out-of-grid
    # neighbours, dropped by "clip" and counted as score 0 / value 0 by "zero".
    q = torch.tensor([[1.0], [0.5], [2.0]], dtype=torch.float64).view(1, 1, 3, 1)
    k = torch.tensor([[1.0], [-1.0], [0.25]], dtype=torch.float64).view(1, 1, 3, 1)
    v = torch.tensor([[3.0], [5.0], [-7.0]], dtype=torch.float64).view(1, 1, 3, 1)
    out = local_cross_attention_oracle(q, k, v, (1, 3), 3, 0, "clip", scale=1.0)
    s0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    expect0 = (torch.softmax(s0, 0) * torch.tensor([3.0, 5.0], dtype=torch.float64)).sum()
    assert torch.allclose(out[0, 0, 0, 0], expect0)
    out_z = local_cross_attention_oracle(q, k, v, (1, 3), 3, 0, "zero", scale=1.0)
    sz = torch.tensor([1.0, -1.0] + [0.0] * 7, dtype=torch.float64)
    expectz = (torch.softmax(sz, 0) * torch.tensor([3.0, 5.0] + [0.0] * 7, dtype=torch.float64)).sum()
    assert torch.allclose(out_z[0, 0, 0, 0], expectz)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("border", ["clip", "zero"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_lse_match_oracle(backend, case, border):
    grid, window, T, H, D = case
    q, k, v = _rand(2, H, T + grid[0] * grid[1], D, seed=1)
    ref = local_cross_attention_oracle(q, k, v, grid, window, T, border)
    out = sk.local_cross_attention(q, k, v, grid, window=window, num_prefix=T, border=border, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if backend != "reference":
        fwd = torch.ops.sa2vp_kernels.local_attn_fwd if backend == "cpu" else \
            torch.ops.sa2vp_kernels.local_attn_fwd_triton
        _, lse = fwd(q, k, v, grid[0], grid[1], window, T, border == "zero", D ** -0.5)
        assert lse.dtype == torch.float64 and lse.shape == q.shape[:3]
        torch.testing.assert_close(lse, local_cross_attention_lse(q, k, grid, window, T, border),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("border", ["clip", "zero"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradcheck_float64(backend, case, border):
    grid, window, T, H, D = case
    q, k, v = _rand(1, H, T + grid[0] * grid[1], D, requires_grad=True, seed=2)

    def fn(q, k, v):
        return sk.local_cross_attention(q, k, v, grid, window=window, num_prefix=T, border=border,
                                        scale=0.7, backend=backend)

    # The interpreter runs one program at a time in numpy: the fast (random-projection) mode keeps
    # the Triton gradcheck affordable while still checking the full backward.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=backend == "triton")


REALISTIC = [(12, 64), (1, 768)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads,head_dim", REALISTIC, ids=["12x64", "1x768"])
@pytest.mark.parametrize("border", ["clip", "zero"])
def test_realistic_shape_forward_backward_fp32(backend, heads, head_dim, border):
    B = 1 if backend == "triton" else 2
    grid, T = (14, 14), 1
    N = T + 196
    q, k, v = _rand(B, heads, N, head_dim, dtype=torch.float32, requires_grad=True, seed=3)
    grad = torch.randn(B, heads, N, head_dim, generator=torch.Generator().manual_seed(4))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    # float64 vectorised reference (itself checked against the oracle above): the per-query oracle
    # would dominate the suite's run time at this size
    ref = local_cross_attention_vectorized(q64, k64, v64, grid, 3, T, border)
    ref.backward(grad.double())
    out = sk.local_cross_attention(q, k, v, grid, border=border, backend=backend)
    out.backward(grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-5)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_views_from_fused_qkv(backend):
    B, N, H, D, grid, T = 2, 1 + 15, 3, 8, (3, 5), 1
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views, last dim contiguous
    assert not q.is_contiguous()
    out = sk.local_cross_attention(q, k, v, grid, backend=backend)
    ref = local_cross_attention_oracle(q, k, v, grid, 3, T, "clip")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, qkv, g)
    (dref,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(dq, dref)
    # last dim not contiguous either
    qt = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    torch.testing.assert_close(sk.local_cross_attention(qt, k, v, grid, backend=backend), ref.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expanded_batch_keys(backend):
    """Keys/values shared by every image (stride 0 on the batch) as in SA2VP's first prompt layer."""
    B, H, N, D, grid = 3, 2, 1 + 12, 8, (3, 4)
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    k1, v1 = torch.randn(2, 1, H, N, D, dtype=torch.float64).requires_grad_().unbind(0)
    k, v = k1.expand(B, -1, -1, -1), v1.expand(B, -1, -1, -1)
    out = sk.local_cross_attention(q, k, v, grid, backend=backend)
    ref = local_cross_attention_oracle(q, k, v, grid, 3, 1, "clip")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (k1, v1), g), torch.autograd.grad(ref, (k1, v1), g))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_is_deterministic(backend):
    q, k, v = _rand(2, 3, 1 + 20, 24, dtype=torch.float32, requires_grad=True, seed=5)
    g = torch.randn(2, 3, 21, 24)
    grads = []
    for _ in range(2):
        out = sk.local_cross_attention(q, k, v, (4, 5), backend=backend)
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_auto_picks_compiled_cpu_backend():
    q, k, v = _rand(1, 1, 1 + 6, 8, dtype=torch.float32)
    out = sk.local_cross_attention(q, k, v, (2, 3), backend="auto")
    torch.testing.assert_close(out, sk.local_cross_attention(q, k, v, (2, 3), backend="cpu"), rtol=0, atol=0)


def test_module_form():
    m = sk.LocalCrossAttention(window=5, num_prefix=2, border="zero", backend="cpu")
    q, k, v = _rand(1, 2, 2 + 12, 8)
    torch.testing.assert_close(m(q, k, v, (3, 4)), local_cross_attention_oracle(q, k, v, (3, 4), 5, 2, "zero"))
    assert "window=5" in repr(m)


def test_opcheck_cpp_ops():
    q, k, v = _rand(2, 3, 1 + 12, 8, dtype=torch.float32, requires_grad=True, seed=6)
    args = (3, 4, 3, 1, False, 8 ** -0.5)
    torch.library.opcheck(torch.ops.sa2vp_kernels.local_attn_fwd, (q, k, v, *args))
    torch.library.opcheck(torch.ops.sa2vp_kernels.local_attn_fwd, (q, k, v, 3, 4, 5, 1, True, 0.3))
    with torch.no_grad():
        out, lse = torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, *args)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.sa2vp_kernels.local_attn_bwd,
                          (g, q.detach(), k.detach(), v.detach(), out, lse, *args))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    q, k, v = _rand(1, 2, 1 + 6, 8, dtype=torch.float32, requires_grad=True, seed=7)

    def f(q, k, v):
        return sk.local_cross_attention(q * 2.0, k, v, (2, 3), backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


# ---- bad input -----------------------------------------------------------------------------------

def _good():
    return _rand(1, 2, 1 + 6, 8, dtype=torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        (lambda q, k, v: (q, k, v), {"grid": (2, 4)}, ValueError, "num_prefix"),
        (lambda q, k, v: (q, k, v), {"grid": (2, 3), "window": 2}, ValueError, "window"),
        (lambda q, k, v: (q, k, v), {"grid": (2, 3), "window": 0}, ValueError, "window"),
        (lambda q, k, v: (q, k, v), {"grid": (2, 3), "window": -3}, ValueError, "window"),
        (lambda q, k, v: (q, k, v), {"grid": (2, 3), "border": "reflect"}, ValueError, "border"),
        (lambda q, k, v: (q, k, v), {"grid": (2, 3), "num_prefix": -1}, ValueError, "num_prefix"),
        (lambda q, k, v: (q, k, v), {"grid": (0, 3)}, ValueError, "grid"),
        (lambda q, k, v: (q, k, v), {"grid": 6}, ValueError, "grid"),
        (lambda q, k, v: (q, k[:, :1], v), {"grid": (2, 3)}, ValueError, "same shape"),
        (lambda q, k, v: (q, k, v[..., :4]), {"grid": (2, 3)}, ValueError, "same shape"),
        (lambda q, k, v: (q[0], k[0], v[0]), {"grid": (2, 3)}, ValueError, "4-D"),
        (lambda q, k, v: (q, k.double(), v), {"grid": (2, 3)}, TypeError, "dtype"),
        (lambda q, k, v: (q.half(), k.half(), v.half()), {"grid": (2, 3)}, TypeError, "dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), {"grid": (2, 3)}, TypeError, "floating-point"),
        (lambda q, k, v: (q, k, v.to("meta")), {"grid": (2, 3)}, ValueError, "device"),
        (lambda q, k, v: (q.numpy(), k, v), {"grid": (2, 3)}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(backend, mutate, kwargs, exc, match):
    q, k, v = mutate(*_good())
    with pytest.raises(exc, match=match):
        sk.local_cross_attention(q, k, v, backend=backend, **kwargs)


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    q, k, v = _good()
    with pytest.raises(ValueError, match="backend"):
        sk.local_cross_attention(q, k, v, (2, 3), backend="numpy")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sk.local_cross_attention(q, k, v, (2, 3), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sk.local_cross_attention(q, k, v, (2, 3), backend="triton")


def test_cpp_op_rejects_bad_arguments_itself():
    q, k, v = _good()
    with pytest.raises(RuntimeError, match="window"):
        torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, 2, 3, 4, 1, False, 0.3)
    with pytest.raises(RuntimeError, match="num_prefix"):
        torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, 2, 4, 3, 1, False, 0.3)
    # the autograd layer checks before any backend: meta tensors, whose kernel checks nothing, raise too
    # (a CUDA kernel's own check of a wrong N crashed the process on the GPU machines)
    qm, km, vm = (t.to("meta") for t in (q, k, v))
    with pytest.raises(RuntimeError, match=r"N\) must equal num_prefix"):
        torch.ops.sa2vp_kernels.local_attn_fwd(qm, km, vm, 2, 4, 3, 1, False, 0.3)
    out, lse = torch.ops.sa2vp_kernels.local_attn_fwd(qm, km, vm, 2, 3, 3, 1, False, 0.3)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
