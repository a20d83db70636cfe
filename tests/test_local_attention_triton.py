"""Triton-specific checks of the local cross attention kernels (sa2vp_kernels/triton/local_attn.py).

The generic backend matrix lives in test_local_attention.py. Here: both kernel families (the tiled
tensor-core kernels and the window-walking fallback), tiles in whole grid rows and in column blocks,
tile and head-dim chunk boundaries, head dims that are not powers of two (also one spanning many
chunks), windows wider than the grid, stride-0 and fused-projection inputs, the ops' own contracts,
and on a GPU the half-precision accuracy, the real shapes and bitwise-reproducible backward. Without a
GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so the shapes stay small.
"""
import pytest
import torch
import triton

from sa2vp_kernels.reference import local_cross_attention_lse, local_cross_attention_vectorized
from sa2vp_kernels.triton import local_attn as tla

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BORDERS = ["clip", "zero"]

fwd_op = tla.local_attn_fwd_triton
bwd_op = tla.local_attn_bwd_triton


def _rand(*shape, dtype=torch.float64, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _qkv(B, H, N, D, dtype=torch.float64, seed=0):
    return [_rand(B, H, N, D, dtype=dtype, seed=seed + i) for i in range(3)]


def _reference(q, k, v, grid, window, T, border, scale, grad):
    """Output, lse and (dq, dk, dv) of the vectorised reference (autograd) on the given inputs."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = local_cross_attention_vectorized(q, k, v, grid, window, T, border, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    lse = local_cross_attention_lse(q.detach(), k.detach(), grid, window, T, border, scale)
    return out.detach(), lse, grads


def _run(q, k, v, grid, window, T, border, scale, grad):
    args = (grid[0], grid[1], window, T, border == "zero", scale)
    out, lse = fwd_op(q, k, v, *args)
    grads = bwd_op(grad, q, k, v, out, lse, *args)
    return out, lse, grads


def _assert_matches_reference(q, k, v, grid, window, T, border, scale=None, tol=1e-10, seed=9):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grad = _rand(*q.shape, dtype=q.dtype, seed=seed)
    out, lse, grads = _run(q, k, v, grid, window, T, border, scale, grad)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, grid, window, T, border, scale, grad)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# (B, heads, grid, window, num_prefix, head_dim). Tiled kernels: the 7 x 7 grid splits into bands of
# rows with a partial last band, the 2 x 40 grid (wider than the whole-row limit) into 16-column tiles
# whose halos cross tile edges, and D = 130 / 768 span several head-dim chunks in float32 (32 wide)
# and float64 (up to 16 wide).
TILE_CASES = [
    (3, 2, (5, 7), 3, 1, 8),
    (1, 2, (4, 3), 5, 1, 130),
    (1, 2, (3, 5), 3, 3, 768),
    (2, 1, (7, 7), 5, 0, 40),
    (1, 3, (2, 3), 1, 3, 24),
    (2, 1, (1, 1), 3, 1, 24),
    (1, 2, (2, 40), 3, 1, 8),
    (1, 1, (3, 37), 5, 2, 24),
]


def _case_id(case):
    B, H, grid, window, T, D = case
    return f"B{B}-H{H}-g{grid[0]}x{grid[1]}-w{window}-T{T}-D{D}"


def _plan(grid, window, T, D, dtype=torch.float64):
    """The tiling the launchers pick (radii clipped to the grid, as they do)."""
    rad = window // 2
    return tla._tile_plan(grid[0], grid[1], min(rad, grid[0] - 1), min(rad, grid[1] - 1), T, D, dtype)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", TILE_CASES, ids=_case_id)
def test_tiled_kernels_match_reference(case, border):
    B, H, grid, window, T, D = case
    assert _plan(grid, window, T, D) is not None
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, seed=1)
    _assert_matches_reference(q, k, v, grid, window, T, border)


def test_tiled_kernels_float32():
    # float32 runs the exact ("ieee") tl.dot path, float64 a broadcast product: check the former.
    q, k, v = _qkv(2, 2, 1 + 5 * 7, 40, dtype=torch.float32, seed=11)
    for border in BORDERS:
        _assert_matches_reference(q, k, v, (5, 7), 3, 1, border, tol=2e-5)


# The forward and the backward's dq with the prefix queries fused into the grid tiles (FWD_FUSED_PREFIX,
# BWD_FUSED_PREFIX): each tile sums its own keys for every prefix query, the first tile of a slice also
# the prefix keys; a second kernel adds the tiles' parts. Cases: whole-row bands with a partial last band, 16-column tiles with halos across
# tile edges, one tile per slice (1 x 1), several prefix tokens, chunked head dims.
FUSED_CASES = [c for c in TILE_CASES if c[4] >= 1]


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_fused_prefix_matches_reference(case, border, monkeypatch):
    monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "BWD_FUSED_PREFIX", True)
    B, H, grid, window, T, D = case
    rad = window // 2
    plan = tla._tile_plan(grid[0], grid[1], min(rad, grid[0] - 1), min(rad, grid[1] - 1), T, D, torch.float64, T)
    # (float64 tiles hold a quarter of the scores: the 3 x 37 grid's wider tiles do not fit, and its
    # prefix queries run as programs of their own)
    assert (plan is None) == (grid == (3, 37))
    assert plan is None or plan.block >= plan.rows * plan.cols + T
    launched = []
    real = tla._launch
    monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw)))
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, seed=2)
    _assert_matches_reference(q, k, v, grid, window, T, border)
    assert launched.count(tla._combine_parts_kernel) == (2 if plan is not None else 0)  # forward and dq
    assert launched[0] == tla._local_attn_fwd_tiled_kernel


def test_fused_prefix_float32_and_gradcheck(monkeypatch):
    monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "BWD_FUSED_PREFIX", True)
    q, k, v = _qkv(2, 2, 2 + 5 * 7, 40, dtype=torch.float32, seed=12)
    for border in BORDERS:
        _assert_matches_reference(q, k, v, (5, 7), 3, 2, border, tol=2e-5)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2 + 3 * 4, 8, seed=6))
    assert torch.autograd.gradcheck(lambda q, k, v: fwd_op(q, k, v, 3, 4, 3, 2, True, 0.6)[0], (q, k, v),
                                    fast_mode=True)


@pytest.mark.parametrize("fused", [False, True], ids=["prefix-programs", "fused-prefix"])
@pytest.mark.parametrize("border", BORDERS)
def test_early_values_match_reference(border, fused, monkeypatch):
    """FWD_EARLY_V: the values loaded with the queries and keys (head dims of one chunk)."""
    monkeypatch.setattr(tla, "FWD_EARLY_V", True)
    monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", fused)
    for B, H, grid, window, T, D in [(3, 2, (5, 7), 3, 1, 8), (1, 1, (3, 37), 5, 2, 24)]:
        rad = window // 2
        plan = tla._tile_plan(grid[0], grid[1], min(rad, grid[0] - 1), min(rad, grid[1] - 1), 0, D, torch.float32)
        assert D <= plan.block_dc  # (the early loads apply; float32: chunks of 16 or 32)
        q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, dtype=torch.float32, seed=4)
        _assert_matches_reference(q, k, v, grid, window, T, border, tol=2e-5)


def test_fused_prefix_falls_back_to_prefix_programs(monkeypatch):
    """More prefix tokens than _FUSED_PREFIX_MAX: the prefix queries run as programs of their own."""
    monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "BWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "_FUSED_PREFIX_MAX", 2)
    launched = []
    real = tla._launch
    monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw)))
    q, k, v = _qkv(1, 2, 3 + 4 * 5, 8, seed=3)
    _assert_matches_reference(q, k, v, (4, 5), 3, 3, "zero")
    assert tla._combine_parts_kernel not in launched


# Prefix queries with their keys split among several programs (FWD_PREFIX_SPLITS / the tuned setting
# fwd_prefix_splits): parts of whole key blocks, the last one shorter, combined by _combine_parts_kernel.
# Cases: (B, H, grid, window, T, D, dtype, requested splits, parts that gives).
SPLIT_CASES = [
    (2, 2, (5, 7), 3, 3, 130, torch.float64, 4, 3),    # 38 keys in blocks of 16: 16 + 16 + 6
    (1, 2, (9, 11), 5, 1, 40, torch.float64, 8, 2),    # 100 keys in blocks of 64: one block each
    (2, 1, (4, 5), 3, 2, 130, torch.float32, 16, 1),   # 22 keys in blocks of 32: no split
    (1, 3, (6, 4), 3, 1, 130, torch.float32, 3, 1),    # 25 keys, one block: no split
    (1, 1, (7, 6), 3, 2, 130, torch.float32, 2, 2),    # 44 keys: 32 + 12
]


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2][0]}x{c[2][1]}-T{c[4]}-D{c[5]}-"
                         f"{str(c[6]).split('.')[-1]}-s{c[7]}")
def test_split_prefix_matches_reference(case, border, monkeypatch):
    B, H, grid, window, T, D, dtype, splits, parts = case
    monkeypatch.setattr(tla, "FWD_PREFIX_SPLITS", splits)
    cfg = tla._fwd_config(D, dtype)
    assert tla._prefix_splits(splits, T + grid[0] * grid[1], cfg.block_n)[0] == parts
    launched = []
    real = tla._launch
    monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append((kernel, kw)), real(kernel, *a, **kw)))
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, dtype=dtype, seed=7)
    _assert_matches_reference(q, k, v, grid, window, T, border, **({"tol": 2e-5} if dtype == torch.float32 else {}))
    fwd = [kw for kernel, kw in launched if kernel is tla._local_attn_fwd_tiled_kernel]
    assert fwd and all(kw["PREFIX_SPLITS"] == parts for kw in fwd)
    combines = sum(kernel is tla._combine_parts_kernel for kernel, _ in launched)
    assert combines == (len(fwd) if parts > 1 else 0)


def test_split_prefix_gradcheck_and_settings(monkeypatch):
    """float64 gradcheck through the split forward (the backward reads its log-sum-exps); the tuned
    setting fwd_prefix_splits takes precedence over the module default."""
    from sa2vp_kernels.triton import tuning

    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 2 + 4 * 5, 130, seed=8))
    with tuning.override(local_attention={"fwd_prefix_splits": 2}):
        assert torch.autograd.gradcheck(lambda q, k, v: fwd_op(q, k, v, 4, 5, 3, 2, False, 0.3)[0], (q, k, v),
                                        fast_mode=True)
        out, lse = fwd_op(q, k, v, 4, 5, 3, 2, False, 0.3)
    monkeypatch.setattr(tla, "FWD_PREFIX_SPLITS", 2)
    with tuning.override(local_attention={"fwd_prefix_splits": 1}):
        launched = []
        real = tla._launch
        monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw)))
        out1, lse1 = fwd_op(q, k, v, 4, 5, 3, 2, False, 0.3)
    assert tla._combine_parts_kernel not in launched
    torch.testing.assert_close(out, out1)
    torch.testing.assert_close(lse, lse1)
    assert tla.settings_label({"fwd_prefix_splits": 8, "fwd_early_v": True, "fwd_num_warps": 4}) == "early-v split8 w4"


# The row-streaming forward (FWD_STREAM / the tuned setting fwd_stream): programs walk runs of grid rows
# (segments) of a slice with rows y - 1, y, y + 1 of keys and values in registers; the prefix queries take
# an online softmax over the prefix keys and each row as it arrives, their parts over the segments of a
# slice combined by _combine_parts_kernel. Cases: (B, H, grid, window, T, D, dtype, requested segments,
# segments that gives): grids of one row and one column, 17 columns (32 lanes), window 1, no prefix and
# 16 prefix tokens (the most it takes), D = 128 (the widest), segments of one row, uneven segments.
STREAM_CASES = [
    (2, 3, (5, 7), 3, 1, 24, torch.float64, 2, 2),
    (1, 2, (4, 3), 3, 3, 40, torch.float64, 3, 2),
    (1, 1, (1, 5), 3, 0, 8, torch.float64, 4, 1),
    (1, 2, (6, 1), 1, 2, 8, torch.float64, 4, 3),
    (2, 1, (3, 17), 3, 1, 40, torch.float32, 1, 1),
    (1, 1, (1, 1), 3, 1, 24, torch.float64, 2, 1),
    (1, 1, (3, 5), 3, 16, 8, torch.float64, 3, 3),
    (1, 1, (3, 4), 3, 1, 128, torch.float32, 2, 2),
    (1, 2, (7, 6), 3, 2, 16, torch.float64, 7, 7),
]


def _forward_kernels(monkeypatch):
    """Record the forward kernels the launchers start."""
    launched = []
    real = tla._launch
    monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw)))
    return launched


def _stream_id(c):
    return f"{c[0]}x{c[1]}-{c[2][0]}x{c[2][1]}-w{c[3]}-T{c[4]}-D{c[5]}-{str(c[6]).split('.')[-1]}-seg{c[7]}"


# The default load form (prefetch) on every case, the other two on a few (uneven segments with three
# prefix tokens, 16 prefix tokens in one-row segments, float32 at D = 128, window 1).
STREAM_FORWARD_CASES = ([(c, "prefetch") for c in STREAM_CASES]
                        + [(STREAM_CASES[i], loads) for i in (1, 3, 6, 7) for loads in ("keep", "reload")])


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case,loads", STREAM_FORWARD_CASES, ids=lambda c: c if isinstance(c, str) else _stream_id(c))
def test_stream_forward_matches_reference(case, border, loads, monkeypatch):
    B, H, grid, window, T, D, dtype, requested, segments = case
    assert tla._stream_segments(requested, grid[0])[0] == segments
    monkeypatch.setattr(tla, "FWD_STREAM", True)
    monkeypatch.setattr(tla, "STREAM_RELOAD", loads == "reload")
    monkeypatch.setattr(tla, "STREAM_PREFETCH", loads == "prefetch")
    monkeypatch.setattr(tla, "_STREAM_SEGMENTS", requested)
    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = _forward_kernels(monkeypatch)
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, dtype=dtype, seed=12)
    _assert_matches_reference(q, k, v, grid, window, T, border, **({"tol": 2e-5} if dtype == torch.float32 else {}))
    assert launched[0] is tla._local_attn_fwd_stream_kernel
    assert tla._local_attn_fwd_tiled_kernel not in launched and tla._local_attn_fwd_kernel not in launched
    # the prefix queries' parts are combined where a slice has several segments
    assert (launched[1] is tla._combine_parts_kernel) == (segments > 1 and T > 0)


def test_stream_forward_views_and_gradcheck(monkeypatch):
    """Stride-0 queries and fused-projection views; a float64 gradcheck through the streaming forward
    (the backward reads its log-sum-exps), turned on by the tuned setting fwd_stream."""
    from sa2vp_kernels.triton import tuning

    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = _forward_kernels(monkeypatch)
    B, H, T, grid, D = 3, 2, 2, (3, 4), 24
    N = T + grid[0] * grid[1]
    q = _rand(1, H, N, D, seed=3).expand(B, H, N, D)
    k, v = _rand(B, N, H, 2, D, seed=4).permute(3, 0, 2, 1, 4).unbind(0)
    for loads in ({"stream_prefetch": False}, {"stream_reload": True}, {"stream_prefetch": True}):
        with tuning.override(local_attention={"fwd_stream": True, **loads}):
            for border in BORDERS:
                _assert_matches_reference(q, k, v, grid, 3, T, border)
    with tuning.override(local_attention={"fwd_stream": True}):
        q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 1 + 3 * 4, 8, seed=13))
        assert torch.autograd.gradcheck(lambda q, k, v: fwd_op(q, k, v, 3, 4, 3, 1, True, 0.7)[0], (q, k, v),
                                        fast_mode=True)
    assert tla._local_attn_fwd_stream_kernel in launched
    assert tla._local_attn_fwd_tiled_kernel not in launched and tla._local_attn_fwd_kernel not in launched
    assert tla.settings_label({"fwd_stream": True, "stream_num_warps": 8, "stream_stages": 3}) == \
        "stream stream-w8 stream-st3"
    assert tla.settings_label({"fwd_stream": True, "stream_reload": True, "stream_segments": 1}) == \
        "stream reload stream-seg1"
    assert tla.settings_label({"fwd_stream": True, "stream_prefetch": False}) == "stream keep"


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", STREAM_CASES, ids=_stream_id)
def test_stream_backward_matches_reference(case, border, monkeypatch):
    """BWD_STREAM: dq, dk, dv in one walk over each segment's rows (plus a row above and below), the
    prefix queries' dq in parts over the segments of a slice."""
    B, H, grid, window, T, D, dtype, requested, segments = case
    monkeypatch.setattr(tla, "BWD_STREAM", True)
    monkeypatch.setattr(tla, "_BWD_STREAM_SEGMENTS", requested)
    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = _forward_kernels(monkeypatch)
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, dtype=dtype, seed=15)
    _assert_matches_reference(q, k, v, grid, window, T, border, **({"tol": 2e-5} if dtype == torch.float32 else {}))
    bwd = launched[launched.index(tla._local_attn_bwd_stream_kernel):]
    assert bwd[1:] == ([tla._combine_parts_kernel] if segments > 1 and T > 0 else [])


