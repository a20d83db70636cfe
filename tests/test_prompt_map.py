"""prompt_map on every backend against the F.interpolate + F.linear reference."""
import math

import pytest
import torch

import sa2vp_kernels as sk
from sa2vp_kernels.reference import prompt_map_reference

CPU_BACKENDS = ["reference", "cpu", "triton"]
GPU_BACKENDS = ["cuda", "triton"]

# (grid, embed_grid, num_prefix, C, r, bias, pos_embed): prompt grids coarser, equal, finer and mixed
# (finer on one axis, coarser on the other), single rows/columns and a 1 x 1 prompt map.
CASES = [
    ((5, 4), (3, 2), 1, 24, 3, True, True),
    ((5, 4), (5, 4), 0, 40, 8, False, True),
    ((5, 4), (7, 9), 3, 24, 8, True, False),
    ((2, 3), (5, 2), 1, 40, 3, True, True),
    ((3, 1), (1, 1), 1, 24, 3, False, False),
    ((1, 5), (4, 3), 0, 24, 3, True, False),
]


def _ids(case):
    grid, egrid, T, C, r, bias, pos = case
    return f"g{grid[0]}x{grid[1]}-e{egrid[0]}x{egrid[1]}-T{T}-C{C}-r{r}-b{int(bias)}-p{int(pos)}"


