"""The instruction-set versions of the float32 CPU kernels (portable, AVX2 + FMA, AVX-512), each
forced with SA2VP_CPU_ISA and checked against the float64 reference."""
import pytest
import torch

import sa2vp_kernels as sk
import test_prompt_add
import test_prompt_map
from sa2vp_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="no compiled CPU kernels")

ORDER = {name: i for i, name in enumerate(_ext.CPU_ISAS)}


def _supported():
    return sk.cpu_isa()[1] if _ext.extension_available() else "generic"


@pytest.fixture(params=_ext.CPU_ISAS)
def isa(request, monkeypatch):
    if ORDER[request.param] > ORDER[_supported()]:
        pytest.skip(f"this processor has no {request.param}")
    monkeypatch.setenv("SA2VP_CPU_ISA", request.param)
    assert sk.cpu_isa()[0] == request.param
    return request.param


def test_cpu_isa_query_and_bad_value(monkeypatch):
    in_use, supported = sk.cpu_isa()
    assert supported in _ext.CPU_ISAS and ORDER[in_use] <= ORDER[supported]
    monkeypatch.setenv("SA2VP_CPU_ISA", "generic")
    assert sk.cpu_isa() == ("generic", supported)
    monkeypatch.setenv("SA2VP_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="SA2VP_CPU_ISA must be one of generic, avx2, avx512"):
        sk.cpu_isa()
    t = torch.randn(1, 2, 8)
    w = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="SA2VP_CPU_ISA"):
        sk.prompt_add(t, t, 1.0, torch.ones(8), torch.zeros(8), w, torch.zeros(2), w.t().contiguous(),
                      torch.zeros(8), backend="cpu")


# ---- prompt_add -------------------------------------------------------------------------------------

PROMPT_ADD_SHAPES = [
    # (B, N, C, r): C below, at and off multiples of 16; r below, at and above 16, odd.
    (2, 7, 40, 3),
    (1, 5, 17, 8),
    (3, 11, 768, 16),
    (2, 9, 24, 17),
    (1, 3, 100, 64),
    (2, 37, 33, 5),  # 74 tokens: chunks of 32 with a partial last one
]


def _prompt_add_inputs(B, N, C, r, deep, seed=0):
    t = test_prompt_add._inputs(B, N, C, r, deep=deep, seed=seed)
    return t, torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


def _prompt_add_run(t, grad_out, dtype, backend, dropout_p, seed):
    x = {k: None if v is None else v.detach().to(dtype).requires_grad_(True) for k, v in t.items()}
    out = sk.prompt_add(x["target"], x["message"], 0.7, x["norm_weight"], x["norm_bias"], x["down_weight"],
                        x["down_bias"], x["up_weight"], x["up_bias"], deep=x["deep"], deep_scale=x["deep_scale"],
                        dropout_p=dropout_p, seed=seed, backend=backend)
    names = [k for k, v in x.items() if v is not None]
    grads = torch.autograd.grad(out, [x[k] for k in names], grad_out.to(dtype))
    return {"out": out, **dict(zip(names, grads))}