def test_stream_forward_and_backward_gradcheck_and_fallback(monkeypatch):
    """A float64 gradcheck with both passes streaming (turned on by the tuned settings); a call the
    streaming backward does not take (window 5) runs the tiled kernels."""
    from sa2vp_kernels.triton import tuning

    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = _forward_kernels(monkeypatch)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2 + 4 * 3, 8, seed=16))
    with tuning.override(local_attention={"fwd_stream": True, "bwd_stream": True}):
        assert torch.autograd.gradcheck(lambda q, k, v: fwd_op(q, k, v, 4, 3, 3, 2, False, 0.8)[0], (q, k, v),
                                        fast_mode=True)
        assert tla._local_attn_bwd_stream_kernel in launched and tla._local_attn_bwd_dq_tiled_kernel not in launched
        launched.clear()
        _assert_matches_reference(*(t.detach() for t in (q, k, v)), (4, 3), 5, 2, "zero")
    assert tla._local_attn_bwd_stream_kernel not in launched and tla._local_attn_bwd_dq_tiled_kernel in launched
    assert tla.settings_label({"bwd_stream": True}) == "bwd stream"


# FWD_INLINE_COMBINE / the tuned setting fwd_inline_combine: wherever the forward splits the prefix
# queries among programs, the last program of a slice (fused tiles, streaming segments) or of a prefix
# query (split prefix keys) to finish combines the parts, counted by an atomic counter, instead of
# _combine_parts_kernel in a second launch. Cases: (path, B, H, grid, T, D, parts per query).
INLINE_CASES = [
    ("fused", 2, 2, (5, 7), 2, 24, 3),       # whole-row tiles of 2 rows: 3 tiles per slice
    ("split", 1, 2, (8, 9), 1, 40, 2),       # 73 keys in blocks of 64
    ("stream", 2, 1, (4, 3), 3, 40, 2),      # two segments per slice, three prefix tokens
]