def _inputs(grid, embed_grid, T, C, r, bias=True, pos=True, dtype=torch.float64, device="cpu",
            requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = T + grid[0] * grid[1]

    def rand(*shape, std=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    embed = rand(T + embed_grid[0] * embed_grid[1], r)
    weight = rand(C, r, std=r ** -0.5)
    b = rand(C) if bias else None
    p = rand(1, N, C) if pos else None
    return embed, weight, b, p


def _bilinear_matrix(out_size, in_size):
    """(out, in) matrix of 1-D bilinear resampling, align_corners=False, written from the definition."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m


def _dense_oracle(embed, weight, bias, pos, grid, embed_grid, T):
    ry = _bilinear_matrix(grid[0], embed_grid[0])
    rx = _bilinear_matrix(grid[1], embed_grid[1])
    rows = embed[T:].reshape(embed_grid[0], embed_grid[1], -1)
    resampled = torch.einsum("yh,xw,hwr->yxr", ry, rx, rows).reshape(grid[0] * grid[1], -1)
    out = torch.cat([embed[:T], resampled]) @ weight.t()
    if bias is not None:
        out = out + bias
    out = out.unsqueeze(0)
    return out if pos is None else out + pos


def _call(args, case, backend):
    grid, egrid, T = case[:3]
    return sk.prompt_map(*args, grid, num_prefix=T, embed_grid=egrid, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_definition(case):
    grid, egrid, T, C, r, bias, pos = case
    args = _inputs(grid, egrid, T, C, r, bias, pos)
    out = prompt_map_reference(*args, grid, num_prefix=T, embed_grid=egrid)
    torch.testing.assert_close(out, _dense_oracle(*args, grid, egrid, T), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_backward_match_reference(backend, case):
    grid, egrid, T, C, r, bias, pos = case
    args = _inputs(grid, egrid, T, C, r, bias, pos, requires_grad=True, seed=1)
    out = _call(args, case, backend)
    ref = _dense_oracle(*args, grid, egrid, T)
    assert out.shape == (1, T + grid[0] * grid[1], C) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    tensors = [t for t in args if t is not None]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, g)
    grads_ref = torch.autograd.grad(ref, tensors, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradcheck(backend, case):
    grid, egrid, T, C, r, bias, pos = case
    args = _inputs(grid, egrid, T, C, r, bias, pos, requires_grad=True, seed=2)

    def f(*a):
        return _call(a, case, backend)

    # The compiled CPU kernels get the full Jacobian; the slower reference and the Triton interpreter
    # get fast mode (random projections of the Jacobian).
    assert torch.autograd.gradcheck(f, args, fast_mode=backend != "cpu")


@pytest.mark.parametrize("embed_grid", [(7, 7), (14, 14), (28, 28)])
def test_realistic_shape_float32(embed_grid):
    # ViT-B/16 at 224: N = 1 + 14 * 14, C = 768, r = 16 (Triton and CUDA: the gpu tests below).
    backend, grid, T, C, r = "cpu", (14, 14), 1, 768, 16
    args64 = _inputs(grid, embed_grid, T, C, r, requires_grad=True, seed=3)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    out = sk.prompt_map(*args32, grid, num_prefix=T, embed_grid=embed_grid, backend=backend)
    out_torch = prompt_map_reference(*args32, grid, num_prefix=T, embed_grid=embed_grid)
    ref = prompt_map_reference(*args64, grid, num_prefix=T, embed_grid=embed_grid)
    g = torch.randn(ref.shape, dtype=torch.float64).float()
    grads = torch.autograd.grad(out, args32, g)
    grads_torch = torch.autograd.grad(out_torch, args32, g)
    grads_ref = torch.autograd.grad(ref, args64, g.double())
    # Error at most twice plain PyTorch's own float32 error (plus a few ulps of the values' scale).
    for name, a, t, b in zip(["out", "embed", "weight", "bias", "pos_embed"], (out, *grads),
                             (out_torch, *grads_torch), (ref, *grads_ref)):
        err = (a.double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        bound = 2 * err_torch + 4 * torch.finfo(torch.float32).eps * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} vs PyTorch float32 {err_torch:.3g}"


def test_cpu_backward_is_deterministic():
    grid, egrid, T = (14, 14), (28, 28), 1
    args = _inputs(grid, egrid, T, 96, 16, dtype=torch.float32, requires_grad=True, seed=4)
    g = torch.randn(1, T + 196, 96)
    runs = []
    for _ in range(2):
        out = sk.prompt_map(*args, grid, num_prefix=T, embed_grid=egrid, backend="cpu")
        runs.append(torch.autograd.grad(out, args, g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_embed_grid_defaults_to_token_grid():
    args = _inputs((3, 4), (3, 4), 2, 24, 3, seed=5)
    for backend in CPU_BACKENDS:
        out = sk.prompt_map(*args, (3, 4), num_prefix=2, backend=backend)
        torch.testing.assert_close(out, _dense_oracle(*args, (3, 4), (3, 4), 2), rtol=1e-12, atol=1e-12)


def test_auto_picks_compiled_cpu_backend_and_accepts_views():
    embed, weight, bias, pos = _inputs((3, 4), (2, 5), 1, 24, 3, dtype=torch.float32, seed=6)
    weight_view = weight.t().contiguous().t()  # (C, r) with strides (1, C)
    out = sk.prompt_map(embed, weight_view, bias, pos, (3, 4), embed_grid=(2, 5), backend="auto")
    expect = sk.prompt_map(embed, weight, bias, pos, (3, 4), embed_grid=(2, 5), backend="cpu")
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_pos_embed_grad_without_other_grads():
    embed, weight, bias, pos = _inputs((3, 4), (2, 2), 1, 24, 3, seed=7)
    pos.requires_grad_()
    out = sk.prompt_map(embed, weight, bias, pos, (3, 4), embed_grid=(2, 2), backend="cpu")
    g = torch.randn_like(out)
    (d_pos,) = torch.autograd.grad(out, pos, g)
    torch.testing.assert_close(d_pos, g, rtol=0, atol=0)


def test_opcheck_cpp_ops():
    for bias, pos in [(True, True), (False, False), (True, False)]:
        embed, weight, b, p = _inputs((3, 4), (2, 5), 1, 24, 3, bias, pos, dtype=torch.float32,
                                      requires_grad=True, seed=8)
        torch.library.opcheck(torch.ops.sa2vp_kernels.prompt_map_fwd, (embed, weight, b, p, 3, 4, 2, 5, 1))
    g = torch.randn(1, 13, 24)
    torch.library.opcheck(torch.ops.sa2vp_kernels.prompt_map_bwd,
                          (g, embed.detach(), weight.detach(), 3, 4, 2, 5, 1))


def _opcheck_triton_ops(device, test_utils):
    from sa2vp_kernels.triton import prompt_map as tpm

    embed, weight, b, p = _inputs((2, 3), (3, 2), 1, 16, 3, dtype=torch.float32, device=device,
                                  requires_grad=True, seed=9)
    for bias, pos in [(b, p), (None, None)]:
        torch.library.opcheck(tpm.prompt_map_fwd_triton, (embed, weight, bias, pos, 2, 3, 3, 2, 1),
                              test_utils=test_utils)
    g = torch.randn(1, 7, 16, device=device)
    torch.library.opcheck(tpm.prompt_map_bwd_triton, (g, embed.detach(), weight.detach(), 2, 3, 3, 2, 1),
                          test_utils=test_utils)


def test_opcheck_triton_ops_interpreted():
    # The interpreter cannot be traced by AOTDispatcher (see test_torch_compile_triton_interpreted).
    _opcheck_triton_ops("cpu", ("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_triton_interpreted_is_a_clear_error():
    args = _inputs((2, 3), (2, 3), 1, 8, 3, dtype=torch.float32, requires_grad=True, seed=10)
    f = torch.compile(lambda *a: sk.prompt_map(*a, (2, 3), backend="triton"), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="needs a GPU"):
        f(*args)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend == "triton" else "cpu"
    grid, egrid, T = (3, 4), (2, 3), 1
    args = _inputs(grid, egrid, T, 24, 3, dtype=torch.float32, device=device, requires_grad=True, seed=10)

    def f(embed, weight, bias, pos):
        out = sk.prompt_map(embed * 2.0, weight, bias, pos, grid, num_prefix=T, embed_grid=egrid, backend=backend)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_ref = f(*args)
    grads_ref = torch.autograd.grad(loss_ref, args)
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


# ---- bad input -----------------------------------------------------------------------------------

def _good():
    return list(_inputs((2, 3), (2, 3), 1, 8, 3, dtype=torch.float32))


def _replace(i, fn):
    def mutate(args):
        args[i] = fn(args[i])
        return args

    return mutate


def _same(args):
    return args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        (_same, {"grid": (2, 4)}, ValueError, "embed has 7 rows.*embed_grid"),
        (_same, {"grid": (2, 3), "embed_grid": (3, 3)}, ValueError, "embed has 7 rows"),
        (_same, {"grid": (2, 3), "num_prefix": 2}, ValueError, "embed has 7 rows"),
        (_same, {"grid": (2, 3), "num_prefix": -1}, ValueError, "num_prefix"),
        (_same, {"grid": (0, 3)}, ValueError, "grid"),
        (_same, {"grid": 6}, ValueError, "grid"),
        (_same, {"grid": (2, 3), "embed_grid": (2, 0)}, ValueError, "embed_grid"),
        (_same, {"grid": (2, 3), "embed_grid": 6}, ValueError, "embed_grid"),
        (_replace(1, lambda w: w[:, :2]), {"grid": (2, 3)}, ValueError, r"weight must have shape \(C, r\)"),
        (_replace(1, lambda w: w[0]), {"grid": (2, 3)}, ValueError, "weight must be a 2-D"),
        (_replace(2, lambda b: b[:5]), {"grid": (2, 3)}, ValueError, r"bias must have shape \(C,\)"),
        (_replace(3, lambda p: p[0]), {"grid": (2, 3)}, ValueError, "pos_embed must be a 3-D"),
        (_replace(3, lambda p: p[:, :5]), {"grid": (2, 3)}, ValueError, r"pos_embed must have shape \(1, N, C\)"),
        (_replace(3, lambda p: p.expand(2, -1, -1)), {"grid": (2, 3)}, ValueError, "pos_embed must have shape"),
        (_replace(0, lambda e: e[None]), {"grid": (2, 3)}, ValueError, "embed must be a 2-D"),
        (_replace(0, lambda e: e[:, :0]), {"grid": (2, 3)}, ValueError, "rank r"),
        (_replace(1, lambda w: w.double()), {"grid": (2, 3)}, TypeError, "weight has dtype"),
        (_replace(2, lambda b: b.double()), {"grid": (2, 3)}, TypeError, "bias has dtype"),
        (_replace(0, lambda e: e.long()), {"grid": (2, 3)}, TypeError, "floating-point"),
        (_replace(1, lambda w: w.int()), {"grid": (2, 3)}, TypeError, "floating-point"),
        (_replace(3, lambda p: p.to("meta")), {"grid": (2, 3)}, ValueError, "device"),
        (_replace(0, lambda e: e.half()), {"grid": (2, 3)}, TypeError, "dtype"),
        (_replace(0, lambda e: e.numpy()), {"grid": (2, 3)}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(backend, mutate, kwargs, exc, match):
    args = mutate(_good())
    with pytest.raises(exc, match=match):
        sk.prompt_map(*args, backend=backend, **kwargs)


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    args = _good()
    with pytest.raises(ValueError, match="backend"):
        sk.prompt_map(*args, (2, 3), backend="numpy")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sk.prompt_map(*args, (2, 3), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sk.prompt_map(*args, (2, 3), backend="triton")


def test_cpp_op_rejects_bad_arguments_itself():
    embed, weight, bias, pos = _good()
    op = torch.ops.sa2vp_kernels.prompt_map_fwd
    with pytest.raises(RuntimeError, match="rows"):
        op(embed, weight, bias, pos, 2, 3, 2, 2, 1)
    with pytest.raises(RuntimeError, match="pos_embed"):
        op(embed, weight, bias, pos[:, 1:], 2, 3, 2, 3, 1)
    with pytest.raises(RuntimeError, match="bias"):
        op(embed, weight, bias[1:], pos, 2, 3, 2, 3, 1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(embed.half(), weight.half(), None, None, 2, 3, 2, 3, 1)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.sa2vp_kernels.prompt_map_bwd(pos[:, 1:], embed, weight, 2, 3, 2, 3, 1)


# ---- GPU -----------------------------------------------------------------------------------------

GPU_CASES = [
    ((14, 14), (7, 7), 1, 768, 16),
    ((14, 14), (14, 14), 1, 768, 16),
    ((14, 14), (28, 28), 1, 768, 16),
    ((5, 4), (7, 9), 3, 40, 3),
    ((56, 56), (56, 56), 0, 128, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_gpu_matches_float64_reference(backend, dtype, case):
    grid, egrid, T, C, r = case
    args = _inputs(grid, egrid, T, C, r, dtype=dtype, device="cuda", requires_grad=True, seed=11)
    args64 = [t.detach().double().requires_grad_() for t in args]
    out = sk.prompt_map(*args, grid, num_prefix=T, embed_grid=egrid, backend=backend)
    out_torch = prompt_map_reference(*args, grid, num_prefix=T, embed_grid=egrid)
    ref = prompt_map_reference(*args64, grid, num_prefix=T, embed_grid=egrid)
    assert out.dtype == dtype and out.shape == ref.shape
    g = torch.randn(ref.shape, device="cuda", dtype=torch.float64)
    grads = torch.autograd.grad(out, args, g.to(dtype))
    grads_torch = torch.autograd.grad(out_torch, args, g.to(dtype))
    grads_ref = torch.autograd.grad(ref, args64, g.to(dtype).double())
    eps = torch.finfo(dtype).eps
    for name, a, t, b in zip(["out", "embed", "weight", "bias", "pos_embed"], (out, *grads),
                             (out_torch, *grads_torch), (ref, *grads_ref)):
        err = (a.double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        bound = 2 * err_torch + 2 * eps * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} vs PyTorch {dtype} {err_torch:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backward_is_deterministic(backend):
    grid, egrid, T = (14, 14), (28, 28), 1
    args = _inputs(grid, egrid, T, 768, 16, dtype=torch.float32, device="cuda", requires_grad=True, seed=12)
    g = torch.randn(1, T + 196, 768, device="cuda")
    runs = []
    for _ in range(3):
        out = sk.prompt_map(*args, grid, num_prefix=T, embed_grid=egrid, backend=backend)
        runs.append(torch.autograd.grad(out, args, g))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_opcheck():
    # Not test_aot_dispatch_dynamic: its dynamic-shape trace of the user Triton kernels spent over a
    # minute in sympy (H200, torch 2.11, Triton 3.6: past the 60 s pytest-timeout). The C++ ops below
    # keep the full opcheck.
    _opcheck_triton_ops("cuda", ("test_schema", "test_autograd_registration", "test_faketensor",
                                 "test_aot_dispatch_static"))
    embed, weight, b, p = _inputs((3, 4), (2, 5), 1, 24, 3, dtype=torch.float32, device="cuda",
                                  requires_grad=True, seed=14)
    torch.library.opcheck(torch.ops.sa2vp_kernels.prompt_map_fwd, (embed, weight, b, p, 3, 4, 2, 5, 1))
    torch.library.opcheck(torch.ops.sa2vp_kernels.prompt_map_bwd,
                          (torch.randn(1, 13, 24, device="cuda"), embed.detach(), weight.detach(), 3, 4, 2, 5, 1))


@pytest.mark.gpu
def test_gpu_auto_and_no_bias_no_pos():
    args = _inputs((14, 14), (7, 7), 1, 64, 4, bias=False, pos=False, dtype=torch.float32, device="cuda", seed=13)
    out = sk.prompt_map(*args, (14, 14), embed_grid=(7, 7), backend="auto")
    ref = prompt_map_reference(*[None if t is None else t.double() for t in args], (14, 14), embed_grid=(7, 7))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---- edge grids for the first run of the CUDA kernels --------------------------------------------
#
# Strong down- and upsampling, a 1 x 1 prompt map, num_prefix 0 and 3, r in {1, 17, 64}, C below and
# above the forward kernel's 128 threads. Every case on the compiled CPU kernels (run everywhere: they
# prove the test itself) and on the CUDA and Triton kernels (GPU only), against the float64 reference,
# bounded by plain PyTorch's own error in the same dtype (as test_gpu_matches_float64_reference).

EDGE_BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton", marks=pytest.mark.gpu)]
EDGE_CPU_DTYPES = (torch.float32, torch.float64)  # the only dtypes of the CPU backend
EDGE_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# (grid, embed_grid, num_prefix, C, r, bias, pos_embed)
EDGE_CASES = [
    ((5, 4), (14, 14), 0, 40, 1, True, True),      # 14x14 -> 5x4: taps 2-3 source rows apart
    ((5, 4), (14, 14), 3, 136, 64, True, True),
    ((64, 64), (3, 3), 0, 40, 64, True, True),     # 3x3 -> 64x64: N = 4096, clamped borders
    ((64, 64), (3, 3), 3, 24, 17, True, True),
    ((7, 7), (1, 1), 0, 136, 17, True, True),      # 1x1 -> 7x7: every output is the one source row
    ((7, 7), (1, 1), 3, 40, 1, False, False),
]


def _edge_grid_errors(backend, device, dtype, case):
    """Failures (as strings) of one case in one dtype; empty when all bounds hold."""
    grid, egrid, T, C, r, bias, pos = case
    args = [None if a is None else a.requires_grad_() for a in
            _inputs(grid, egrid, T, C, r, bias, pos, dtype=dtype, device=device, seed=21)]
    names = [n for n, a in zip(["embed", "weight", "bias", "pos_embed"], args) if a is not None]
    args64 = [None if a is None else a.detach().double().requires_grad_() for a in args]
    leaves = [a for a in args if a is not None]
    leaves64 = [a for a in args64 if a is not None]
    out = sk.prompt_map(*args, grid, num_prefix=T, embed_grid=egrid, backend=backend)
    out_torch = prompt_map_reference(*args, grid, num_prefix=T, embed_grid=egrid)
    ref = prompt_map_reference(*args64, grid, num_prefix=T, embed_grid=egrid)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    g = g.to(device=device, dtype=dtype)
    errors = []
    if out.dtype != dtype or out.shape != ref.shape:
        return [f"{dtype}: out has dtype {out.dtype} and shape {tuple(out.shape)}, expected {tuple(ref.shape)}"]
    grads = torch.autograd.grad(out, leaves, g)
    grads_torch = torch.autograd.grad(out_torch, leaves, g)
    grads_ref = torch.autograd.grad(ref, leaves64, g.double())
    # float64: plain PyTorch is the reference itself, so a fixed relative slack instead of 2 ulps
    slack = 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
    # d_weight and d_bias are sums over all N tokens. The CPU kernel adds blocks of 128 tokens, then the
    # blocks (held to the plain bound); the GPU kernels add up to N / 16 tokens in sequence (fixed order,
    # no atomics) where PyTorch sums in a tree: allow sqrt(N) ulps of the accumulation dtype for them
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    token_sum_slack = math.sqrt(ref.shape[1]) * eps_acc
    for name, a, t, b in zip(["out"] + names, (out, *grads), (out_torch, *grads_torch), (ref, *grads_ref)):
        err = (a.double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        rel = slack + (token_sum_slack if name in ("weight", "bias") and backend != "cpu" else 0.0)
        bound = 2 * err_torch + rel * b.abs().max().item()
        if a.dtype != dtype or a.shape != b.shape:
            errors.append(f"{dtype} {name}: dtype {a.dtype}, shape {tuple(a.shape)}")
        elif not err <= bound:  # (NaN fails too)
            errors.append(f"{dtype} {name}: error {err:.3g} > bound {bound:.3g} (PyTorch {err_torch:.3g})")
    return errors


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=_ids)
def test_edge_grids_against_float64(backend, case):
    grid, egrid, T, C, r, bias, pos = case
    device = "cpu" if backend == "cpu" else "cuda"
    # the float64 reference itself against the resampling written from its definition, for these grids
    args64 = _inputs(grid, egrid, T, C, r, bias, pos, seed=21)
    torch.testing.assert_close(prompt_map_reference(*args64, grid, num_prefix=T, embed_grid=egrid),
                               _dense_oracle(*args64, grid, egrid, T), rtol=1e-12, atol=1e-12)
    errors = []
    for dtype in EDGE_CPU_DTYPES if device == "cpu" else EDGE_GPU_DTYPES:  # all run, failures reported together
        errors += _edge_grid_errors(backend, device, dtype, case)
    assert not errors, "\n".join(errors)


# ---- Triton: long float32 sums -------------------------------------------------------------------


def test_triton_float32_token_sums_against_float64():
    """d_weight and d_bias sum over all N tokens, BLOCK_N tokens a step (2 here: r = 64 fills the
    tile); for float32 inputs the steps add in float64. One float32 chain over the 512 steps (the
    kernel before) missed the bound on d_bias by a factor 1.7 with these inputs (0.97 to 1.7 over
    four seeds; the output gradient has a common offset, so the chain's rounding grows with the
    running sum); the float64 steps reach about a tenth of it. The launcher runs without the forward
    (whose 4-channel tiles are slow under the interpreter)."""
    from sa2vp_kernels.triton import prompt_map as tpm

    grid, C, r = (32, 32), 32, 64
    args64 = _inputs(grid, grid, 0, C, r, pos=False, requires_grad=True, seed=0)[:3]  # embed, weight, bias
    args32 = [t.detach().float().requires_grad_() for t in args64]
    N = grid[0] * grid[1]
    go = (torch.randn(1, N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1.0).float()
    grads = tpm.prompt_map_bwd(go, args32[0].detach(), args32[1].detach(), *grid, *grid, 0)
    grads_torch = torch.autograd.grad(prompt_map_reference(*args32, None, grid), args32, go)
    grads_ref = torch.autograd.grad(prompt_map_reference(*args64, None, grid), args64, go.double())
    eps = torch.finfo(torch.float32).eps
    for name, a, t, b in zip(["embed", "weight", "bias"], grads, grads_torch, grads_ref):
        err = (a.double() - b).abs().max().item()
        err_torch = (t.double() - b).abs().max().item()
        bound = 2 * err_torch + 2 * eps * b.abs().max().item()  # (test_gpu_matches_float64_reference's)
        assert a.dtype == torch.float32, name
        assert err <= bound, f"{name}: error {err:.3g} vs PyTorch float32 {err_torch:.3g}"


# ---- eager calls of the Triton backend run its launchers directly (_dispatch.eager_triton) ---------


def test_triton_eager_path_matches_the_registered_ops(monkeypatch):
    """Same outputs and gradients, bitwise, as through the registered ops, without their dispatch."""
    import importlib

    from sa2vp_kernels import _dispatch
    from sa2vp_kernels.triton import prompt_map as tpm

    pm = importlib.import_module("sa2vp_kernels.prompt_map")  # (sk.prompt_map is the function)
    base = _inputs((3, 4), (2, 5), 1, 24, 3, seed=41)
    go = torch.randn(1, 13, 24, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(pm, "eager_triton", lambda *t, eager=eager: eager)
        leaves = [t.detach().clone().requires_grad_(True) for t in base]
        out = sk.prompt_map(*leaves, (3, 4), embed_grid=(2, 5), backend="triton")
        with torch.no_grad():
            plain = sk.prompt_map(*leaves, (3, 4), embed_grid=(2, 5), backend="triton")
        results.append((out.detach(), plain, *torch.autograd.grad(out, leaves, go)))
    for a, b in zip(*results):
        assert torch.equal(a, b)

    def boom(*args, **kwargs):
        raise AssertionError("the registered op was dispatched")

    monkeypatch.setattr(pm, "eager_triton", _dispatch.eager_triton)
    monkeypatch.setattr(tpm, "prompt_map_fwd_triton", boom)
    monkeypatch.setattr(tpm, "prompt_map_bwd_triton", boom)
    leaves = [t.detach().clone().requires_grad_(True) for t in base]
    out = sk.prompt_map(*leaves, (3, 4), embed_grid=(2, 5), backend="triton")
    assert torch.equal(torch.autograd.grad(out, leaves[0], go)[0], results[0][2])