@pytest.mark.parametrize("shape", PROMPT_ADD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deep,dropout_p", [(False, 0.0), (True, 0.3)])
def test_prompt_add_float32_matches_float64_reference(isa, shape, deep, dropout_p):
    t, grad_out = _prompt_add_inputs(*shape, deep)
    want = _prompt_add_run(t, grad_out, torch.float64, "reference", dropout_p, 77)
    got = _prompt_add_run(t, grad_out, torch.float32, "cpu", dropout_p, 77)
    for name, w in want.items():
        g = got[name].double()
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        # float32 rounding is ~1e-7 relative; a wrong mask, tail or fold would be O(1).
        assert err < 2e-5, f"{isa}: {name} relative error {err:.2e}"


def test_prompt_add_isas_agree_and_backward_is_deterministic(monkeypatch):
    supported = [i for i in _ext.CPU_ISAS if ORDER[i] <= ORDER[_supported()]]
    t, grad_out = _prompt_add_inputs(3, 23, 72, 16, True, seed=4)
    results = {}
    for name in supported:
        monkeypatch.setenv("SA2VP_CPU_ISA", name)
        first = _prompt_add_run(t, grad_out, torch.float32, "cpu", 0.25, 5)
        again = _prompt_add_run(t, grad_out, torch.float32, "cpu", 0.25, 5)
        for k in first:
            assert torch.equal(first[k], again[k]), f"{name}: {k} differs between two identical calls"
        results[name] = first
    base = results["generic"]
    for name, res in results.items():
        for k, v in res.items():
            torch.testing.assert_close(v, base[k], rtol=2e-5, atol=2e-5 * base[k].abs().max().item())


# ---- prompt_map ------------------------------------------------------------------------------------

PROMPT_MAP_CASES = [
    # (grid, embed_grid, num_prefix, C, r, bias, pos): equal, finer and coarser prompt grids, C and r
    # off multiples of 16, optional bias and pos_embed.
    ((14, 14), (14, 14), 1, 768, 16, True, True),
    ((5, 7), (3, 4), 1, 40, 3, True, False),
    ((4, 3), (7, 5), 2, 17, 8, False, True),
    ((9, 6), (9, 6), 0, 33, 20, False, False),
]


@pytest.mark.parametrize("case", PROMPT_MAP_CASES, ids=test_prompt_map._ids)
def test_prompt_map_float32_matches_float64_reference(isa, case):
    grid, egrid, T, C, r, bias, pos = case
    args64 = test_prompt_map._inputs(grid, egrid, T, C, r, bias, pos, requires_grad=True, seed=3)
    args32 = [None if a is None else a.detach().float().requires_grad_(True) for a in args64]
    want = test_prompt_map._call(args64, case, "reference")
    got = test_prompt_map._call(args32, case, "cpu")
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    leaves = [i for i, a in enumerate(args64) if a is not None]
    gw = torch.autograd.grad(want, [args64[i] for i in leaves], grad_out)
    gg = torch.autograd.grad(got, [args32[i] for i in leaves], grad_out.float())
    for name, w, g in [("out", want, got)] + [(f"grad {i}", w, g) for i, w, g in zip(leaves, gw, gg)]:
        err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err < 2e-5, f"{isa}: {name} relative error {err:.2e}"


# ---- local_cross_attention (portable and AVX2 + FMA versions) ----------------------------------------


@pytest.mark.parametrize("border", ["clip", "zero"])
@pytest.mark.parametrize("heads,head_dim,grid,window,num_prefix", [(3, 40, (5, 4), 3, 1), (1, 24, (3, 7), 5, 2)])
def test_local_attention_float32_matches_float64_reference(isa, border, heads, head_dim, grid, window, num_prefix):
    N = num_prefix + grid[0] * grid[1]
    g = torch.Generator().manual_seed(21)
    q64, k64, v64 = (torch.randn(2, heads, N, head_dim, generator=g, dtype=torch.float64).requires_grad_(True)
                     for _ in range(3))
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q64, k64, v64))
    kw = dict(window=window, num_prefix=num_prefix, border=border)
    want = sk.local_cross_attention(q64, k64, v64, grid, backend="reference", **kw)
    got = sk.local_cross_attention(q32, k32, v32, grid, backend="cpu", **kw)
    grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gw = torch.autograd.grad(want, (q64, k64, v64), grad_out)
    gg = torch.autograd.grad(got, (q32, k32, v32), grad_out.float())
    for name, w, x in [("out", want, got), ("dq", gw[0], gg[0]), ("dk", gw[1], gg[1]), ("dv", gw[2], gg[2])]:
        err = ((x.double() - w).abs().max() / w.abs().max()).item()
        assert err < 2e-5, f"{isa}: {name} relative error {err:.2e}"


def test_results_do_not_depend_on_the_thread_count(isa):
    t, grad_out = _prompt_add_inputs(3, 41, 56, 8, True, seed=8)
    case = ((6, 5), (4, 3), 1, 40, 8, True, True)
    pm_args = test_prompt_map._inputs(*case[:5], True, True, dtype=torch.float32, requires_grad=True, seed=2)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            res = _prompt_add_run(t, grad_out, torch.float32, "cpu", 0.2, 9)
            out = test_prompt_map._call(pm_args, case, "cpu")
            res["prompt_map"] = out
            res["prompt_map_grads"] = torch.cat([g.flatten() for g in torch.autograd.grad(
                out, [a for a in pm_args if a is not None], torch.ones_like(out))])
            results.append(res)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for k, v in results[0].items():
            assert torch.equal(v, other[k]), f"{isa}: {k} depends on the number of threads"


# ---- threads --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="this torch has no OpenMP thread pool")
def test_cpu_kernels_run_on_torch_threads():
    # at::parallel_for is a header template: an extension compiled without -fopenmp runs every loop
    # serially, whatever torch.set_num_threads says
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert sk.cpu_threads() == threads
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("border", ["clip", "zero"])
def test_attention_results_do_not_depend_on_the_thread_count(isa, dtype, border):
    # 2 x 3 heads x (1 prefix + 9 rows) = 60 tasks in parallel chunks of 26 (at least 64k multiply-adds
    # each): split over the threads
    g = torch.Generator().manual_seed(5)
    grid, P, D = (9, 7), 1, 40
    q, k, v = (torch.randn(2, 3, P + grid[0] * grid[1], D, generator=g, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g, dtype=dtype)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = sk.local_cross_attention(q, k, v, grid, window=5, num_prefix=P, border=border, backend="cpu")
            results.append([out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], other):
            assert torch.equal(a, b), f"{isa}: attention {name} depends on the number of threads"