@pytest.mark.parametrize("case", INLINE_CASES, ids=lambda c: c[0])
def test_inline_combine_matches_reference_and_the_second_launch(case, monkeypatch):
    from sa2vp_kernels.triton import tuning

    path, B, H, grid, T, D, parts = case
    settings = {"fused": {"fwd_fused_prefix": True}, "split": {"fwd_prefix_splits": 8},
                "stream": {"fwd_stream": True, "stream_segments": 2}}[path]
    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = []
    real = tla._launch
    monkeypatch.setattr(tla, "_launch", lambda kernel, *a, **kw: (launched.append((kernel, kw)), real(kernel, *a, **kw)))
    N = T + grid[0] * grid[1]
    # (a first call on other inputs, so that buffers the inline combine failed to write would hold its
    # outputs, not these)
    q0, k0, v0 = _qkv(B, H, N, D, seed=30)
    q, k, v = _qkv(B, H, N, D, seed=31)
    with tuning.override(local_attention=settings):
        separate = fwd_op(q, k, v, grid[0], grid[1], 3, T, True, 0.4)
    with tuning.override(local_attention={**settings, "fwd_inline_combine": True}):
        fwd_op(q0, k0, v0, grid[0], grid[1], 3, T, True, 0.4)
        launched.clear()
        _assert_matches_reference(q, k, v, grid, 3, T, "clip")
        inline = fwd_op(q, k, v, grid[0], grid[1], 3, T, True, 0.4)
    fwd = [(kernel, kw) for kernel, kw in launched if "INLINE_COMBINE" in kw]
    assert fwd and all(kw["INLINE_COMBINE"] and kw["BLOCK_PARTS"] == triton.next_power_of_2(parts) for _, kw in fwd)
    assert tla._combine_parts_kernel not in [kernel for kernel, kw in launched if "WEIGHTED" in kw and kw["WEIGHTED"]]
    # the same sums in the same order as the second launch's
    assert torch.equal(inline[0], separate[0]) and torch.equal(inline[1], separate[1])
    assert tla.settings_label({**settings, "fwd_inline_combine": True}).endswith("inline")


