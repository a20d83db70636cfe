"""The CUDA kernels of csrc/cuda, run on the CPU under the emulator of tests/cuda_emu.

No GPU is needed: tests/cuda_emu/build.py compiles the .cu files as C++ against an emulator that runs
every thread of a block as a fiber, with real barriers, warp shuffles and shared memory (cuda_emu.h).
The kernels' indexing, their per-lane and per-warp logic, their synchronisation and their host-side
launch code are checked here; their speed, their register use and anything the hardware does
differently from this model (memory ordering inside a barrier interval, for one) need a GPU
(the `gpu`-marked tests).

* float64 gradcheck of every CUDA backward, through the emulated forward and backward ops;
* forward and backward against the CPU kernels (themselves gradchecked) in float64 and float32, and in
  float16 / bfloat16 against float32 on the same rounded inputs;
* the results do not depend on the order in which the threads run between barriers (races);
* the emulator's own checks (reductions, a race, a deadlock, a shuffle with exited lanes).

`make test-cuda-sanitizers` (part of `make test`) runs them again with the kernels built with
AddressSanitizer (accesses outside a tensor) and ThreadSanitizer (threads touching the same memory with
no barrier between). SA2VP_SKIP_CUDA_EMU=1 skips them (for a machine without a C++ compiler).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("SA2VP_SKIP_CUDA_EMU") == "1", reason="SA2VP_SKIP_CUDA_EMU=1")

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))

import sa2vp_kernels  # noqa: E402,F401  (registers torch.ops.sa2vp_kernels)

CPU_OPS = torch.ops.sa2vp_kernels
LOW = (torch.float16, torch.bfloat16)
# ||emulated - cpu|| / ||cpu||: float64 and float32 from the kernels' different summation orders,
# float16 / bfloat16 from the rounding of their outputs (the CPU op runs in float32)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def emu():
    import build

    ops = build.load()
    ops.set_schedule(0)
    yield ops
    ops.set_schedule(0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the tests that draw from the global generator draw the same numbers every run


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(got, want, dtype, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{what}[{i}]: not finite"
        err = _rel(g, w)
        assert err <= TOL[dtype], f"{what}[{i}]: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _as(dtype, *ts):
    """The tensors rounded to `dtype`, and (for the CPU ops, which have no float16/bfloat16) the same
    rounded values in float32."""
    low = tuple(t.to(dtype) if t is not None else None for t in ts)
    cpu_dtype = torch.float32 if dtype in LOW else dtype
    return low, tuple(t.to(cpu_dtype) if t is not None else None for t in low)


def test_emulator_runs_the_kernels(emu):
    before = emu.stats().tolist()
    q = torch.randn(1, 2, 1 + 3 * 4, 8)
    emu.local_attn_fwd(q, q, q, 3, 4, 3, 1, False, 0.5)
    after = emu.stats().tolist()
    launches, blocks, threads, barriers, warp_syncs = (a - b for a, b in zip(after, before))
    assert launches == 1 and blocks >= 1 and threads == blocks * 256
    assert warp_syncs > 0


# ---- the emulator's own checks ------------------------------------------------------------------------


def test_selftest_reductions(emu):
    threads = 96
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (3 * threads,), generator=g).float()  # integers: every sum is exact
    got = emu.selftest_sums(x, threads).view(3, threads // 32, 32, 3)
    xw = x.view(3, threads // 32, 32)
    assert torch.equal(got[..., 0], xw.sum(-1, keepdim=True).expand(-1, -1, 32))
    # the __shfl_down_sync tree, step by step: a source lane past the warp returns the caller's value
    down = xw.clone()
    for o in (16, 8, 4, 2, 1):
        src = torch.arange(32) + o
        down = down + torch.where(src < 32, down[..., src.clamp(max=31)], down)
    assert torch.equal(got[..., 1], down)
    assert torch.equal(got[:, :, 0, 1], xw.sum(-1))  # lane 0: the warp's total
    assert torch.equal(got[..., 2], xw.sum((1, 2)).view(3, 1, 1).expand(-1, threads // 32, 32))


def test_selftest_race_shows_up_in_one_schedule(emu):
    x = torch.arange(40.0)
    emu.set_schedule(0)
    forward = emu.selftest_racy(x)
    emu.set_schedule(1)
    reverse = emu.selftest_racy(x)
    emu.set_schedule(0)
    # thread t reads t + 1's value: not yet written when the threads run in order (0xff bytes: NaN)
    assert torch.isnan(forward[:-1]).all()
    assert torch.equal(reverse[:-1], x[1:])


def test_selftest_deadlock_is_an_error(emu):
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.selftest_divergent_barrier()


def test_selftest_shuffle_with_exited_lanes_is_an_error(emu):
    with pytest.raises(RuntimeError, match="has exited"):
        emu.selftest_shuffle_after_exit()


# ---- local cross attention --------------------------------------------------------------------------

# (B, heads, grid, num_prefix, head_dim, window, zero_border)
ATTN = [
    (2, 3, (5, 4), 1, 24, 3, False),
    (1, 1, (7, 7), 3, 40, 5, True),
    (2, 2, (2, 3), 0, 8, 1, False),
    (1, 1, (4, 5), 1, 768, 3, False),   # 1 x 768: several vectors per lane
    (1, 2, (6, 5), 2, 17, 7, True),     # head dim not a multiple of the vector width
    (1, 1, (1, 1), 1, 16, 3, False),    # the window is larger than the grid
    (1, 1, (17, 16), 2, 8, 3, False),   # N > 256: more keys than the groups of a prefix block
    (1, 1, (3, 5), 1, 2048, 3, True),   # the slab path (rows longer than the registers hold)
    (2, 3, (3, 3), 1, 3, 3, False),     # head dim 3
    (1, 1, (5, 3), 1, 300, 5, False),   # several vectors per lane
    (1, 1, (2, 3), 0, 768, 9, True),    # window 9 on a 2 x 3 grid
]


def _attn_id(c):
    B, H, (gh, gw), P, D, w, zb = c
    return f"B{B}h{H}_{gh}x{gw}p{P}d{D}w{w}{'zero' if zb else 'clip'}"


def _attn_inputs(case, dtype, seed=0):
    B, H, (gh, gw), P, D, w, zb = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(B, H, P + gh * gw, D, generator=g, dtype=torch.float64) for _ in range(4))
    return q, k, v, go


def _attn_both(ops, case, q, k, v, go):
    B, H, (gh, gw), P, D, w, zb = case
    scale = D ** -0.5
    out, lse = ops.local_attn_fwd(q, k, v, gh, gw, w, P, zb, scale)
    grads = ops.local_attn_bwd(go, q, k, v, out, lse, gh, gw, w, P, zb, scale)
    return (out, lse) + tuple(grads)


@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ATTN, ids=_attn_id)
def test_local_attention_matches_cpu(emu, monkeypatch, case, dtype, prefetch):
    if prefetch == "1" and dtype in LOW and case[4] > 64:
        pytest.skip("covered by the float32/float64 runs")
    monkeypatch.setenv("SA2VP_CUDA_ATTN_PREFETCH", prefetch)
    (q, k, v, go), (qc, kc, vc, goc) = _as(dtype, *_attn_inputs(case, dtype))
    got = _attn_both(emu, case, q, k, v, go)
    want = _attn_both(CPU_OPS, case, qc, kc, vc, goc)
    _check(got, want, dtype, f"local_attn {_attn_id(case)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [ATTN[0], ATTN[1], ATTN[3], ATTN[6]], ids=_attn_id)
def test_local_attention_prefetching_kernels_are_bitwise_the_default(emu, monkeypatch, case, dtype):
    # the same sums in the same order, with the next key's (query's) rows loaded one step ahead
    q, k, v, go = (t.to(dtype) for t in _attn_inputs(case, dtype))
    results = []
    for prefetch in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_ATTN_PREFETCH", prefetch)
        results.append(_attn_both(emu, case, q, k, v, go))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# The tiled forward (SA2VP_CUDA_ATTN_TILED=1): the same sums in the same order as the default kernel,
# with the keys and values read from the tile's halo in shared memory. Every case of ATTN with rows of
# at most 4 vectors per lane (the others keep the default kernel: same launch, which the test checks),
# windows 1 to 9, grids smaller than a tile and larger (17 x 16: several tiles per row and column).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ATTN, ids=_attn_id)
def test_local_attention_tiled_forward_is_bitwise_the_default(emu, monkeypatch, case, dtype):
    B, H, (gh, gw), P, D, w, zb = case
    q, k, v, _ = (t.to(dtype) for t in _attn_inputs(case, dtype))
    results, launches = [], []
    for tiled in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_ATTN_TILED", tiled)
        before = emu.stats().tolist()
        results.append(emu.local_attn_fwd(q, k, v, gh, gw, w, P, zb, D ** -0.5))
        after = emu.stats().tolist()
        launches.append((after[1] - before[1], after[3] - before[3]))  # (blocks, block barriers)
    # the tiled kernel runs for rows of at most 4 vectors per lane of a 32-lane group (one slab)
    tiled_runs = -(-D // (16 // dtype.itemsize)) <= 4 * 32
    assert (launches[0] != launches[1]) == tiled_runs, launches
    for a, b in zip(*results):
        assert not a.isnan().any() and torch.equal(a, b)


def test_local_attention_strided_inputs(emu):
    # q, k, v as views of one fused (B, N, 3, heads, D) projection, transposed to (B, heads, N, D)
    B, H, gh, gw, P, D = 2, 3, 4, 5, 1, 16
    qkv = torch.randn(B, P + gh * gw, 3, H, D, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    case = (B, H, (gh, gw), P, D, 3, False)
    go = torch.randn(B, H, P + gh * gw, D, dtype=torch.float64)
    _check(_attn_both(emu, case, q, k, v, go), _attn_both(CPU_OPS, case, q, k, v, go), torch.float64,
           "local_attn strided")


class _EmuAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, q, k, v, grid, window, num_prefix, zero_border):
        scale = q.shape[-1] ** -0.5
        out, lse = ops.local_attn_fwd(q, k, v, grid[0], grid[1], window, num_prefix, zero_border, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ops, grid, window, num_prefix, zero_border, scale)
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out, lse = ctx.saved_tensors
        ops, grid, window, num_prefix, zero_border, scale = ctx.args
        dq, dk, dv = ops.local_attn_bwd(go.contiguous(), q, k, v, out, lse, grid[0], grid[1], window, num_prefix,
                                        zero_border, scale)
        return None, dq, dk, dv, None, None, None, None


@pytest.mark.parametrize("zero_border", [False, True])
@pytest.mark.parametrize("grid,window,num_prefix,heads,dim", [
    ((2, 3), 3, 1, 2, 8),
    ((3, 2), 5, 0, 1, 5),
    ((1, 1), 1, 3, 1, 4),
])
def test_local_attention_gradcheck(emu, grid, window, num_prefix, heads, dim, zero_border):
    N = num_prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(1, heads, N, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: _EmuAttention.apply(emu, q, k, v, grid, window, num_prefix, zero_border), (q, k, v))


def test_local_attention_bad_arguments_raise(emu):
    # the argument checks run on the host before any launch (a wrong N must not reach a kernel)
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(RuntimeError, match="N"):
        emu.local_attn_fwd(q, q, q, 2, 3, 3, 1, False, 0.5)
    with pytest.raises(RuntimeError, match="window"):
        emu.local_attn_fwd(q, q, q, 2, 2, 2, 1, False, 0.5)
    out, lse = emu.local_attn_fwd(q, q, q, 2, 2, 3, 1, False, 0.5)
    with pytest.raises(RuntimeError, match="lse must have dtype"):
        emu.local_attn_bwd(out, q, q, q, out, lse.double(), 2, 2, 3, 1, False, 0.5)


# ---- prompt_add -------------------------------------------------------------------------------------

# (B, N, C, r, dropout_p, deep, layout)
PROMPT_ADD = [
    (2, 7, 40, 3, 0.0, False, "contiguous"),
    (1, 13, 64, 8, 0.3, True, "contiguous"),
    (2, 9, 24, 17, 0.0, True, "contiguous"),   # r > 16: 32 ranks per pass of the columns kernel
    (3, 50, 33, 16, 0.1, False, "contiguous"),  # odd C (no vector loads), several token splits
    (2, 11, 48, 5, 0.2, True, "strided"),      # rows of a wider tensor, misaligned (no vector loads)
    (2, 6, 96, 8, 0.0, False, "padded"),       # rows of a wider tensor, aligned (vector loads)
    (1, 197, 768, 16, 0.1, True, "contiguous"),  # ViT-B sizes
    (2, 3, 4096, 16, 0.3, True, "contiguous"),  # 65 KiB of shared memory per warp forward, 131 KiB backward
    (3, 7, 1024, 64, 0.3, False, "contiguous"),  # r = 64: two passes of the columns kernel
    (1, 1, 40, 1, 0.3, True, "contiguous"),     # one row: 3 of the warp's 4 rows empty
    (3, 7, 96, 1, 0.0, False, "contiguous"),    # 21 rows: a one-row warp and idle warps in the last block
    (3, 7, 64, 64, 0.3, True, "offset"),        # odd storage offset: misaligned, scalar loads
]


def _pa_id(c):
    B, N, C, r, p, deep, layout = c
    return f"B{B}N{N}C{C}r{r}p{p}{'deep' if deep else ''}_{layout}"


def _rows(x, layout):
    """x (B, N, C) laid out as rows of a wider tensor when `layout` asks for it."""
    if layout == "contiguous":
        return x
    B, N, C = x.shape
    if layout == "offset":
        flat = torch.zeros(B * N * C + 1, dtype=x.dtype)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(B, N, C)
    wide = torch.zeros(B, N, C + 8, dtype=x.dtype)
    start = 1 if layout == "strided" else 8
    wide[..., start:start + C] = x
    return wide[..., start:start + C]


def _pa_inputs(case, seed=0):
    B, N, C, r, p, deep, layout = case
    g = torch.Generator().manual_seed(seed)

    def rn(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    t = (rn(B, N, C), rn(B, N, C), 1 + rn(C, scale=0.1), rn(C, scale=0.1), rn(r, C, scale=C ** -0.5),
         rn(r, scale=0.1), rn(C, r, scale=r ** -0.5), rn(C, scale=0.1),
         rn(1, N, C) if deep else None, rn(C) if deep else None, rn(B, N, C))
    return t


def _pa_both(ops, case, t, layout, seed=7):
    B, N, C, r, p, deep, _ = case
    target, message = _rows(t[0], layout), _rows(t[1], layout)
    out, mean, rstd, z = ops.prompt_add_fwd(target, message, *t[2:10], 0.7, p, 1e-6, seed)
    grads = ops.prompt_add_bwd(_rows(t[10], layout), message, mean, rstd, z, t[2], t[3], t[4], t[6], 0.7, p, seed)
    return (out, mean, rstd, z) + tuple(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", PROMPT_ADD, ids=_pa_id)
def test_prompt_add_matches_cpu(emu, case, dtype):
    low, cpu = _as(dtype, *_pa_inputs(case))
    layout = case[6]
    if dtype == torch.float64 and case[2] == 4096:
        # 262 KiB of shared memory per warp in the backward: more than a GPU has, a clear error
        with pytest.raises(RuntimeError, match="too large for the CUDA kernels"):
            _pa_both(emu, case, low, layout)
        return
    got = _pa_both(emu, case, low, layout)
    want = _pa_both(CPU_OPS, case, cpu, layout)
    # mean, rstd and z are float32 statistics on both sides for float16 / bfloat16 inputs
    _check(got, want, dtype, f"prompt_add {_pa_id(case)}")


# The forward with the weights staged in shared memory (the default where they fit;
# SA2VP_CUDA_PROMPT_ADD_STAGED=0: the other one): same sums in the same order as the other forward. Cases:
# ViT-B in 16 bits (two blocks, each looping twice over its groups of rows with the emulator's two SMs),
# odd C (scalar loads), an odd storage offset, and 800 rows of C = 40 (vector loads, several passes of the
# row loop).
STAGED_CASES = [PROMPT_ADD[6], PROMPT_ADD[3], PROMPT_ADD[11], (4, 200, 40, 3, 0.2, True, "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", STAGED_CASES, ids=_pa_id)
def test_prompt_add_staged_forward_is_bitwise_the_default(emu, monkeypatch, case, dtype):
    B, N, C, r, p, deep, layout = case
    t = _as(dtype, *_pa_inputs(case))[0]
    target, message = _rows(t[0], layout), _rows(t[1], layout)
    results, launches = [], []
    for staged in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_PROMPT_ADD_STAGED", staged)
        before = emu.stats().tolist()
        results.append(emu.prompt_add_fwd(target, message, *t[2:10], 0.7, p, 1e-6, 11))
        after = emu.stats().tolist()
        launches.append((after[1] - before[1], after[2] - before[2]))  # (blocks, threads)
    staged_fits = 2 * r * C * dtype.itemsize <= 64 * 1024
    # the staged kernel ran: its blocks have more warps (and with many rows, fewer blocks)
    assert (launches[0] != launches[1]) == staged_fits, launches
    for a, b in zip(*results):
        assert not a.isnan().any() and torch.equal(a, b)


# The backward's parameter gradients from the finalize kernel (the default) and from ATen ops on the
# partials (SA2VP_CUDA_PROMPT_ADD_FINALIZE=0): the same sums in another order. Cases: ViT-B sizes with
# many token splits, r = 64 (two passes of the columns kernel), r = 1, one row, and r = 130 (past the
# finalize kernel's 128 lanes: ATen ops either way), each also against the CPU kernels.
FINALIZE_CASES = [PROMPT_ADD[6], PROMPT_ADD[8], PROMPT_ADD[10], PROMPT_ADD[9], (2, 3, 40, 130, 0.3, True, "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", FINALIZE_CASES, ids=_pa_id)
def test_prompt_add_finalize_kernel_matches_aten_sums(emu, monkeypatch, case, dtype):
    low, cpu = _as(dtype, *_pa_inputs(case, seed=3))
    layout = case[6]
    results, launches = [], []
    for fin in ("1", "0"):
        monkeypatch.setenv("SA2VP_CUDA_PROMPT_ADD_FINALIZE", fin)
        before = emu.stats().tolist()
        results.append(_pa_both(emu, case, low, layout))
        launches.append(emu.stats().tolist()[0] - before[0])  # kernel launches
    # the finalize kernel is one more launch, where the rank fits its lanes
    assert launches[0] - launches[1] == (1 if case[3] <= 128 else 0), launches
    want = _pa_both(CPU_OPS, case, cpu, layout)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i, (a, b, c) in enumerate(zip(*results, want)):
        scale = c.abs().max().item() + 1e-30
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=f"output {i}")
    _check(results[0], want, dtype, f"prompt_add finalize {_pa_id(case)}")


class _EmuPromptAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, p, target, message, nw, nb, dw, db, uw, ub, deep, ds):
        out, mean, rstd, z = ops.prompt_add_fwd(target, message, nw, nb, dw, db, uw, ub, deep, ds, 0.7, p, 1e-6, 3)
        ctx.save_for_backward(message, mean, rstd, z, nw, nb, dw, uw, deep, ds)
        ctx.ops, ctx.p = ops, p
        return out

    @staticmethod
    def backward(ctx, go):
        message, mean, rstd, z, nw, nb, dw, uw, deep, ds = ctx.saved_tensors
        gm, gnw, gnb, gdw, gdb, guw, gub = ctx.ops.prompt_add_bwd(go.contiguous(), message, mean, rstd, z, nw, nb,
                                                                  dw, uw, 0.7, ctx.p, 3)
        gdeep = (go.sum(0, keepdim=True) * ds) if deep is not None else None
        gds = (go * deep).sum((0, 1)) if deep is not None else None
        return None, None, go, gm, gnw, gnb, gdw, gdb, guw, gub, gdeep, gds


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("B,N,C,r,deep", [(1, 7, 24, 3, True), (2, 3, 5, 2, False)])
def test_prompt_add_gradcheck(emu, B, N, C, r, deep, p):
    t = _pa_inputs((B, N, C, r, p, deep, "contiguous"), seed=1)[:10]
    t = tuple(x.requires_grad_() if x is not None else None for x in t)
    assert torch.autograd.gradcheck(lambda *a: _EmuPromptAdd.apply(emu, p, *a), t)


# ---- prompt_map -------------------------------------------------------------------------------------

# (grid, prompt grid, num_prefix, C, r)
PROMPT_MAP = [
    ((14, 14), (14, 14), 1, 40, 8),
    ((7, 9), (4, 5), 1, 33, 3),
    ((5, 3), (10, 7), 0, 24, 5),
    ((6, 6), (3, 3), 2, 300, 11),  # several column blocks and rank slices of the weight kernel
]


def _pm_id(c):
    (gh, gw), (eh, ew), P, C, r = c
    return f"{gh}x{gw}from{eh}x{ew}p{P}C{C}r{r}"


def _pm_both(ops, case, e, w, b, pos, go):
    (gh, gw), (eh, ew), P, C, r = case
    out = ops.prompt_map_fwd(e, w, b, pos, gh, gw, eh, ew, P)
    return (out,) + tuple(ops.prompt_map_bwd(go, e, w, gh, gw, eh, ew, P))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", PROMPT_MAP, ids=_pm_id)
def test_prompt_map_matches_cpu(emu, case, dtype):
    (gh, gw), (eh, ew), P, C, r = case
    g = torch.Generator().manual_seed(0)
    ts = (torch.randn(P + eh * ew, r, generator=g, dtype=torch.float64), torch.randn(C, r, generator=g, dtype=torch.float64),
          torch.randn(C, generator=g, dtype=torch.float64), torch.randn(1, P + gh * gw, C, generator=g, dtype=torch.float64),
          torch.randn(1, P + gh * gw, C, generator=g, dtype=torch.float64))
    low, cpu = _as(dtype, *ts)
    _check(_pm_both(emu, case, *low), _pm_both(CPU_OPS, case, *cpu), dtype, f"prompt_map {_pm_id(case)}")


class _EmuPromptMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, shape, e, w, b):
        (gh, gw), (eh, ew), P = shape
        ctx.save_for_backward(e, w)
        ctx.ops, ctx.shape = ops, shape
        return ops.prompt_map_fwd(e, w, b, None, gh, gw, eh, ew, P)

    @staticmethod
    def backward(ctx, go):
        e, w = ctx.saved_tensors
        (gh, gw), (eh, ew), P = ctx.shape
        ge, gw_, gb = ctx.ops.prompt_map_bwd(go.contiguous(), e, w, gh, gw, eh, ew, P)
        return None, None, ge, gw_, gb


@pytest.mark.parametrize("grid,embed_grid,num_prefix", [((3, 4), (2, 3), 1), ((2, 2), (4, 3), 0)])
def test_prompt_map_gradcheck(emu, grid, embed_grid, num_prefix):
    C, r = 5, 3
    e = torch.randn(num_prefix + embed_grid[0] * embed_grid[1], r, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, w, b: _EmuPromptMap.apply(emu, (grid, embed_grid, num_prefix), e, w, b),
                                    (e, w, b))


# ---- thread order -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["local_attn", "local_attn_prefetch", "local_attn_tiled", "prompt_add", "prompt_add_staged",
                                "prompt_map"])
def test_results_do_not_depend_on_thread_order(emu, monkeypatch, op):
    """Threads resumed in reverse order between barriers give the same bits: no kernel reads what
    another thread writes without a barrier in between (in the emulator's model)."""
    monkeypatch.setenv("SA2VP_CUDA_ATTN_PREFETCH", "1" if op == "local_attn_prefetch" else "0")
    monkeypatch.setenv("SA2VP_CUDA_ATTN_TILED", "1" if op == "local_attn_tiled" else "0")
    monkeypatch.setenv("SA2VP_CUDA_PROMPT_ADD_STAGED", "1" if op == "prompt_add_staged" else "0")

    def run():
        if op.startswith("local_attn"):
            case = ATTN[1]
            return _attn_both(emu, case, *_attn_inputs(case, torch.float32))
        if op.startswith("prompt_add"):
            case = STAGED_CASES[3] if op == "prompt_add_staged" else PROMPT_ADD[3]
            return _pa_both(emu, case, _pa_inputs(case), case[6])
        case = PROMPT_MAP[3]
        (gh, gw), (eh, ew), P, C, r = case
        g = torch.Generator().manual_seed(0)
        return _pm_both(emu, case, torch.randn(P + eh * ew, r, generator=g), torch.randn(C, r, generator=g),
                        torch.randn(C, generator=g), None, torch.randn(1, P + gh * gw, C, generator=g))

    try:
        emu.set_schedule(0)
        forward = run()
        emu.set_schedule(1)
        reverse = run()
    finally:
        emu.set_schedule(0)
    for a, b in zip(forward, reverse):
        assert torch.equal(a, b)