def test_inline_combine_gradcheck():
    from sa2vp_kernels.triton import tuning

    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2 + 3 * 4, 8, seed=32))
    with tuning.override(local_attention={"fwd_fused_prefix": True, "fwd_inline_combine": True}):
        assert torch.autograd.gradcheck(lambda q, k, v: fwd_op(q, k, v, 3, 4, 3, 2, False, 0.6)[0], (q, k, v),
                                        fast_mode=True)


@pytest.mark.parametrize("what", ["window 5", "head dim 130", "width 33", "17 prefix tokens", "few slices"])
def test_stream_forward_falls_back_to_the_tiles(what, monkeypatch):
    """Calls the streaming forward does not take run the tiled kernels (and still match)."""
    B, H, grid, window, T, D = 1, 2, (2, 3), 3, 1, 8
    if what == "window 5":
        window = 5
    elif what == "head dim 130":
        D = 130
    elif what == "width 33":
        grid = (2, 33)
    elif what == "17 prefix tokens":
        T = 17
    monkeypatch.setattr(tla, "FWD_STREAM", True)
    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", B * H * 2 + (what == "few slices"))
    launched = _forward_kernels(monkeypatch)
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, seed=14)
    _assert_matches_reference(q, k, v, grid, window, T, "zero")
    assert tla._local_attn_fwd_stream_kernel not in launched
    assert tla._local_attn_fwd_tiled_kernel in launched


# Window-walking fallback (taken when a tile and its halo would not fit): block sizes come from the
# head dim; in float64, D = 8 gives 64-position blocks over a 210-position (batch * heads * grid)
# index, D = 130 and 768 blocks of 1 to 4 positions that split slices and 3-token prefixes.
WALK_CASES = [
    (3, 2, (5, 7), 3, 1, 8),
    (1, 2, (4, 3), 3, 1, 130),
    (1, 1, (3, 5), 3, 3, 768),
    (1, 1, (2, 3), 9, 0, 24),
]


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("case", WALK_CASES, ids=_case_id)
def test_window_walking_kernels_match_reference(case, border, monkeypatch):
    monkeypatch.setattr(tla, "_MAX_TILE_SCORES", 0)
    B, H, grid, window, T, D = case
    assert _plan(grid, window, T, D) is None
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, seed=1)
    _assert_matches_reference(q, k, v, grid, window, T, border)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("grid,window", [((2, 3), 9), ((1, 1), 7), ((1, 6), 5), ((4, 1), 3)])
def test_window_wider_than_grid(grid, window, border):
    # Only in-grid offsets are visited; with border="zero" the rest enter the softmax in closed form.
    q, k, v = _qkv(2, 1, 1 + grid[0] * grid[1], 8, seed=2)
    _assert_matches_reference(q, k, v, grid, window, 1, border, scale=0.9)


def test_stride_zero_queries_and_fused_projection_views():
    # Queries shared by the batch (stride 0, like SA2VP's prompt map), keys and values as views of a
    # fused projection laid out (B, N, heads, 2, D): no stride is the contiguous one.
    B, H, T, grid, D = 3, 2, 2, (3, 4), 24
    N = T + grid[0] * grid[1]
    q = _rand(1, H, N, D, seed=3).expand(B, H, N, D)
    kv = _rand(B, N, H, 2, D, seed=4)
    k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)
    assert q.stride(0) == 0 and k.stride(2) == 2 * H * D
    for border in BORDERS:
        _assert_matches_reference(q, k, v, grid, 3, T, border)


@pytest.mark.parametrize(
    "grid,window,T,H,D,border",
    [((2, 3), 3, 1, 1, 8, "zero"), ((1, 1), 5, 3, 1, 8, "clip"), ((5, 4), 5, 0, 3, 8, "clip"),
     ((3, 3), 3, 2, 2, 24, "zero")],
)
def test_gradcheck_float64(grid, window, T, H, D, border):
    q, k, v = (t.requires_grad_() for t in _qkv(1, H, T + grid[0] * grid[1], D, seed=5))

    def fn(q, k, v):
        return fwd_op(q, k, v, grid[0], grid[1], window, T, border == "zero", 0.6)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_output_contracts():
    B, H, T, grid, D = 2, 2, 1, (2, 3), 8
    N = T + grid[0] * grid[1]
    qkv = _rand(B, N, 3, H, D, dtype=torch.float32, seed=6)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out, lse = fwd_op(q, k, v, *grid, 3, T, False, D ** -0.5)
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape == q.shape
    assert lse.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (B, H, N)
    # A gradient with a zero stride in every dim (as autograd hands out for a summed output).
    grad = torch.ones((), dtype=torch.float32, device=DEVICE).expand(B, H, N, D)
    grads = bwd_op(grad, q, k, v, out, lse, *grid, 3, T, False, D ** -0.5)
    ref = _reference(q.double(), k.double(), v.double(), grid, 3, T, "clip", D ** -0.5,
                     grad.double())[2]
    for got, want in zip(grads, ref):
        assert got.is_contiguous() and got.dtype == torch.float32 and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_ops_reject_bad_arguments():
    q, k, v = _qkv(1, 1, 7, 8)
    with pytest.raises(ValueError, match="unit stride"):
        fwd_op(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2), 2, 3, 3, 1, False, 0.3)
    with pytest.raises(ValueError, match="tokens"):
        fwd_op(q, k, v, 2, 2, 3, 1, False, 0.3)
    with pytest.raises(ValueError, match="odd window"):
        fwd_op(q, k, v, 2, 3, 4, 1, False, 0.3)
    out, lse = fwd_op(q, k, v, 2, 3, 3, 1, False, 0.3)
    with pytest.raises(ValueError, match="lse"):
        bwd_op(out, q, k, v, out, lse[..., :3], 2, 3, 3, 1, False, 0.3)


def test_opcheck_triton_ops():
    q, k, v = _qkv(1, 2, 1 + 6, 8, dtype=torch.float32, seed=7)
    args = (2, 3, 3, 1, True, 0.4)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(fwd_op, (q, k, v, *args), test_utils=utils)
    out, lse = fwd_op(q, k, v, *args)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), q, k, v, out, lse, *args), test_utils=utils)


# ---- GPU: half precision, real shapes, reproducibility -------------------------------------------


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _low_precision_check(B, H, grid, T, D, dtype, border, seed=0):
    """Errors of the kernels and of the vectorised reference in ``dtype``, both against float64."""
    N = T + grid[0] * grid[1]
    q, k, v = _qkv(B, H, N, D, dtype=dtype, seed=seed)
    grad = _rand(B, H, N, D, dtype=dtype, seed=seed + 3)
    scale = D ** -0.5
    out, lse, grads = _run(q, k, v, grid, 3, T, border, scale, grad)
    exact = _reference(q.double(), k.double(), v.double(), grid, 3, T, border, scale, grad.double())
    plain = _reference(q, k, v, grid, 3, T, border, scale, grad)
    torch.testing.assert_close(lse.double(), exact[1], rtol=1e-4, atol=1e-4)
    for got, want, base in zip((out, *grads), (exact[0], *exact[2]), (plain[0], *plain[2])):
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        assert _max_err(got, want) <= 2 * _max_err(base, want) + 1e-4 * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768), (3, 40)], ids=["12x64", "1x768", "3x40"])
@pytest.mark.parametrize("border", BORDERS)
def test_gpu_low_precision_against_float64(dtype, heads, head_dim, border):
    _low_precision_check(4, heads, (14, 14), 1, head_dim, dtype, border)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768)], ids=["12x64", "1x768"])
@pytest.mark.parametrize("border", BORDERS)
def test_gpu_fused_prefix_against_float64(dtype, heads, head_dim, border, monkeypatch):
    monkeypatch.setattr(tla, "FWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "BWD_FUSED_PREFIX", True)
    monkeypatch.setattr(tla, "FWD_EARLY_V", True)  # (12 x 64: one chunk)
    _low_precision_check(4, heads, (14, 14), 1, head_dim, dtype, border)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768)], ids=["12x64", "1x768"])
@pytest.mark.parametrize("splits", [4, 16])
def test_gpu_split_prefix_against_float64(dtype, heads, head_dim, splits):
    from sa2vp_kernels.triton import tuning

    with tuning.override(local_attention={"fwd_prefix_splits": splits}):  # (whatever the GPU's tuned file says)
        _low_precision_check(4, heads, (14, 14), 1, head_dim, dtype, "clip")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,heads,head_dim,border", [
    (torch.bfloat16, 12, 64, "clip"), (torch.bfloat16, 12, 64, "zero"), (torch.float16, 3, 40, "clip"),
    (torch.float32, 12, 64, "zero"), (torch.bfloat16, 6, 128, "clip")], ids=str)
def test_gpu_stream_against_float64(dtype, heads, head_dim, border, monkeypatch):
    from sa2vp_kernels.triton import tuning

    monkeypatch.setattr(tla, "_STREAM_MIN_PROGRAMS", 1)
    launched = _forward_kernels(monkeypatch)
    with tuning.override(local_attention={"fwd_stream": True, "bwd_stream": True}):  # (not the GPU's tuned file)
        _low_precision_check(4, heads, (14, 14), 1, head_dim, dtype, border)
    assert tla._local_attn_fwd_stream_kernel in launched
    # (the streaming backward: 16-bit inputs only on a GPU)
    assert (tla._local_attn_bwd_stream_kernel in launched) == (dtype != torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [{"fwd_fused_prefix": True}, {"fwd_prefix_splits": 8},
                                      {"fwd_stream": True}], ids=["fused", "split8", "stream"])
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768)], ids=["12x64", "1x768"])
def test_gpu_inline_combine_against_the_second_launch(settings, heads, head_dim, monkeypatch):
    """FWD_INLINE_COMBINE on a GPU: the last program of a group reads the others' parts after an atomic
    counter says they are written. A missing release or acquire would show as outputs that differ from
    the second launch's now and then, so many calls on the benchmark's batch (many programs racing)."""
    from sa2vp_kernels.triton import tuning

    if settings.get("fwd_stream") and head_dim > tla._STREAM_MAX_D:
        pytest.skip("the streaming forward takes head dims up to 128")
    B, T, grid = 64, 1, (14, 14)
    N = T + grid[0] * grid[1]
    q, k, v = _qkv(B, heads, N, head_dim, dtype=torch.bfloat16, seed=40)
    args = (grid[0], grid[1], 3, T, False, head_dim ** -0.5)
    with tuning.override(local_attention=settings):
        want = fwd_op(q, k, v, *args)
    launched = _forward_kernels(monkeypatch)
    with tuning.override(local_attention={**settings, "fwd_inline_combine": True}):
        for _ in range(50):
            got = fwd_op(q, k, v, *args)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert tla._combine_parts_kernel not in launched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("border", BORDERS)
def test_gpu_window_walking_fallback(dtype, border, monkeypatch):
    monkeypatch.setattr(tla, "_MAX_TILE_SCORES", 0)
    _low_precision_check(4, 12, (14, 14), 1, 64, dtype, border)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768)], ids=["12x64", "1x768"])
def test_gpu_vit_base_batch_64(heads, head_dim):
    _low_precision_check(64, heads, (14, 14), 1, head_dim, torch.bfloat16, "clip", seed=10)


@pytest.mark.gpu
@pytest.mark.parametrize("border", BORDERS)
def test_gpu_large_grid(border):
    _low_precision_check(2, 4, (64, 64), 1, 64, torch.bfloat16, border, seed=20)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,head_dim", [(12, 64), (1, 768)], ids=["12x64", "1x768"])
def test_gpu_backward_is_bitwise_reproducible(heads, head_dim):
    B, T, grid = 64, 1, (14, 14)
    N = T + grid[0] * grid[1]
    q, k, v = _qkv(B, heads, N, head_dim, dtype=torch.bfloat16, seed=30)
    grad = _rand(B, heads, N, head_dim, dtype=torch.bfloat16, seed=33)
    first = _run(q, k, v, grid, 3, T, "clip", head_dim ** -0.5, grad)
    second = _run(q, k, v, grid, 3, T, "clip", head_dim ** -0.5, grad)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


# ---- eager calls run the launchers directly (sa2vp_kernels._dispatch.eager_triton) ----------------


def _public(q, k, v, grid=(3, 4), **kw):
    import sa2vp_kernels as sk
    return sk.local_cross_attention(q, k, v, grid, window=3, num_prefix=1, backend="triton", **kw)


def test_eager_path_matches_the_registered_ops(monkeypatch):
    """Public eager calls skip the ops' Python dispatch and generated autograd (host time) and give the
    same outputs and gradients, bitwise, as the registered ops."""
    import sa2vp_kernels.local_attention as la

    base = _qkv(2, 2, 13, 8)
    grad = _rand(2, 2, 13, 8, seed=5)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(la, "eager_triton", lambda *t, eager=eager: eager)
        q, k, v = (t.detach().clone().requires_grad_(True) for t in base)
        out = _public(q, k, v)
        results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), grad)))
        with torch.no_grad():
            results[-1] += (_public(*base),)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_path_does_not_dispatch_the_ops(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the registered op was dispatched")

    monkeypatch.setattr(tla, "local_attn_fwd_triton", boom)
    monkeypatch.setattr(tla, "local_attn_bwd_triton", boom)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 1, 13, 8))
    first = torch.autograd.grad(_public(q, k, v).sum(), q)[0]
    # no second derivative: a clear error, never a silently wrong one
    g = torch.autograd.grad(_public(q, k, v).sum(), q, create_graph=True)[0]
    assert torch.equal(g.detach(), first)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), q)


def test_dispatch_modes_and_transforms_see_the_registered_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    from sa2vp_kernels._dispatch import eager_triton

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(1, 1, 13, 8)
    assert eager_triton(q, k, v) and eager_triton(q, None)
    with Record() as mode:
        assert not eager_triton(q, k, v)
        _public(q, k, v)
    assert any("local_attn_fwd_triton" in op for op in mode.ops), mode.ops
    assert eager_triton(torch.nn.Parameter(q))  # a model's weights

    class Subclass(torch.Tensor):
        pass

    assert not eager_triton(q.as_subclass(Subclass))
    seen = []
    torch.func.vmap(lambda x: seen.append(eager_triton(x)) or x)(q)
    assert seen == [False]
