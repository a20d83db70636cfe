"""Triton kernels of the spatially aligned local cross attention, forward and backward.

Layout: ``q, k, v`` are ``(B, heads, N, D)`` with ``N = T + gh * gw`` (``T`` prefix tokens, then the
grid in row-major order), any strides for the first three dims and unit stride for the last.

Three launches in all (one forward, two backward), each a single grid of programs:

* Prefix programs come first in every launch: a prefix query attends to all ``N`` keys, so it loops
  over blocks of keys with an online softmax. They are the longest programs and start first, so
  they overlap with the rest. (``FWD_FUSED_PREFIX`` / ``BWD_FUSED_PREFIX``, off by default: the prefix
  queries ride in spare lanes of the grid tiles instead, each tile handling its own keys, and one more
  small launch combines the tiles' parts.)
* Tiled grid programs (the default): a tile of grid positions (a band of whole grid rows, or a
  16-column block on wide grids) and the halo of neighbours ``r`` rows/columns around it. All
  tile x halo scores come from ``tl.dot`` over chunks of ``D`` (tensor cores for 16-bit inputs),
  the window is a mask on them, and the softmax of a tile is exact (its halo holds every key its
  queries see). The neighbours are read as one dense block instead of once per window offset.
* Window-walking grid programs (fallback when a tile and its halo would hold too many scores, i.e.
  very wide windows): each program walks the window offsets for a run of positions with an online
  softmax; the scores are elementwise products reduced over ``D``.
* Row-streaming forward (``FWD_STREAM``, off by default; windows of 1 and 3, head dims up to 128, many
  slices): a program walks a run of grid rows of one (batch, head) slice, keeping three rows of keys
  and values in registers, with the slice's prefix queries in the same program (their parts over the
  runs of a slice combined afterwards); every input is read once, plus one row above each run.
* Where the forward splits prefix queries among programs (the fused tiles, ``FWD_PREFIX_SPLITS``, the
  streaming runs), a second small launch combines the parts; with ``FWD_INLINE_COMBINE`` (off by
  default) the last program of each group to finish does it instead (an atomic counter per group).

Backward, no atomics: launch 1 is query-centric (``delta = rowsum(dO * O)`` and ``dq``), launch 2
key-centric (``dk``, ``dv``): a grid key gathers from the grid queries around it plus every prefix
query (the tiled kernel puts the prefix queries in extra halo lanes), a prefix key from the prefix
queries only. Each sum runs in a fixed order, so the result is bitwise reproducible.

Borders: out-of-grid neighbours are skipped. With ``zero_border`` they still count as score 0 with
value 0; their number per query is known in closed form, so the softmax takes them in at once.
Offsets are clipped to the grid (``|dy| <= min(r, gh - 1)``), so a window wider than the grid costs
nothing extra.

Accumulation is float32 (float64 for float64 inputs; their products skip ``tl.dot``, float32 ones
use its exact ``"ieee"`` mode). ``scale`` arrives as a float32 pair ``hi + lo`` (``_scalars.py``):
float64 runs see it to about 2**-48. Block sizes come from small deterministic heuristics (no
autotuning), so the interpreter and the GPU run the same configuration.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from . import tuning
from ._scalars import split_float

# Finite stand-in for -inf in the running maxima: keeps every exp() argument finite (no inf - inf).
_NEG = tl.constexpr(-1.0e30)


# ---------------------------------------------------------------------------------------------------
# Shared pieces. The loops below inline their loads: under TRITON_INTERPRET every call of a jitted
# helper is expensive, and the loops are where the time goes.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _scale(scale_hi, scale_lo, FP64: tl.constexpr):
    """The score scale in the accumulator dtype; its dtype is what every kernel accumulates in."""
    return tl.full([], scale_hi, tl.float64 if FP64 else tl.float32) + scale_lo


@triton.jit
def _slice_base(bh, H, sb, sh):
    """Element offset of the (batch, head) slice ``bh`` (scalar or one per lane)."""
    b = bh // H
    return b.to(tl.int64) * sb + (bh - b * H).to(tl.int64) * sh


@triton.jit
def _load_rows(ptr, base, rows, stride_n, offs_d, row_mask, D, ACC: tl.constexpr):
    """(rows, BLOCK_D) tile in the accumulator dtype, zero where masked."""
    ptrs = ptr + (base + rows.to(tl.int64) * stride_n)[:, None] + offs_d[None, :]
    mask = row_mask[:, None] & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_rows(ptr, rows, val, row_mask, offs_d, D):
    """Store into a contiguous (B * heads * N, D) tensor at flat row indices ``rows``."""
    ptrs = ptr + rows[:, None] * D + offs_d[None, :]
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _grid_tile(tile, G, gw, BHG, BLOCK_Q: tl.constexpr):
    """A tile of ``BLOCK_Q`` positions of the flattened (batch * heads * grid) index: slice, grid
    index, row, column, and whether the lane is real. Tiles may straddle slices; lanes past the end
    repeat the last position (valid neighbours, results not stored)."""
    r = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_range = r < BHG
    r = tl.minimum(r, BHG - 1)
    bh = r // G
    g = r - bh * G
    y = g // gw
    return bh, g, y, g - y * gw, in_range


@triton.jit
def _next_offset(dy, dx, rx):
    """Row-major step through the window offsets (scalars: no division in the loops)."""
    wrap = dx == rx
    return tl.where(wrap, dy + 1, dy), tl.where(wrap, -rx, dx + 1)


# ---------------------------------------------------------------------------------------------------
# Forward: prefix queries, and the window-walking fallback for grid queries
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_prefix_query(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bh, i,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                      BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    """Prefix query ``i`` of slice ``bh`` against all N keys, online softmax over key blocks."""
    acc, m, l = _fwd_prefix_keys(q_ptr, k_ptr, v_ptr, bh, i, 0, N, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                                 H, sc, BLOCK_N, BLOCK_D, D, STAGES)
    offs_d = tl.arange(0, BLOCK_D)
    row = bh.to(tl.int64) * N + i
    tl.store(out_ptr + row * D + offs_d, (acc / l).to(out_ptr.dtype.element_ty), mask=offs_d < D)
    tl.store(lse_ptr + row, m + tl.log(l))


@triton.jit
def _fwd_prefix_part(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr, pid, T, split_len,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                     SPLITS: tl.constexpr, INLINE_COMBINE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, STAGES: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                     PARTS_DC: tl.constexpr):
    """Part ``pid % SPLITS`` of prefix query ``pid // SPLITS`` (of all slices, ``bh * T + i``): keys
    ``[part * split_len, (part + 1) * split_len)``, never empty. Its normalised output and log-sum-exp
    go to row ``pid`` of ``part_o`` / ``part_lse``; ``_combine_parts_kernel`` weighs the parts, or
    (INLINE_COMBINE) the query's last part to finish does."""
    qi = pid // SPLITS
    start = (pid - qi * SPLITS) * split_len
    bh = qi // T
    acc, m, l = _fwd_prefix_keys(q_ptr, k_ptr, v_ptr, bh, qi - bh * T, start, tl.minimum(start + split_len, N),
                                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, sc, BLOCK_N, BLOCK_D, D, STAGES)
    offs_d = tl.arange(0, BLOCK_D)
    row = pid.to(tl.int64)
    tl.store(part_o_ptr + row * D + offs_d, acc / l, mask=offs_d < D)
    tl.store(part_lse_ptr + row, m + tl.log(l))
    if INLINE_COMBINE:
        if _last_part(count_ptr + qi, SPLITS):
            _combine_row(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, qi, bh.to(tl.int64) * N + (qi - bh * T),
                         SPLITS, True, D, BLOCK_PARTS, PARTS_DC)


@triton.jit
def _fwd_prefix_keys(q_ptr, k_ptr, v_ptr, bh, i, n_start, n_end,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, sc,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    """Prefix query ``i`` of slice ``bh`` against keys ``[n_start, n_end)``, online softmax over key
    blocks: ``(acc, m, l)``, the unnormalised output, the running maximum and the sum of weights."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    k_ptr += _slice_base(bh, H, skb, skh)
    v_ptr += _slice_base(bh, H, svb, svh)
    q = tl.load(q_ptr + _slice_base(bh, H, sqb, sqh) + i * sqn + offs_d, mask=d_mask, other=0.0)
    q = q.to(sc.dtype) * sc
    m = tl.max(tl.full([BLOCK_N], _NEG, sc.dtype), axis=0)
    l = m * 0
    acc = tl.zeros([BLOCK_D], sc.dtype)
    for start in tl.range(n_start, n_end, BLOCK_N, num_stages=STAGES):
        n = start + offs_n
        valid = n < n_end
        mask = valid[:, None] & d_mask[None, :]
        n = n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + n * skn + offs_d[None, :], mask=mask, other=0.0).to(sc.dtype)
        v = tl.load(v_ptr + n * svn + offs_d[None, :], mask=mask, other=0.0).to(sc.dtype)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), _NEG)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.where(valid, tl.exp(s - m_new), 0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    return acc, m, l


@triton.jit
def _fwd_grid_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tile,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   H, N, T, gh, gw, rad, ry, rx, BHG, sc,
                   ZERO_BORDER: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    """A tile of grid queries, each against its window of grid keys. At window offset (dy, dx) the
    keys are the queries' own rows shifted by ``dy * gw + dx``: one scalar added to fixed pointers."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < D
    bh, g, y, x, in_range = _grid_tile(tile, gh * gw, gw, BHG, BLOCK_Q)
    rows = (T + g).to(tl.int64)
    k_ptrs = k_ptr + (_slice_base(bh, H, skb, skh) + rows * skn)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (_slice_base(bh, H, svb, svh) + rows * svn)[:, None] + offs_d[None, :]
    q = _load_rows(q_ptr, _slice_base(bh, H, sqb, sqh), rows, sqn, offs_d, in_range, D, sc.dtype) * sc
    m = tl.full([BLOCK_Q], _NEG, sc.dtype)
    l = m * 0
    if ZERO_BORDER:
        # Out-of-grid neighbours: score 0, value 0. Start the softmax from all of them at once.
        ny = tl.minimum(y + rad, gh - 1) - tl.maximum(y - rad, 0) + 1
        nx = tl.minimum(x + rad, gw - 1) - tl.maximum(x - rad, 0) + 1
        n_zero = (2 * rad + 1) * (2 * rad + 1) - ny * nx
        m = tl.where(n_zero > 0, 0.0, m)
        l = n_zero.to(sc.dtype)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], sc.dtype)
    dy = -ry
    dx = -rx
    for _ in tl.range(0, (2 * ry + 1) * (2 * rx + 1), num_stages=STAGES):
        valid = (y + dy >= 0) & (y + dy < gh) & (x + dx >= 0) & (x + dx < gw)
        mask = valid[:, None] & d_mask
        shift = (dy * gw + dx).to(tl.int64)
        k = tl.load(k_ptrs + shift * skn, mask=mask, other=0.0).to(sc.dtype)
        v = tl.load(v_ptrs + shift * svn, mask=mask, other=0.0).to(sc.dtype)
        s = tl.where(valid, tl.sum(q * k, axis=1), _NEG)
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.where(valid, tl.exp(s - m_new), 0.0)
        acc = acc * alpha[:, None] + p[:, None] * v
        l = l * alpha + p
        m = m_new
        dy, dx = _next_offset(dy, dx, rx)
    rows = bh.to(tl.int64) * N + T + g
    _store_rows(out_ptr, rows, acc / l[:, None], in_range, offs_d, D)
    tl.store(lse_ptr + rows, m + tl.log(l), mask=in_range)


@triton.jit
def _local_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                           H, N, T, gh, gw, rad, ry, rx, n_prefix_programs, BHG,
                           scale_hi, scale_lo,
                           ZERO_BORDER: tl.constexpr, FP64: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           STAGES: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if pid < n_prefix_programs:
        bh = pid // T
        _fwd_prefix_query(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bh, pid - bh * T,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                          BLOCK_N, D, BLOCK_D, STAGES)
    else:
        _fwd_grid_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, pid - n_prefix_programs,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                       H, N, T, gh, gw, rad, ry, rx, BHG, sc,
                       ZERO_BORDER, BLOCK_Q, D, BLOCK_D, STAGES)


# ---------------------------------------------------------------------------------------------------
# Backward, launch 1, delta and dq (query-centric): prefix queries and the window-walking fallback
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_prefix_query(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, bh, i,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                         sob, soh, son, H, N, sc,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         STAGES: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    k_ptr += _slice_base(bh, H, skb, skh)
    v_ptr += _slice_base(bh, H, svb, svh)
    q = tl.load(q_ptr + _slice_base(bh, H, sqb, sqh) + i * sqn + offs_d, mask=d_mask, other=0.0)
    do = tl.load(do_ptr + _slice_base(bh, H, sdob, sdoh) + i * sdon + offs_d, mask=d_mask, other=0.0)
    o = tl.load(o_ptr + _slice_base(bh, H, sob, soh) + i * son + offs_d, mask=d_mask, other=0.0)
    q = q.to(sc.dtype) * sc
    do = do.to(sc.dtype)
    row = bh.to(tl.int64) * N + i
    delta = tl.sum(do * o.to(sc.dtype), axis=0)
    tl.store(delta_ptr + row, delta)
    lse = tl.load(lse_ptr + row)
    dq = tl.zeros([BLOCK_D], sc.dtype)
    for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        n = start + offs_n
        valid = n < N
        mask = valid[:, None] & d_mask[None, :]
        n = n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + n * skn + offs_d[None, :], mask=mask, other=0.0).to(sc.dtype)
        v = tl.load(v_ptr + n * svn + offs_d[None, :], mask=mask, other=0.0).to(sc.dtype)
        p = tl.where(valid, tl.exp(tl.sum(k * q[None, :], axis=1) - lse), 0.0)
        ds = p * (tl.sum(v * do[None, :], axis=1) - delta)
        dq += tl.sum(ds[:, None] * k, axis=0)
    tl.store(dq_ptr + row * D + offs_d, (dq * sc).to(dq_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _bwd_dq_grid_tile(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, tile,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sob, soh, son,
                      H, N, T, gh, gw, ry, rx, BHG, sc,
                      BLOCK_Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < D
    bh, g, y, x, in_range = _grid_tile(tile, gh * gw, gw, BHG, BLOCK_Q)
    qrows = (T + g).to(tl.int64)
    k_ptrs = k_ptr + (_slice_base(bh, H, skb, skh) + qrows * skn)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (_slice_base(bh, H, svb, svh) + qrows * svn)[:, None] + offs_d[None, :]
    q = _load_rows(q_ptr, _slice_base(bh, H, sqb, sqh), qrows, sqn, offs_d, in_range, D, sc.dtype) * sc
    do = _load_rows(do_ptr, _slice_base(bh, H, sdob, sdoh), qrows, sdon, offs_d, in_range, D, sc.dtype)
    o = _load_rows(o_ptr, _slice_base(bh, H, sob, soh), qrows, son, offs_d, in_range, D, sc.dtype)
    rows = bh.to(tl.int64) * N + qrows
    delta = tl.sum(do * o, axis=1)
    tl.store(delta_ptr + rows, delta, mask=in_range)
    lse = tl.load(lse_ptr + rows)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], sc.dtype)
    dy = -ry
    dx = -rx
    for _ in tl.range(0, (2 * ry + 1) * (2 * rx + 1), num_stages=STAGES):
        valid = (y + dy >= 0) & (y + dy < gh) & (x + dx >= 0) & (x + dx < gw)
        mask = valid[:, None] & d_mask
        shift = (dy * gw + dx).to(tl.int64)
        k = tl.load(k_ptrs + shift * skn, mask=mask, other=0.0).to(sc.dtype)
        v = tl.load(v_ptrs + shift * svn, mask=mask, other=0.0).to(sc.dtype)
        p = tl.where(valid, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dq += ds[:, None] * k
        dy, dx = _next_offset(dy, dx, rx)
    _store_rows(dq_ptr, rows, dq * sc, in_range, offs_d, D)


@triton.jit
def _local_attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
                              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                              sdob, sdoh, sdon, sob, soh, son,
                              H, N, T, gh, gw, ry, rx, n_prefix_programs, BHG,
                              scale_hi, scale_lo,
                              FP64: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if pid < n_prefix_programs:
        bh = pid // T
        _bwd_dq_prefix_query(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
                             bh, pid - bh * T, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                             sdob, sdoh, sdon, sob, soh, son, H, N, sc,
                             BLOCK_N, D, BLOCK_D, STAGES)
    else:
        _bwd_dq_grid_tile(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
                          pid - n_prefix_programs, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          sdob, sdoh, sdon, sob, soh, son, H, N, T, gh, gw, ry, rx, BHG, sc,
                          BLOCK_Q, D, BLOCK_D, STAGES)


# ---------------------------------------------------------------------------------------------------
# Backward, launch 2, dk and dv (key-centric): prefix keys and the window-walking fallback
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_kv_from_prefix_queries(k, v, dk, dv, bh, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                sqb, sqh, sqn, sdob, sdoh, sdon, H, N, T, sc,
                                D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the contributions of the T prefix queries (which see every key) to a tile of keys
    (``k`` pre-multiplied by the scale; ``dk`` still lacks it)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (bh >= 0)[:, None] & (offs_d[None, :] < D)
    q_ptrs = q_ptr + _slice_base(bh, H, sqb, sqh)[:, None] + offs_d[None, :]
    do_ptrs = do_ptr + _slice_base(bh, H, sdob, sdoh)[:, None] + offs_d[None, :]
    row0 = bh.to(tl.int64) * N
    for i in range(0, T):
        q = tl.load(q_ptrs + i * sqn, mask=mask, other=0.0).to(sc.dtype)
        do = tl.load(do_ptrs + i * sdon, mask=mask, other=0.0).to(sc.dtype)
        lse = tl.load(lse_ptr + row0 + i)
        delta = tl.load(delta_ptr + row0 + i)
        p = tl.exp(tl.sum(q * k, axis=1) - lse)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dv += p[:, None] * do
        dk += ds[:, None] * q
    return dk, dv


@triton.jit
def _bwd_kv_prefix_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tile,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                        H, N, T, BHT, sc, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """A tile of prefix keys (flattened over batch * heads * T): only prefix queries see them."""
    offs_d = tl.arange(0, BLOCK_D)
    r = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_range = r < BHT
    r = tl.minimum(r, BHT - 1)
    bh = r // T
    j = r - bh * T
    k = _load_rows(k_ptr, _slice_base(bh, H, skb, skh), j, skn, offs_d, in_range, D, sc.dtype) * sc
    v = _load_rows(v_ptr, _slice_base(bh, H, svb, svh), j, svn, offs_d, in_range, D, sc.dtype)
    dk, dv = _bwd_kv_from_prefix_queries(k, v, k * 0, v * 0, bh, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                         sqb, sqh, sqn, sdob, sdoh, sdon, H, N, T, sc, D, BLOCK_D)
    rows = bh.to(tl.int64) * N + j
    _store_rows(dk_ptr, rows, dk * sc, in_range, offs_d, D)
    _store_rows(dv_ptr, rows, dv, in_range, offs_d, D)


@triton.jit
def _bwd_kv_grid_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tile,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                      H, N, T, gh, gw, ry, rx, BHG, sc,
                      BLOCK_Q: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    """A tile of grid keys: the grid queries whose window holds the key (the same offsets,
    mirrored: the query rows are the key rows shifted by ``-(dy * gw + dx)``), then the prefix
    queries."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < D
    bh, g, y, x, in_range = _grid_tile(tile, gh * gw, gw, BHG, BLOCK_Q)
    row0 = bh.to(tl.int64) * N
    krows = (T + g).to(tl.int64)
    q_ptrs = q_ptr + (_slice_base(bh, H, sqb, sqh) + krows * sqn)[:, None] + offs_d[None, :]
    do_ptrs = do_ptr + (_slice_base(bh, H, sdob, sdoh) + krows * sdon)[:, None] + offs_d[None, :]
    k = _load_rows(k_ptr, _slice_base(bh, H, skb, skh), krows, skn, offs_d, in_range, D, sc.dtype) * sc
    v = _load_rows(v_ptr, _slice_base(bh, H, svb, svh), krows, svn, offs_d, in_range, D, sc.dtype)
    dk = tl.zeros([BLOCK_Q, BLOCK_D], sc.dtype)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], sc.dtype)
    dy = -ry
    dx = -rx
    for _ in tl.range(0, (2 * ry + 1) * (2 * rx + 1), num_stages=STAGES):
        valid = (y - dy >= 0) & (y - dy < gh) & (x - dx >= 0) & (x - dx < gw)
        mask = valid[:, None] & d_mask
        shift = -(dy * gw + dx).to(tl.int64)
        q = tl.load(q_ptrs + shift * sqn, mask=mask, other=0.0).to(sc.dtype)
        do = tl.load(do_ptrs + shift * sdon, mask=mask, other=0.0).to(sc.dtype)
        lse = tl.load(lse_ptr + row0 + krows + shift, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + row0 + krows + shift, mask=valid, other=0.0)
        p = tl.where(valid, tl.exp(tl.sum(q * k, axis=1) - lse), 0.0)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dv += p[:, None] * do
        dk += ds[:, None] * q
        dy, dx = _next_offset(dy, dx, rx)
    dk, dv = _bwd_kv_from_prefix_queries(k, v, dk, dv, bh, q_ptr, do_ptr, lse_ptr, delta_ptr,
                                         sqb, sqh, sqn, sdob, sdoh, sdon, H, N, T, sc, D, BLOCK_D)
    _store_rows(dk_ptr, row0 + krows, dk * sc, in_range, offs_d, D)
    _store_rows(dv_ptr, row0 + krows, dv, in_range, offs_d, D)


@triton.jit
def _local_attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                                H, N, T, gh, gw, ry, rx, n_prefix_programs, BHT, BHG,
                                scale_hi, scale_lo,
                                FP64: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                                BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if pid < n_prefix_programs:
        _bwd_kv_prefix_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, pid,
                            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                            H, N, T, BHT, sc, BLOCK_Q, D, BLOCK_D)
    else:
        _bwd_kv_grid_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          pid - n_prefix_programs, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          sdob, sdoh, sdon, H, N, T, gh, gw, ry, rx, BHG, sc,
                          BLOCK_Q, D, BLOCK_D, STAGES)


# ---------------------------------------------------------------------------------------------------
# Tiled kernels (the default path): a program takes a patch of grid positions and the patch of
# neighbours around it, computes all their pairwise scores with tl.dot (tensor cores in 16-bit) and
# masks the ones outside the window. Most scores are masked, but a dot costs far less than the
# per-offset elementwise work, and the neighbours are read as one dense block.
#
# Patch geometry, shared by the three kernels. The grid splits into tiles of ``rows`` grid rows by
# ``cols`` columns (whole rows when the grid is narrow: ``cols = gw``, one tile per row band). The
# halo of a tile is ``rows + 2 ry`` rows by ``halo_cols`` columns (``cols + 2 rx`` for column tiles,
# ``gw`` for whole rows), starting ``ry`` rows above and ``halo_x`` columns left of the tile.
# Lanes run row-major over a patch; lanes outside it or outside the grid are masked.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _patch_lanes(py, px, n_rows, n_cols, gh, gw, BLOCK: tl.constexpr):
    """Grid row, column and validity of the lanes of an ``n_rows x n_cols`` patch at (py, px)."""
    i = tl.arange(0, BLOCK)
    r = i // n_cols
    y = py + r
    x = px + (i - r * n_cols)
    return y, x, (r < n_rows) & (y >= 0) & (y < gh) & (x >= 0) & (x < gw)


@triton.jit
def _tile_origin(tile, gh, rows, cols, x_tiles):
    """Slice and top-left grid position of tile number ``tile`` (tiles of a slice are row-major)."""
    per_slice = tl.cdiv(gh, rows) * x_tiles
    bh = tile // per_slice
    t = tile - bh * per_slice
    ty = t // x_tiles
    return bh, ty * rows, (t - ty * x_tiles) * cols


@triton.jit
def _zero_border_count(y, x, rad, gh, gw):
    """Out-of-grid neighbours of (y, x) in the full window (scores 0 under border="zero")."""
    ny = tl.minimum(y + rad, gh - 1) - tl.maximum(y - rad, 0) + 1
    nx = tl.minimum(x + rad, gw - 1) - tl.maximum(x - rad, 0) + 1
    return (2 * rad + 1) * (2 * rad + 1) - ny * nx


@triton.jit
def _prefix_lanes(tile, bh, y0, x0, ky, kx, q_ok, k_ok, mask, q_rows, k_rows, T, gh, rows, cols, x_tiles, ry,
                  halo_cols, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The prefix queries and keys in the spare lanes of a tile (FUSE_PREFIX, see ``_fwd_tile``): the
    ``T`` lanes after the tile's queries are prefix queries ``pq``, the ``T`` lanes after its halo prefix
    keys (in the slice's first tile only). A prefix lane sees the tile's own grid keys and those prefix
    keys. Returns the mask and the q/k rows and validity with those lanes added, the lanes' prefix
    query and validity, the tile's number ``t`` in its slice and the slice's tile count."""
    pq = tl.arange(0, BLOCK_Q) - rows * cols
    p_ok = (pq >= 0) & (pq < T)
    n_tiles = tl.cdiv(gh, rows) * x_tiles
    t = tile - bh * n_tiles
    pk = tl.arange(0, BLOCK_K) - (rows + 2 * ry) * halo_cols
    pk_ok = (pk >= 0) & (pk < T) & (t == 0)
    own = k_ok & (ky >= y0) & (ky < y0 + rows) & (kx >= x0) & (kx < x0 + cols)
    mask = mask | (p_ok[:, None] & (own | pk_ok)[None, :])
    return (mask, tl.where(p_ok, pq, q_rows), tl.where(pk_ok, pk, k_rows), q_ok | p_ok, k_ok | pk_ok, pq, p_ok, t,
            n_tiles)


@triton.jit
def _fwd_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr, tile,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
              H, N, T, gh, gw, rad, ry, rx, rows, cols, x_tiles, halo_x, halo_cols, sc,
              ZERO_BORDER: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr, FUSE_PREFIX: tl.constexpr,
              EARLY_V: tl.constexpr, INLINE_COMBINE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
              D: tl.constexpr, BLOCK_DC: tl.constexpr, STAGES: tl.constexpr, BLOCK_PARTS: tl.constexpr,
              PARTS_DC: tl.constexpr):
    """One tile of grid queries against its halo of keys.

    Under FUSE_PREFIX the prefix queries ride along in spare lanes of every tile: the ``T`` lanes
    after the tile's queries hold the prefix queries, the ``T`` lanes after the halo the prefix keys.
    A prefix lane sees the tile's own grid keys (the halo without its border) and, in the slice's
    first tile, the prefix keys, so the tiles of a slice split each prefix query's keys between them.
    Each tile stores its part of every prefix query's output, normalised, and its log-sum-exp
    (``part_o``, ``part_lse``); ``_combine_parts_kernel`` adds them up, or (INLINE_COMBINE) the
    slice's last tile to finish does. The prefix queries then read no key or value that the tiles do
    not read anyway.

    EARLY_V (head dims of one chunk only): the values are loaded with the queries and keys, so that
    their latency overlaps the scores' instead of following the softmax."""
    bh, y0, x0 = _tile_origin(tile, gh, rows, cols, x_tiles)
    qy, qx, q_ok = _patch_lanes(y0, x0, rows, cols, gh, gw, BLOCK_Q)
    ky, kx, k_ok = _patch_lanes(y0 - ry, x0 - halo_x, rows + 2 * ry, halo_cols, gh, gw, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_DC)
    q_rows = (T + qy * gw + qx).to(tl.int64)
    k_rows = (T + ky * gw + kx).to(tl.int64)
    window = (tl.abs(ky[None, :] - qy[:, None]) <= ry) & (tl.abs(kx[None, :] - qx[:, None]) <= rx)
    mask = q_ok[:, None] & k_ok[None, :] & window
    q_in = q_ok
    k_in = k_ok
    if FUSE_PREFIX:
        mask, q_rows, k_rows, q_in, k_in, pq, p_ok, t, n_tiles = _prefix_lanes(
            tile, bh, y0, x0, ky, kx, q_ok, k_ok, mask, q_rows, k_rows, T, gh, rows, cols, x_tiles, ry, halo_cols,
            BLOCK_Q, BLOCK_K)
    q_ptrs = q_ptr + (_slice_base(bh, H, sqb, sqh) + q_rows * sqn)[:, None] + offs_d[None, :]
    k_ptrs = k_ptr + (_slice_base(bh, H, skb, skh) + k_rows * skn)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (_slice_base(bh, H, svb, svh) + k_rows * svn)[:, None] + offs_d[None, :]
    if EARLY_V:
        v_early = tl.load(v_ptrs, mask=k_in[:, None] & (offs_d < D)[None, :], other=0.0)
    s = tl.zeros([BLOCK_Q, BLOCK_K], sc.dtype)
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        q = tl.load(q_ptrs + c, mask=q_in[:, None] & d_ok, other=0.0)
        k = tl.load(k_ptrs + c, mask=k_in[:, None] & d_ok, other=0.0)
        if FP64:
            s += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        elif IEEE:
            s += tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s += tl.dot(q, tl.trans(k))
    s = tl.where(mask, s * sc, _NEG)
    m = tl.max(s, axis=1)
    if ZERO_BORDER:
        # (prefix lanes: no zero neighbours)
        n_zero = tl.where(q_ok, _zero_border_count(qy, qx, rad, gh, gw), 0).to(sc.dtype)
        m = tl.where(n_zero > 0, tl.maximum(m, 0.0), m)
    p = tl.where(mask, tl.exp(s - m[:, None]), 0.0)
    l = tl.sum(p, axis=1)
    if ZERO_BORDER:
        # m >= 0 wherever n_zero > 0, so the clamp only keeps dead lanes finite.
        l += n_zero * tl.exp(tl.minimum(-m, 0.0))
    l = tl.where(q_in, l, 1.0)
    p = p.to(v_ptr.dtype.element_ty)
    o_rows = bh.to(tl.int64) * N + q_rows
    o_ptrs = out_ptr + o_rows[:, None] * D + offs_d[None, :]
    if FUSE_PREFIX:
        part_rows = ((bh * T + pq) * n_tiles + t).to(tl.int64)
        part_ptrs = part_o_ptr + part_rows[:, None] * D + offs_d[None, :]
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        if EARLY_V:
            v = v_early  # (D <= BLOCK_DC: the one chunk)
        else:
            v = tl.load(v_ptrs + c, mask=k_in[:, None] & d_ok, other=0.0)
        if FP64:
            o = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        elif IEEE:
            o = tl.dot(p, v, input_precision="ieee")
        else:
            o = tl.dot(p, v)
        o = o / l[:, None]
        tl.store(o_ptrs + c, o.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok)
        if FUSE_PREFIX:
            tl.store(part_ptrs + c, o, mask=p_ok[:, None] & d_ok)
    tl.store(lse_ptr + o_rows, m + tl.log(l), mask=q_ok)
    if FUSE_PREFIX:
        tl.store(part_lse_ptr + part_rows, m + tl.log(l), mask=p_ok)
        if INLINE_COMBINE:
            _combine_slice_inline(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, count_ptr, bh, N, T, n_tiles, D,
                                  BLOCK_PARTS, PARTS_DC)


@triton.jit
def _local_attn_fwd_tiled_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                                 H, N, T, gh, gw, rad, ry, rx, rows, cols, x_tiles, halo_x, halo_cols,
                                 n_prefix_programs, split_len, scale_hi, scale_lo,
                                 ZERO_BORDER: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr,
                                 FUSE_PREFIX: tl.constexpr, EARLY_V: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
                                 INLINE_COMBINE: tl.constexpr,
                                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                                 STAGES: tl.constexpr, PREFIX_STAGES: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                                 PARTS_DC: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if FUSE_PREFIX:
        # (no prefix programs: the kernel holds no registers or shared memory for them)
        _fwd_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr, pid,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  H, N, T, gh, gw, rad, ry, rx, rows, cols, x_tiles, halo_x, halo_cols, sc,
                  ZERO_BORDER, FP64, IEEE, True, EARLY_V, INLINE_COMBINE, BLOCK_Q, BLOCK_K, D, BLOCK_DC, STAGES,
                  BLOCK_PARTS, PARTS_DC)
    elif pid < n_prefix_programs:
        if PREFIX_SPLITS > 1:
            # each prefix query's keys in PREFIX_SPLITS parts (split_len keys each), combined afterwards
            _fwd_prefix_part(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr, pid, T,
                             split_len, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                             PREFIX_SPLITS, INLINE_COMBINE, BLOCK_N, D, BLOCK_D, PREFIX_STAGES, BLOCK_PARTS,
                             PARTS_DC)
        else:
            bh = pid // T
            _fwd_prefix_query(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bh, pid - bh * T,
                              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                              BLOCK_N, D, BLOCK_D, PREFIX_STAGES)
    else:
        _fwd_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                  pid - n_prefix_programs, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  H, N, T, gh, gw, rad, ry, rx, rows, cols, x_tiles, halo_x, halo_cols, sc,
                  ZERO_BORDER, FP64, IEEE, False, EARLY_V, False, BLOCK_Q, BLOCK_K, D, BLOCK_DC, STAGES,
                  BLOCK_PARTS, PARTS_DC)


@triton.jit
def _combine_row(part_ptr, part_lse_ptr, out_ptr, lse_ptr, q_index, out_row, n_parts, WEIGHTED: tl.constexpr,
                 D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Row ``out_row`` of ``out`` from parts ``q_index * n_parts + [0, n_parts)``, added in part order.
    WEIGHTED (the forward): the parts are normalised outputs with log-sum-exps ``lse_t``, weighted by
    ``exp(lse_t - lse)`` with ``lse = log(sum_t exp(lse_t))``, which is stored too. Otherwise (the
    backward's dq): their plain sum. The parts are read past L1 (``.cg``): under FWD_INLINE_COMBINE other
    programs of the same launch wrote them."""
    ts = tl.arange(0, BLOCK_T)
    t_ok = ts < n_parts
    base = q_index.to(tl.int64) * n_parts
    if WEIGHTED:
        lse_t = tl.load(part_lse_ptr + base + ts, mask=t_ok, other=_NEG, cache_modifier=".cg")
        m = tl.max(lse_t, axis=0)
        w = tl.where(t_ok, tl.exp(lse_t - m), 0.0)
        total = tl.sum(w, axis=0)
        w = w / total
        tl.store(lse_ptr + out_row, m + tl.log(total))
    offs_d = tl.arange(0, BLOCK_DC)
    for c in range(0, D, BLOCK_DC):
        d_ok = c + offs_d < D
        parts = tl.load(part_ptr + (base + ts)[:, None] * D + (c + offs_d)[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        if WEIGHTED:
            parts = w[:, None] * parts
        tl.store(out_ptr + out_row * D + c + offs_d, tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_parts_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, N, T, n_tiles, WEIGHTED: tl.constexpr,
                          D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Row ``pid % T`` of slice ``pid // T`` of ``out`` from its ``n_tiles`` parts (``_combine_row``): the
    prefix queries' parts of the fused tiles, of the split prefix programs, of the streaming
    programs, or of the backward's dq tiles."""
    pid = tl.program_id(0)
    bh = pid // T
    _combine_row(part_ptr, part_lse_ptr, out_ptr, lse_ptr, pid, bh.to(tl.int64) * N + (pid - bh * T), n_tiles,
                 WEIGHTED, D, BLOCK_T, BLOCK_DC)


@triton.jit
def _last_part(count_ptr, n_parts):
    """Whether this program is the last of ``n_parts`` to reach this point for counter ``count_ptr``
    (zeroed before the launch). The barrier orders every thread's stores before the counter's
    increment, which is a gpu-scope release and acquire (one thread adds, the others read its ticket
    through shared memory after a second barrier): the last program then sees the others' stores."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == n_parts - 1


@triton.jit
def _combine_slice_inline(part_ptr, part_lse_ptr, out_ptr, lse_ptr, count_ptr, bh, N, T, n_parts,
                          D: tl.constexpr, BLOCK_PARTS: tl.constexpr, PARTS_DC: tl.constexpr):
    """FWD_INLINE_COMBINE: the last of a slice's ``n_parts`` programs to finish combines the parts of
    all of the slice's ``T`` prefix queries (instead of a second launch, ``_combine_parts_kernel``)."""
    if _last_part(count_ptr + bh, n_parts):
        for i in range(T):
            _combine_row(part_ptr, part_lse_ptr, out_ptr, lse_ptr, bh * T + i, bh.to(tl.int64) * N + i, n_parts,
                         True, D, BLOCK_PARTS, PARTS_DC)


# ---------------------------------------------------------------------------------------------------
# Forward, row streaming (FWD_STREAM / the tuned setting fwd_stream; windows of 1 and 3, head dims of
# one chunk, grids up to _STREAM_MAX_WIDTH wide). A program walks a run of grid rows (a segment) of one
# (batch, head) slice top to bottom. The keys and values of rows y - 1, y, y + 1 stay in registers and
# each step loads only row y + 1 (and the queries of row y), so every key and value is read once (plus
# the row above each segment), not once per tile that holds it in its halo. The slice's prefix queries
# ride along: an online softmax over the prefix keys, then over each grid row as it arrives, so they
# read no key or value twice either and need no programs of their own; with one segment per slice no
# second launch either.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _dot_t(a, b, FP64: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b.T`` in the accumulator dtype (float64: a broadcast product, as elsewhere)."""
    if FP64:
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    elif IEEE:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b))


@triton.jit
def _dot(p, v, FP64: tl.constexpr, IEEE: tl.constexpr):
    """``p @ v`` with ``p`` cast to the values' dtype (tensor cores for 16-bit inputs)."""
    p = p.to(v.dtype)
    if FP64:
        return tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    elif IEEE:
        return tl.dot(p, v, input_precision="ieee")
    else:
        return tl.dot(p, v)


@triton.jit
def _stream_segment(SEGMENTS: tl.constexpr, seg_rows, gh):
    """This program's slice, segment, and grid rows ``[y0, y1)`` of the streaming kernels."""
    pid = tl.program_id(0)
    bh = pid // SEGMENTS
    seg = pid - bh * SEGMENTS
    y0 = seg * seg_rows
    return bh, seg, y0, tl.minimum(y0 + seg_rows, gh)


@triton.jit
def _stream_lanes(gw, rad, BLOCK_W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head-dim offsets and mask, the lanes of a grid row (column ``x``) and their validity, and which
    query lane (row) sees which key lane (column) of a grid row within the window."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.arange(0, BLOCK_W)
    x_ok = x < gw
    band = (tl.abs(x[None, :] - x[:, None]) <= rad) & x_ok[None, :]
    return offs_d, (offs_d < D)[None, :], x, x_ok, band


@triton.jit
def _stream_prefix_step(qp, k, v, key_ok, p_ok, m, l, acc, sc, FP64: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step of the prefix queries ``qp`` over a block of keys (lanes ``key_ok``)."""
    mask = p_ok[:, None] & key_ok[None, :]
    s = tl.where(mask, _dot_t(qp, k, FP64, IEEE) * sc, _NEG)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.where(mask, tl.exp(s - m_new[:, None]), 0.0)
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + _dot(p, v, FP64, IEEE)


@triton.jit
def _local_attn_fwd_stream_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, count_ptr,
                                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                                  H, N, T, gh, gw, rad, seg_rows, scale_hi, scale_lo,
                                  ZERO_BORDER: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr,
                                  HAS_PREFIX: tl.constexpr, SEGMENTS: tl.constexpr, RELOAD: tl.constexpr,
                                  PREFETCH: tl.constexpr, INLINE_COMBINE: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, D: tl.constexpr,
                                  BLOCK_D: tl.constexpr, STAGES: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                                  PARTS_DC: tl.constexpr):
    """Program ``pid`` walks grid rows ``[y0, y1)`` (``seg_rows`` of them) of slice ``pid // SEGMENTS``.

    With SEGMENTS > 1 the slice's rows are split among several programs: each also loads the row above
    its first (the row below its last arrives as its last step's next row), and its prefix queries see
    its own rows' keys only (segment 0: also the prefix keys), so it stores their normalised parts and
    log-sum-exps (``part_o``, ``part_lse``, ``SEGMENTS`` per query) for ``_combine_parts_kernel``, or
    (INLINE_COMBINE) for the slice's last program to finish, which combines them.

    RELOAD: each step loads rows y - 1, y and y + 1 afresh instead of keeping two of them from the
    steps before (three reads of each key and value, but no loaded value outlives its step, so
    Triton's software pipeliner can fetch a step ahead; the rows it keeps cannot be). PREFETCH (without
    RELOAD): each step issues the loads of the next step's new rows (keys and values of row y + 2, queries
    of row y + 1) and works on those the step before issued, so their latency overlaps its work."""
    bh, seg, y0, y1 = _stream_segment(SEGMENTS, seg_rows, gh)
    sc = _scale(scale_hi, scale_lo, FP64)
    q_base = _slice_base(bh, H, sqb, sqh)
    k_base = _slice_base(bh, H, skb, skh)
    v_base = _slice_base(bh, H, svb, svh)
    o_base = bh.to(tl.int64) * N
    offs_d, d_ok, x, x_ok, band = _stream_lanes(gw, rad, BLOCK_W, D, BLOCK_D)
    if ZERO_BORDER:
        nx = tl.minimum(x + rad, gw - 1) - tl.maximum(x - rad, 0) + 1
    if not RELOAD:
        # rows y0 - 1 (zeros above the grid) and y0
        p_ok = x_ok & (y0 > 0)
        rows = (T + (y0 - 1) * gw + x).to(tl.int64)
        k_prev = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=p_ok[:, None] & d_ok,
                         other=0.0)
        v_prev = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=p_ok[:, None] & d_ok,
                         other=0.0)
        rows = (T + y0 * gw + x).to(tl.int64)
        k_cur = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=x_ok[:, None] & d_ok, other=0.0)
        v_cur = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=x_ok[:, None] & d_ok, other=0.0)
        if PREFETCH:
            # the first step's row y0 + 1 and queries of row y0
            q_next = tl.load(q_ptr + q_base + rows[:, None] * sqn + offs_d[None, :], mask=x_ok[:, None] & d_ok,
                             other=0.0)
            n_ok = x_ok & (y0 + 1 < gh)
            rows = (T + (y0 + 1) * gw + x).to(tl.int64)
            k_next = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                             other=0.0)
            v_next = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                             other=0.0)
    if HAS_PREFIX:
        t = tl.arange(0, BLOCK_T)
        t_ok = t < T
        t_rows = t.to(tl.int64)
        qp = tl.load(q_ptr + q_base + t_rows[:, None] * sqn + offs_d[None, :], mask=t_ok[:, None] & d_ok, other=0.0)
        m_p = tl.full([BLOCK_T], _NEG, sc.dtype)
        l_p = tl.zeros([BLOCK_T], sc.dtype)
        acc_p = tl.zeros([BLOCK_T, BLOCK_D], sc.dtype)
        if seg == 0:
            kp = tl.load(k_ptr + k_base + t_rows[:, None] * skn + offs_d[None, :], mask=t_ok[:, None] & d_ok,
                         other=0.0)
            vp = tl.load(v_ptr + v_base + t_rows[:, None] * svn + offs_d[None, :], mask=t_ok[:, None] & d_ok,
                         other=0.0)
            m_p, l_p, acc_p = _stream_prefix_step(qp, kp, vp, t_ok, t_ok, m_p, l_p, acc_p, sc, FP64, IEEE)
        if not RELOAD:
            m_p, l_p, acc_p = _stream_prefix_step(qp, k_cur, v_cur, x_ok, t_ok, m_p, l_p, acc_p, sc, FP64, IEEE)
    for y in tl.range(y0, y1, num_stages=STAGES):
        # row y + 1 (zeros past the last row), the queries of row y
        n_ok = x_ok & (y + 1 < gh)
        if PREFETCH and not RELOAD:
            k_down = k_next
            v_down = v_next
            q = q_next
            # the next step's: row y + 2, the queries of row y + 1
            f_ok = x_ok & (y + 2 < gh)
            rows = (T + (y + 2) * gw + x).to(tl.int64)
            k_next = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=f_ok[:, None] & d_ok,
                             other=0.0)
            v_next = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=f_ok[:, None] & d_ok,
                             other=0.0)
            f_ok = x_ok & (y + 1 < y1)
            rows = (T + (y + 1) * gw + x).to(tl.int64)
            q_next = tl.load(q_ptr + q_base + rows[:, None] * sqn + offs_d[None, :], mask=f_ok[:, None] & d_ok,
                             other=0.0)
            rows = (T + y * gw + x).to(tl.int64)
        else:
            rows = (T + (y + 1) * gw + x).to(tl.int64)
            k_down = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                             other=0.0)
            v_down = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                             other=0.0)
            rows = (T + y * gw + x).to(tl.int64)
            q = tl.load(q_ptr + q_base + rows[:, None] * sqn + offs_d[None, :], mask=x_ok[:, None] & d_ok,
                        other=0.0)
        if RELOAD:
            k_mid = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=x_ok[:, None] & d_ok,
                            other=0.0)
            v_mid = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=x_ok[:, None] & d_ok,
                            other=0.0)
            u_ok = x_ok & (y > 0)
            u_rows = (T + (y - 1) * gw + x).to(tl.int64)
            k_up = tl.load(k_ptr + k_base + u_rows[:, None] * skn + offs_d[None, :], mask=u_ok[:, None] & d_ok,
                           other=0.0)
            v_up = tl.load(v_ptr + v_base + u_rows[:, None] * svn + offs_d[None, :], mask=u_ok[:, None] & d_ok,
                           other=0.0)
            if HAS_PREFIX:
                m_p, l_p, acc_p = _stream_prefix_step(qp, k_mid, v_mid, x_ok, t_ok, m_p, l_p, acc_p, sc, FP64, IEEE)
        else:
            k_up = k_prev
            v_up = v_prev
            k_mid = k_cur
            v_mid = v_cur
            if HAS_PREFIX:
                # (the row below the segment belongs to the next segment's prefix parts)
                m_p, l_p, acc_p = _stream_prefix_step(qp, k_down, v_down, n_ok & (y + 1 < y1), t_ok, m_p, l_p,
                                                      acc_p, sc, FP64, IEEE)
        up = band & (y > 0) & (rad > 0)
        down = band & (y + 1 < gh) & (rad > 0)
        s_up = tl.where(up, _dot_t(q, k_up, FP64, IEEE) * sc, _NEG)
        s_mid = tl.where(band, _dot_t(q, k_mid, FP64, IEEE) * sc, _NEG)
        s_down = tl.where(down, _dot_t(q, k_down, FP64, IEEE) * sc, _NEG)
        m = tl.maximum(tl.maximum(tl.max(s_up, axis=1), tl.max(s_mid, axis=1)), tl.max(s_down, axis=1))
        if ZERO_BORDER:
            ny = tl.minimum(y + rad, gh - 1) - tl.maximum(y - rad, 0) + 1
            n_zero = ((2 * rad + 1) * (2 * rad + 1) - ny * nx).to(sc.dtype)
            m = tl.where(n_zero > 0, tl.maximum(m, 0.0), m)
        p_up = tl.where(up, tl.exp(s_up - m[:, None]), 0.0)
        p_mid = tl.where(band, tl.exp(s_mid - m[:, None]), 0.0)
        p_down = tl.where(down, tl.exp(s_down - m[:, None]), 0.0)
        l = tl.sum(p_up, axis=1) + tl.sum(p_mid, axis=1) + tl.sum(p_down, axis=1)
        if ZERO_BORDER:
            # m >= 0 wherever n_zero > 0, so the clamp only keeps dead lanes finite.
            l += n_zero * tl.exp(tl.minimum(-m, 0.0))
        l = tl.where(x_ok, l, 1.0)
        o = _dot(p_up, v_up, FP64, IEEE) + _dot(p_mid, v_mid, FP64, IEEE) + _dot(p_down, v_down, FP64, IEEE)
        o_rows = o_base + rows
        tl.store(out_ptr + o_rows[:, None] * D + offs_d[None, :], (o / l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=x_ok[:, None] & d_ok)
        tl.store(lse_ptr + o_rows, m + tl.log(l), mask=x_ok)
        if not RELOAD:
            k_prev = k_cur
            v_prev = v_cur
            k_cur = k_down
            v_cur = v_down
    if HAS_PREFIX:
        l_p = tl.where(t_ok, l_p, 1.0)
        if SEGMENTS == 1:
            o_rows = o_base + t_rows
            tl.store(out_ptr + o_rows[:, None] * D + offs_d[None, :],
                     (acc_p / l_p[:, None]).to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok)
            tl.store(lse_ptr + o_rows, m_p + tl.log(l_p), mask=t_ok)
        else:
            part_rows = (bh * T + t).to(tl.int64) * SEGMENTS + seg
            tl.store(part_o_ptr + part_rows[:, None] * D + offs_d[None, :], acc_p / l_p[:, None],
                     mask=t_ok[:, None] & d_ok)
            tl.store(part_lse_ptr + part_rows, m_p + tl.log(l_p), mask=t_ok)
            if INLINE_COMBINE:
                _combine_slice_inline(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, count_ptr, bh, N, T, SEGMENTS,
                                      D, BLOCK_PARTS, PARTS_DC)

@triton.jit
def _stream_bwd_pair(q, do, lse, delta, k, v, mask, sc, FP64: tl.constexpr, IEEE: tl.constexpr):
    """``p`` and ``dS = p (dO v^T - delta)`` of a block of queries against a block of keys (0 where masked)."""
    p = tl.where(mask, tl.exp(_dot_t(q, k, FP64, IEEE) * sc - lse[:, None]), 0.0)
    return p, p * (_dot_t(do, v, FP64, IEEE) - delta[:, None])


@triton.jit
def _local_attn_bwd_stream_kernel(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, part_dq_ptr,
                                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sob, soh, son,
                                  H, N, T, gh, gw, rad, seg_rows, scale_hi, scale_lo,
                                  FP64: tl.constexpr, IEEE: tl.constexpr, HAS_PREFIX: tl.constexpr,
                                  SEGMENTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                                  D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole backward of grid rows ``[y0, y1)`` of slice ``pid // SEGMENTS`` in one walk over its rows
    (BWD_STREAM; windows of 1 and 3, head dims of one chunk): dq of those query rows, dk and dv of those
    key rows, and the prefix queries' dq terms of those keys.

    Step ``y`` takes query row ``y`` against key rows ``y - 1, y, y + 1`` (in registers, as in the
    forward), adds its dq (stored at once) and its terms of the three rows' dk and dv (accumulated in
    registers); key row ``y - 1`` then has all its terms and is stored. The prefix queries add their
    terms of each key row as it arrives. The walk starts a row above the segment and ends a row below
    it (those rows' queries add terms to the segment's first and last key rows; their own results
    belong to the neighbouring segments). With SEGMENTS > 1 the prefix queries' dq is stored in parts
    (``part_dq``) that ``_combine_parts_kernel`` adds up; segment 0 also does the prefix keys."""
    bh, seg, y0, y1 = _stream_segment(SEGMENTS, seg_rows, gh)
    ys = tl.maximum(y0 - 1, 0)
    ye = tl.minimum(y1 + 1, gh)
    sc = _scale(scale_hi, scale_lo, FP64)
    acc_ty = sc.dtype
    q_base = _slice_base(bh, H, sqb, sqh)
    k_base = _slice_base(bh, H, skb, skh)
    v_base = _slice_base(bh, H, svb, svh)
    do_base = _slice_base(bh, H, sdob, sdoh)
    o_base = _slice_base(bh, H, sob, soh)
    out_base = bh.to(tl.int64) * N
    offs_d, d_ok, x, x_ok, band = _stream_lanes(gw, rad, BLOCK_W, D, BLOCK_D)
    # key rows ys - 1 (zeros above the grid) and ys, their gradients so far
    p_ok = x_ok & (ys > 0)
    rows = (T + (ys - 1) * gw + x).to(tl.int64)
    k_prev = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=p_ok[:, None] & d_ok, other=0.0)
    v_prev = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=p_ok[:, None] & d_ok, other=0.0)
    rows = (T + ys * gw + x).to(tl.int64)
    k_cur = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=x_ok[:, None] & d_ok, other=0.0)
    v_cur = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=x_ok[:, None] & d_ok, other=0.0)
    dk_prev = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
    dv_prev = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
    dk_cur = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
    dv_cur = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
    if HAS_PREFIX:
        t = tl.arange(0, BLOCK_T)
        t_ok = t < T
        t_rows = t.to(tl.int64)
        t_mask = t_ok[:, None] & d_ok
        qp = tl.load(q_ptr + q_base + t_rows[:, None] * sqn + offs_d[None, :], mask=t_mask, other=0.0)
        dop = tl.load(do_ptr + do_base + t_rows[:, None] * sdon + offs_d[None, :], mask=t_mask, other=0.0)
        op = tl.load(o_ptr + o_base + t_rows[:, None] * son + offs_d[None, :], mask=t_mask, other=0.0)
        delta_p = tl.sum(dop.to(acc_ty) * op.to(acc_ty), axis=1)
        lse_p = tl.load(lse_ptr + out_base + t_rows, mask=t_ok, other=0.0)
        dq_p = tl.zeros([BLOCK_T, BLOCK_D], acc_ty)
        if seg == 0:
            # the prefix keys: terms of the prefix queries only
            kp = tl.load(k_ptr + k_base + t_rows[:, None] * skn + offs_d[None, :], mask=t_mask, other=0.0)
            vp = tl.load(v_ptr + v_base + t_rows[:, None] * svn + offs_d[None, :], mask=t_mask, other=0.0)
            p, ds = _stream_bwd_pair(qp, dop, lse_p, delta_p, kp, vp, t_ok[:, None] & t_ok[None, :], sc, FP64, IEEE)
            dq_p += _dot(ds, kp, FP64, IEEE)
            o_rows = out_base + t_rows
            tl.store(dk_ptr + o_rows[:, None] * D + offs_d[None, :],
                     (_dot(tl.trans(ds), qp, FP64, IEEE) * sc).to(dk_ptr.dtype.element_ty), mask=t_mask)
            tl.store(dv_ptr + o_rows[:, None] * D + offs_d[None, :],
                     _dot(tl.trans(p), dop, FP64, IEEE).to(dv_ptr.dtype.element_ty), mask=t_mask)
        # key row ys, where it is the segment's (the first segment)
        own = x_ok & (ys >= y0)
        p, ds = _stream_bwd_pair(qp, dop, lse_p, delta_p, k_cur, v_cur, t_ok[:, None] & own[None, :], sc, FP64, IEEE)
        dq_p += _dot(ds, k_cur, FP64, IEEE)
        dk_cur += _dot(tl.trans(ds), qp, FP64, IEEE)
        dv_cur += _dot(tl.trans(p), dop, FP64, IEEE)
    for y in range(ys, ye):
        # key row y + 1 (zeros past the last row); query row y
        n_ok = x_ok & (y + 1 < gh)
        rows = (T + (y + 1) * gw + x).to(tl.int64)
        k_next = tl.load(k_ptr + k_base + rows[:, None] * skn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                         other=0.0)
        v_next = tl.load(v_ptr + v_base + rows[:, None] * svn + offs_d[None, :], mask=n_ok[:, None] & d_ok,
                         other=0.0)
        dk_next = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
        dv_next = tl.zeros([BLOCK_W, BLOCK_D], acc_ty)
        rows = (T + y * gw + x).to(tl.int64)
        q_mask = x_ok[:, None] & d_ok
        q = tl.load(q_ptr + q_base + rows[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_ptr + do_base + rows[:, None] * sdon + offs_d[None, :], mask=q_mask, other=0.0)
        o = tl.load(o_ptr + o_base + rows[:, None] * son + offs_d[None, :], mask=q_mask, other=0.0)
        delta = tl.sum(do.to(acc_ty) * o.to(acc_ty), axis=1)
        o_rows = out_base + rows
        lse = tl.load(lse_ptr + o_rows, mask=x_ok, other=0.0)
        if HAS_PREFIX:
            own = n_ok & (y + 1 >= y0) & (y + 1 < y1)
            p, ds = _stream_bwd_pair(qp, dop, lse_p, delta_p, k_next, v_next, t_ok[:, None] & own[None, :], sc,
                                     FP64, IEEE)
            dq_p += _dot(ds, k_next, FP64, IEEE)
            dk_next += _dot(tl.trans(ds), qp, FP64, IEEE)
            dv_next += _dot(tl.trans(p), dop, FP64, IEEE)
        up = band & (y > 0) & (rad > 0)
        down = band & (y + 1 < gh) & (rad > 0)
        p_up, ds_up = _stream_bwd_pair(q, do, lse, delta, k_prev, v_prev, up, sc, FP64, IEEE)
        p_mid, ds_mid = _stream_bwd_pair(q, do, lse, delta, k_cur, v_cur, band, sc, FP64, IEEE)
        p_down, ds_down = _stream_bwd_pair(q, do, lse, delta, k_next, v_next, down, sc, FP64, IEEE)
        dq = _dot(ds_up, k_prev, FP64, IEEE) + _dot(ds_mid, k_cur, FP64, IEEE) + _dot(ds_down, k_next, FP64, IEEE)
        tl.store(dq_ptr + o_rows[:, None] * D + offs_d[None, :], (dq * sc).to(dq_ptr.dtype.element_ty),
                 mask=q_mask & (y >= y0) & (y < y1))
        dk_prev += _dot(tl.trans(ds_up), q, FP64, IEEE)
        dv_prev += _dot(tl.trans(p_up), do, FP64, IEEE)
        dk_cur += _dot(tl.trans(ds_mid), q, FP64, IEEE)
        dv_cur += _dot(tl.trans(p_mid), do, FP64, IEEE)
        dk_next += _dot(tl.trans(ds_down), q, FP64, IEEE)
        dv_next += _dot(tl.trans(p_down), do, FP64, IEEE)
        # key row y - 1 has all its terms now
        rows = out_base + (T + (y - 1) * gw + x).to(tl.int64)
        done = x_ok[:, None] & d_ok & (y - 1 >= y0) & (y - 1 < y1)
        tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :], (dk_prev * sc).to(dk_ptr.dtype.element_ty), mask=done)
        tl.store(dv_ptr + rows[:, None] * D + offs_d[None, :], dv_prev.to(dv_ptr.dtype.element_ty), mask=done)
        k_prev = k_cur
        v_prev = v_cur
        k_cur = k_next
        v_cur = v_next
        dk_prev = dk_cur
        dv_prev = dv_cur
        dk_cur = dk_next
        dv_cur = dv_next
    # key row ye - 1 (the grid's last row, where it is the segment's)
    rows = out_base + (T + (ye - 1) * gw + x).to(tl.int64)
    done = x_ok[:, None] & d_ok & (ye - 1 >= y0) & (ye - 1 < y1)
    tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :], (dk_prev * sc).to(dk_ptr.dtype.element_ty), mask=done)
    tl.store(dv_ptr + rows[:, None] * D + offs_d[None, :], dv_prev.to(dv_ptr.dtype.element_ty), mask=done)
    if HAS_PREFIX:
        if SEGMENTS == 1:
            o_rows = out_base + t_rows
            tl.store(dq_ptr + o_rows[:, None] * D + offs_d[None, :], (dq_p * sc).to(dq_ptr.dtype.element_ty),
                     mask=t_mask)
        else:
            part_rows = (bh * T + t).to(tl.int64) * SEGMENTS + seg
            tl.store(part_dq_ptr + part_rows[:, None] * D + offs_d[None, :], dq_p * sc, mask=t_mask)


@triton.jit
def _bwd_dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, part_dq_ptr, tile,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sob, soh, son,
                 H, N, T, gh, gw, ry, rx, rows, cols, x_tiles, halo_x, halo_cols, sc,
                 FP64: tl.constexpr, IEEE: tl.constexpr, FUSE_PREFIX: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, D: tl.constexpr, BLOCK_DC: tl.constexpr,
                 STAGES: tl.constexpr):
    """delta and dq for a tile of grid queries: dS = P (dO V^T - delta), dq = scale dS K.

    Under FUSE_PREFIX the prefix queries ride along as in the forward (``_fwd_tile``): each tile adds
    the terms of its own keys (and, the slice's first tile, of the prefix keys) to every prefix
    query's dq, stores that part (``part_dq``), and ``_combine_parts_kernel`` adds the parts up. The
    first tile also stores the prefix queries' delta (the key-centric kernel reads it)."""
    bh, y0, x0 = _tile_origin(tile, gh, rows, cols, x_tiles)
    qy, qx, q_ok = _patch_lanes(y0, x0, rows, cols, gh, gw, BLOCK_Q)
    ky, kx, k_ok = _patch_lanes(y0 - ry, x0 - halo_x, rows + 2 * ry, halo_cols, gh, gw, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_DC)
    q_rows = (T + qy * gw + qx).to(tl.int64)
    k_rows = (T + ky * gw + kx).to(tl.int64)
    window = (tl.abs(ky[None, :] - qy[:, None]) <= ry) & (tl.abs(kx[None, :] - qx[:, None]) <= rx)
    mask = q_ok[:, None] & k_ok[None, :] & window
    q_in = q_ok
    k_in = k_ok
    delta_ok = q_ok
    if FUSE_PREFIX:
        mask, q_rows, k_rows, q_in, k_in, pq, p_ok, t, n_tiles = _prefix_lanes(
            tile, bh, y0, x0, ky, kx, q_ok, k_ok, mask, q_rows, k_rows, T, gh, rows, cols, x_tiles, ry, halo_cols,
            BLOCK_Q, BLOCK_K)
        delta_ok = q_ok | (p_ok & (t == 0))
    q_ptrs = q_ptr + (_slice_base(bh, H, sqb, sqh) + q_rows * sqn)[:, None] + offs_d[None, :]
    do_ptrs = do_ptr + (_slice_base(bh, H, sdob, sdoh) + q_rows * sdon)[:, None] + offs_d[None, :]
    o_ptrs = o_ptr + (_slice_base(bh, H, sob, soh) + q_rows * son)[:, None] + offs_d[None, :]
    k_ptrs = k_ptr + (_slice_base(bh, H, skb, skh) + k_rows * skn)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (_slice_base(bh, H, svb, svh) + k_rows * svn)[:, None] + offs_d[None, :]
    s = tl.zeros([BLOCK_Q, BLOCK_K], sc.dtype)
    dp = tl.zeros([BLOCK_Q, BLOCK_K], sc.dtype)
    delta = tl.zeros([BLOCK_Q], sc.dtype)
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        q = tl.load(q_ptrs + c, mask=q_in[:, None] & d_ok, other=0.0)
        do = tl.load(do_ptrs + c, mask=q_in[:, None] & d_ok, other=0.0)
        o = tl.load(o_ptrs + c, mask=q_in[:, None] & d_ok, other=0.0)
        k = tl.load(k_ptrs + c, mask=k_in[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptrs + c, mask=k_in[:, None] & d_ok, other=0.0)
        delta += tl.sum(do.to(sc.dtype) * o.to(sc.dtype), axis=1)
        if FP64:
            s += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            dp += tl.sum(do[:, None, :] * v[None, :, :], axis=2)
        elif IEEE:
            s += tl.dot(q, tl.trans(k), input_precision="ieee")
            dp += tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s += tl.dot(q, tl.trans(k))
            dp += tl.dot(do, tl.trans(v))
    rows_out = bh.to(tl.int64) * N + q_rows
    tl.store(delta_ptr + rows_out, delta, mask=delta_ok)
    lse = tl.load(lse_ptr + rows_out, mask=q_in, other=0.0)
    p = tl.where(mask, tl.exp(s * sc - lse[:, None]), 0.0)
    ds = (p * (dp - delta[:, None])).to(k_ptr.dtype.element_ty)
    dq_ptrs = dq_ptr + rows_out[:, None] * D + offs_d[None, :]
    if FUSE_PREFIX:
        part_ptrs = part_dq_ptr + ((bh * T + pq) * n_tiles + t).to(tl.int64)[:, None] * D + offs_d[None, :]
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        k = tl.load(k_ptrs + c, mask=k_in[:, None] & d_ok, other=0.0)
        if FP64:
            dq = tl.sum(ds[:, :, None] * k[None, :, :], axis=1)
        elif IEEE:
            dq = tl.dot(ds, k, input_precision="ieee")
        else:
            dq = tl.dot(ds, k)
        tl.store(dq_ptrs + c, (dq * sc).to(dq_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok)
        if FUSE_PREFIX:
            tl.store(part_ptrs + c, dq * sc, mask=p_ok[:, None] & d_ok)


@triton.jit
def _local_attn_bwd_dq_tiled_kernel(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, part_dq_ptr,
                                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                                    sdob, sdoh, sdon, sob, soh, son,
                                    H, N, T, gh, gw, ry, rx, rows, cols, x_tiles, halo_x, halo_cols,
                                    n_prefix_programs, scale_hi, scale_lo,
                                    FP64: tl.constexpr, IEEE: tl.constexpr, FUSE_PREFIX: tl.constexpr,
                                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                                    STAGES: tl.constexpr, PREFIX_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if FUSE_PREFIX:
        _bwd_dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, part_dq_ptr,
                     pid, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, sob, soh, son, H, N, T, gh, gw, ry, rx,
                     rows, cols, x_tiles, halo_x, halo_cols, sc,
                     FP64, IEEE, True, BLOCK_Q, BLOCK_K, D, BLOCK_DC, STAGES)
    elif pid < n_prefix_programs:
        bh = pid // T
        _bwd_dq_prefix_query(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr,
                             bh, pid - bh * T, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                             sdob, sdoh, sdon, sob, soh, son, H, N, sc,
                             BLOCK_N, D, BLOCK_D, PREFIX_STAGES)
    else:
        _bwd_dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, part_dq_ptr,
                     pid - n_prefix_programs, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, sob, soh, son, H, N, T, gh, gw, ry, rx,
                     rows, cols, x_tiles, halo_x, halo_cols, sc,
                     FP64, IEEE, False, BLOCK_Q, BLOCK_K, D, BLOCK_DC, STAGES)


@triton.jit
def _bwd_kv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tile,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                 H, N, T, gh, gw, ry, rx, rows, cols, x_tiles, halo_x, halo_cols, sc,
                 FP64: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_Q: tl.constexpr, D: tl.constexpr, BLOCK_DC: tl.constexpr,
                 STAGES: tl.constexpr):
    """dk and dv for a tile of grid keys. Its queries are the halo of grid queries around it plus,
    in the lanes after the halo, the T prefix queries (which see every key)."""
    bh, y0, x0 = _tile_origin(tile, gh, rows, cols, x_tiles)
    ky, kx, k_ok = _patch_lanes(y0, x0, rows, cols, gh, gw, BLOCK_K)
    n_halo = (rows + 2 * ry) * halo_cols
    qy, qx, q_ok = _patch_lanes(y0 - ry, x0 - halo_x, rows + 2 * ry, halo_cols, gh, gw, BLOCK_Q)
    lane = tl.arange(0, BLOCK_Q)
    prefix = (lane >= n_halo) & (lane < n_halo + T)
    q_ok = q_ok | prefix
    offs_d = tl.arange(0, BLOCK_DC)
    k_rows = (T + ky * gw + kx).to(tl.int64)
    q_rows = tl.where(prefix, lane - n_halo, T + qy * gw + qx).to(tl.int64)
    k_ptrs = k_ptr + (_slice_base(bh, H, skb, skh) + k_rows * skn)[:, None] + offs_d[None, :]
    v_ptrs = v_ptr + (_slice_base(bh, H, svb, svh) + k_rows * svn)[:, None] + offs_d[None, :]
    q_ptrs = q_ptr + (_slice_base(bh, H, sqb, sqh) + q_rows * sqn)[:, None] + offs_d[None, :]
    do_ptrs = do_ptr + (_slice_base(bh, H, sdob, sdoh) + q_rows * sdon)[:, None] + offs_d[None, :]
    s = tl.zeros([BLOCK_K, BLOCK_Q], sc.dtype)
    dp = tl.zeros([BLOCK_K, BLOCK_Q], sc.dtype)
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        k = tl.load(k_ptrs + c, mask=k_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptrs + c, mask=k_ok[:, None] & d_ok, other=0.0)
        q = tl.load(q_ptrs + c, mask=q_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_ptrs + c, mask=q_ok[:, None] & d_ok, other=0.0)
        if FP64:
            s += tl.sum(k[:, None, :] * q[None, :, :], axis=2)
            dp += tl.sum(v[:, None, :] * do[None, :, :], axis=2)
        elif IEEE:
            s += tl.dot(k, tl.trans(q), input_precision="ieee")
            dp += tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            s += tl.dot(k, tl.trans(q))
            dp += tl.dot(v, tl.trans(do))
    row0 = bh.to(tl.int64) * N
    lse = tl.load(lse_ptr + row0 + q_rows, mask=q_ok, other=0.0)
    delta = tl.load(delta_ptr + row0 + q_rows, mask=q_ok, other=0.0)
    window = (tl.abs(qy[None, :] - ky[:, None]) <= ry) & (tl.abs(qx[None, :] - kx[:, None]) <= rx)
    mask = k_ok[:, None] & q_ok[None, :] & (window | prefix[None, :])
    p = tl.where(mask, tl.exp(s * sc - lse[None, :]), 0.0)
    ds = (p * (dp - delta[None, :])).to(q_ptr.dtype.element_ty)
    p = p.to(do_ptr.dtype.element_ty)
    dk_ptrs = dk_ptr + (row0 + k_rows)[:, None] * D + offs_d[None, :]
    dv_ptrs = dv_ptr + (row0 + k_rows)[:, None] * D + offs_d[None, :]
    for c in tl.range(0, D, BLOCK_DC, num_stages=STAGES):
        d_ok = (c + offs_d < D)[None, :]
        q = tl.load(q_ptrs + c, mask=q_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_ptrs + c, mask=q_ok[:, None] & d_ok, other=0.0)
        if FP64:
            dk = tl.sum(ds[:, :, None] * q[None, :, :], axis=1)
            dv = tl.sum(p[:, :, None] * do[None, :, :], axis=1)
        elif IEEE:
            dk = tl.dot(ds, q, input_precision="ieee")
            dv = tl.dot(p, do, input_precision="ieee")
        else:
            dk = tl.dot(ds, q)
            dv = tl.dot(p, do)
        tl.store(dk_ptrs + c, (dk * sc).to(dk_ptr.dtype.element_ty), mask=k_ok[:, None] & d_ok)
        tl.store(dv_ptrs + c, dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None] & d_ok)


@triton.jit
def _local_attn_bwd_dkdv_tiled_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                                      H, N, T, gh, gw, ry, rx, rows, cols, x_tiles, halo_x, halo_cols,
                                      n_prefix_programs, BHT, scale_hi, scale_lo,
                                      FP64: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr,
                                      BLOCK_Q: tl.constexpr, PREFIX_ROWS: tl.constexpr,
                                      D: tl.constexpr, BLOCK_D: tl.constexpr,
                                      BLOCK_DC: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    sc = _scale(scale_hi, scale_lo, FP64)
    if pid < n_prefix_programs:
        _bwd_kv_prefix_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, pid,
                            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                            H, N, T, BHT, sc, PREFIX_ROWS, D, BLOCK_D)
    else:
        _bwd_kv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     pid - n_prefix_programs, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, H, N, T, gh, gw, ry, rx, rows, cols, x_tiles, halo_x,
                     halo_cols, sc, FP64, IEEE, BLOCK_K, BLOCK_Q, D, BLOCK_DC, STAGES)


# ---------------------------------------------------------------------------------------------------
# Host side: block sizes and launchers
# ---------------------------------------------------------------------------------------------------

_INTERPRETED = not isinstance(_local_attn_fwd_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True)
class _Config:
    """Block sizes of the window-walking kernels and of the prefix programs."""
    block_q: int  # grid queries (or keys) per program
    block_n: int  # keys per step of a prefix query
    block_d: int  # the whole head dim, padded to a power of two
    num_warps: int
    stages: int  # software-pipelining depth of the key/query loops


def _fwd_config(D: int, dtype: torch.dtype) -> _Config:
    """Forward block sizes: about 2048 elements per tile (measured best on an H200 for
    12 x 64 and 1 x 768 heads in bf16; fewer registers keep more programs resident)."""
    return _heuristic(D, dtype, 2048, min_block_q=1)


def _bwd_config(D: int, dtype: torch.dtype) -> _Config:
    """Backward block sizes: the key-centric kernel holds six tiles (k, v, dk, dv, q, dO), so half
    the forward's tile, but at least two rows."""
    return _heuristic(D, dtype, 1024, min_block_q=2)


@functools.lru_cache(maxsize=None)
def _heuristic(D: int, dtype: torch.dtype, budget: int, min_block_q: int) -> _Config:
    block_d = triton.next_power_of_2(D)
    if dtype == torch.float64:
        budget //= 2
    block_q = max(min_block_q, min(64, budget // block_d))
    block_n = max(1, min(128, 4 * budget // block_d))
    tile = block_q * block_d * (2 if dtype == torch.float64 else 1)
    num_warps = 2 if tile <= 512 else 4 if tile <= 4096 else 8 if tile <= 16384 else 16
    return _Config(block_q, block_n, block_d, num_warps, stages=1)


@dataclass(frozen=True)
class _TilePlan:
    """Geometry and block sizes of the tiled kernels (see the comment above ``_patch_lanes``)."""
    rows: int
    cols: int
    x_tiles: int
    halo_x: int
    halo_cols: int
    block: int  # lanes of a tile
    block_halo: int  # lanes of its halo (plus the prefix lanes in the key-centric kernel)
    block_dc: int  # head-dim chunk
    num_warps: int
    stages: int
    fwd_num_warps: int  # the forward kernel's (tuned on its own; the backward kernels use num_warps)

    def tiles(self, gh: int) -> int:
        return triton.cdiv(gh, self.rows) * self.x_tiles


# Pipelining depth of the prefix queries' loops over key blocks next to the tiled kernels: the few
# prefix programs are the longest, so they keep more loads in flight.
_PREFIX_STAGES = 2
# The forward's prefix queries ride in spare lanes of the grid tiles (_fwd_tile, FUSE_PREFIX) for up to
# this many prefix tokens; more of them, or FWD_FUSED_PREFIX off, run as programs of their own.
FWD_FUSED_PREFIX = False
_FUSED_PREFIX_MAX = 8
# Otherwise, with a tile plan, each prefix query's keys can be split among this many programs (at least
# one key block each), whose parts _combine_parts_kernel then weighs, instead of one program reading all
# N keys (0 or 1: one program; on an H100 the 64 prefix programs of B=64, 1 x 768 set 16 % of the
# forward's time). Off by default until timed on a GPU.
FWD_PREFIX_SPLITS = 0
# The tiled forward loads the values with the queries and keys where the head dim is one chunk
# (_fwd_tile, EARLY_V); off by default until timed on a GPU (it holds the value tile through the softmax).
FWD_EARLY_V = False
# Wherever the forward splits a prefix query among programs (fused tiles, split prefix keys, streaming
# segments), the last of them to finish combines the parts (_last_part: an atomic counter per slice or
# query, zeroed before the launch) instead of _combine_parts_kernel in a second launch after every
# program has finished. Off by default until timed on a GPU.
FWD_INLINE_COMBINE = False
# The forward walks the grid rows of each slice in _STREAM_SEGMENTS programs (_local_attn_fwd_stream_kernel)
# where it can: windows of 1 or 3, head dims up to _STREAM_MAX_D, grids up to _STREAM_MAX_WIDTH wide, at
# most _STREAM_MAX_PREFIX prefix tokens, and at least _STREAM_MIN_PROGRAMS programs (slices x segments)
# to fill a GPU. With more than one segment per slice, _combine_parts_kernel adds up the prefix queries'
# parts. Off by default until timed on a GPU.
FWD_STREAM = False
_STREAM_SEGMENTS = 2
_STREAM_MAX_D = 128
_STREAM_MAX_WIDTH = 32
_STREAM_MAX_PREFIX = 16
_STREAM_MIN_PROGRAMS = 512
# How it loads its rows (the kernel's RELOAD and PREFETCH): every step rows y - 1, y, y + 1 afresh; or
# (RELOAD off) each step's new rows a step ahead, the default: in the sm_90 code the first use of those
# loads comes some 570 instructions after them, against 6 with both off (each step's new rows as it
# starts, so each step waits for its loads).
STREAM_RELOAD = False
STREAM_PREFETCH = True
# Its warps (for 16-bit rows up to 32 x 64; see _stream_num_warps) and pipelining depth. The tuned
# stream_num_warps, stream_stages, stream_segments, stream_reload and stream_prefetch replace these; the
# tile plan's settings (rows, fwd_num_warps, stages) do not apply to it, nor its to the tiles where a call
# falls back to them.
_STREAM_NUM_WARPS = 4
_STREAM_STAGES = 2
# The backward in one walk over the rows the same way (_local_attn_bwd_stream_kernel: dq, dk and dv in
# one launch, every input read once), for 16-bit inputs where the forward's streaming would apply (float32
# spills kilobytes of registers on sm_90; float64 only under the interpreter); _BWD_STREAM_SEGMENTS
# programs per slice, _BWD_STREAM_NUM_WARPS warps (0: the forward's; sm_90, 12 x 64 bf16: 206 registers
# with 4 warps, 210 with 8, 16 spill). Off by default until timed on a GPU.
BWD_STREAM = False
_BWD_STREAM_SEGMENTS = 2
_BWD_STREAM_NUM_WARPS = 0
# The backward's dq kernel takes the prefix queries into the grid tiles the same way (_bwd_dq_tile,
# FUSE_PREFIX; off by default until timed on a GPU).
BWD_FUSED_PREFIX = False
# Grids up to this wide are tiled in whole rows; wider ones in 16-column tiles.
_WHOLE_ROWS_MAX_WIDTH = 32
# Scores a program holds (tile lanes x halo lanes): beyond this the window-walking kernels run.
_MAX_TILE_SCORES = 8192


def _tile_plan(gh: int, gw: int, ry: int, rx: int, extra: int, D: int, dtype: torch.dtype, extra_q: int = 0):
    """Pick the tile height that wastes the fewest masked scores per grid position (ties: the
    taller tile). ``extra`` halo lanes and ``extra_q`` tile lanes are reserved for the prefix queries
    (the key-centric backward) or the prefix keys and queries (the forward with fused prefix
    queries). None: no tile fits."""
    return _cached_tile_plan(gh, gw, ry, rx, extra, D, dtype, _MAX_TILE_SCORES, None, extra_q)


@functools.lru_cache(maxsize=None)
def _cached_tile_plan(gh, gw, ry, rx, extra, D, dtype, max_scores, only_rows=None, extra_q=0):
    """_tile_plan, also with the tile height forced to ``only_rows`` (None where it does not fit)."""
    if gw <= _WHOLE_ROWS_MAX_WIDTH:
        cols, x_tiles, halo_x, halo_cols = gw, 1, 0, gw
    else:
        cols = 16
        x_tiles, halo_x, halo_cols = triton.cdiv(gw, cols), rx, cols + 2 * rx
    limit = max_scores // (4 if dtype == torch.float64 else 1)
    best = None
    for rows in range(1, gh + 1) if only_rows is None else (min(only_rows, gh),):
        block = max(16, triton.next_power_of_2(rows * cols + extra_q))
        block_halo = max(16, triton.next_power_of_2((rows + 2 * ry) * halo_cols + extra))
        if block * block_halo > limit:
            break
        waste = block * block_halo / (rows * cols)
        if best is None or waste <= best[0] * (1 + 1e-9):
            best = (waste, rows, block, block_halo)
    if best is None:
        return None
    _, rows, block, block_halo = best
    scores = block * block_halo
    d2 = triton.next_power_of_2(D)
    if dtype == torch.float64:
        # float64 products go through a (tile, halo, chunk) broadcast instead of tl.dot.
        block_dc = max(1, min(d2, 8192 // scores))
    elif dtype == torch.float32:
        block_dc = max(16, min(32, d2))  # exact (FMA) dots hold their operands in registers
    else:
        # Chunks of 64 also for smaller D (zero-padded): narrower tensor-core dots need far more
        # registers (seen in ptxas reports for sm_90).
        block_dc = 64
    num_warps = 4 if scores < 2048 else 8
    # The forward in 16-bit dtypes: 2 warps for D <= 64, else 4. On an H200 (bench/run_gpu.py, tune
    # section, B=64, 14x14 + CLS, bf16, CUDA-graph medians) 8 warps took 0.0876 ms (12 x 64) and
    # 0.0806 ms (1 x 768); 2 warps 0.0654 / 0.0513, 4 warps 0.0697 / 0.0457, 16 warps 0.164 / 0.164.
    fwd_num_warps = num_warps if dtype.itemsize >= 4 else (2 if D <= 64 else 4)
    return _TilePlan(rows, cols, x_tiles, halo_x, halo_cols, block, block_halo, block_dc, num_warps,
                     stages=2, fwd_num_warps=fwd_num_warps)


# Forward launch configurations (tile rows, num_warps, pipelining stages; 0 keeps the default's value) that
# bench/gpu_variants.py times at the benchmark shapes next to the default.
TUNE_PLANS = ((1, 4, 0), (4, 4, 0), (0, 2, 0), (0, 4, 0), (0, 0, 1), (0, 0, 3))


def _plan_settings(plan) -> dict:
    return {k: v for k, v in zip(("rows", "fwd_num_warps", "stages"), plan) if v}


# Forward launch settings (sa2vp_kernels.triton.tuning) that bench/gpu_variants.py times at the benchmark
# shapes next to the default, and that python -m sa2vp_kernels.triton.aot compiles there: the plans of
# TUNE_PLANS, the values loaded early, the prefix queries fused into the tiles with several plans, their
# keys split among programs, the row-streaming forward with several warps, programs per slice and
# (where it reloads its rows: only then does Triton pipeline its loads) depths (four-row tiles
# with 8 warps, 2-3x slower than the default on an H100, are no longer timed). (12 x 64
# programs are short and latency-bound: the default, 2 warps at 159 registers on sm_90 with Triton 3.6,
# keeps 6 programs and 12 warps per SM; the fused, early-value plans with 4 warps and one-row tiles use
# fewer registers per thread, so more warps stay resident.)
TUNE_SETTINGS = (
    *(_plan_settings(plan) for plan in TUNE_PLANS),
    {"fwd_early_v": True},
    {"fwd_fused_prefix": True},
    {"fwd_fused_prefix": True, "fwd_early_v": True},
    *({"fwd_fused_prefix": True, **_plan_settings(plan)}
      for plan in ((4, 4, 0), (1, 4, 0), (0, 4, 0), (0, 2, 0))),
    *({"fwd_fused_prefix": True, "fwd_early_v": True, **_plan_settings(plan)}
      for plan in ((0, 4, 0), (1, 4, 0), (1, 2, 0))),
    *({"fwd_prefix_splits": n} for n in (4, 8, 16)),
    {"fwd_prefix_splits": 8, "fwd_early_v": True},
    {"fwd_prefix_splits": 8, "fwd_early_v": True, "fwd_num_warps": 4},
    {"fwd_stream": True},
    *({"fwd_stream": True, "stream_segments": n} for n in (1, 4)),
    *({"fwd_stream": True, "stream_num_warps": w} for w in (2, 8)),
    {"fwd_stream": True, "stream_segments": 4, "stream_num_warps": 2},
    {"fwd_stream": True, "stream_reload": True},
    *({"fwd_stream": True, "stream_reload": True, "stream_segments": n} for n in (1, 4)),
    {"fwd_stream": True, "stream_reload": True, "stream_stages": 3},
    {"fwd_stream": True, "stream_reload": True, "stream_num_warps": 8},
    {"fwd_stream": True, "stream_prefetch": False},
    {"fwd_stream": True, "stream_prefetch": False, "stream_segments": 1},
    # the parts combined by the last program of each group instead of a second launch
    {"fwd_prefix_splits": 8, "fwd_inline_combine": True},
    {"fwd_fused_prefix": True, "fwd_inline_combine": True},
    {"fwd_fused_prefix": True, "fwd_early_v": True, "fwd_num_warps": 4, "fwd_inline_combine": True},
    {"fwd_stream": True, "fwd_inline_combine": True},
)


def settings_label(settings: dict) -> str:
    """A short name of attention launch settings: ``fused early-v rows4 w4``, ``dq fused``."""
    parts = [name for key, name in (("fwd_stream", "stream"), ("stream_reload", "reload"),
                                    ("stream_prefetch", "prefetch"), ("fwd_fused_prefix", "fused"),
                                    ("fwd_early_v", "early-v"))
             if settings.get(key)]
    if settings.get("stream_prefetch") is False:
        parts.append("keep")
    parts += [f"{name}{settings[key]}" for key, name in (("fwd_prefix_splits", "split"), ("rows", "rows"),
                                                          ("fwd_num_warps", "w"), ("stages", "st"),
                                                          ("stream_segments", "stream-seg"),
                                                          ("stream_num_warps", "stream-w"),
                                                          ("stream_stages", "stream-st"))
              if settings.get(key)]
    if settings.get("bwd_fused_prefix"):
        parts.append("fwd+dq" if parts == ["fused"] else "dq fused")
    if settings.get("bwd_stream"):
        parts.append("bwd stream")
    if settings.get("fwd_inline_combine"):
        parts.append("inline")
    return " ".join(parts)


def tuned_tile_plan(rows: int = 0, fwd_num_warps: int = 0, stages: int = 0):
    """A replacement of ``_tile_plan`` with the given tile height, forward warps and pipelining depth
    (0: the default's), for tuning sweeps. A tile height whose scores would not fit gives None (the
    window-walking kernels), as the default does for tiles that do not fit."""
    import dataclasses

    default = _tile_plan

    def plan(gh, gw, ry, rx, extra, D, dtype, extra_q=0):
        p = (_cached_tile_plan(gh, gw, ry, rx, extra, D, dtype, _MAX_TILE_SCORES, rows, extra_q) if rows
             else default(gh, gw, ry, rx, extra, D, dtype, extra_q))
        if p is None:
            return None
        return dataclasses.replace(p, fwd_num_warps=fwd_num_warps or p.fwd_num_warps, stages=stages or p.stages)

    return plan


def _fwd_tile_plan(tuned: dict, gh, gw, ry, rx, extra, D, dtype, extra_q=0):
    """The forward's tile plan: ``_tile_plan`` with the tuned ``rows``, ``fwd_num_warps`` and
    ``stages`` (sa2vp_kernels.triton.tuning) where they are set; the default plan where a tile of
    ``rows`` rows does not fit."""
    rows, warps, stages = tuned.get("rows", 0), tuned.get("fwd_num_warps", 0), tuned.get("stages", 0)
    if not (rows or warps or stages):
        return _tile_plan(gh, gw, ry, rx, extra, D, dtype, extra_q)
    plan = _cached_tile_plan(gh, gw, ry, rx, extra, D, dtype, _MAX_TILE_SCORES, rows, extra_q) if rows else None
    if plan is None:
        plan = _tile_plan(gh, gw, ry, rx, extra, D, dtype, extra_q)
        if plan is None or rows:
            return plan
    return _relaunched(plan, warps, stages)


@functools.lru_cache(maxsize=None)
def _relaunched(plan, fwd_num_warps: int, stages: int):
    import dataclasses

    return dataclasses.replace(plan, fwd_num_warps=fwd_num_warps or plan.fwd_num_warps, stages=stages or plan.stages)


def _prefix_splits(requested: int, N: int, block_n: int) -> tuple[int, int]:
    """``(parts, keys per part)`` for splitting N keys among about ``requested`` programs, each part a
    whole number of key blocks and none empty (``(1, N)``: no split)."""
    if requested <= 1 or N <= block_n:
        return 1, N
    split_len = triton.cdiv(triton.cdiv(N, requested), block_n) * block_n
    return triton.cdiv(N, split_len), split_len


def _stream_fits(programs: int, grid_w: int, window: int, num_prefix: int, D: int) -> bool:
    """Whether the row-streaming forward takes a call of ``programs`` (slices x segments; see FWD_STREAM)."""
    return (window <= 3 and grid_w <= _STREAM_MAX_WIDTH and D <= _STREAM_MAX_D
            and num_prefix <= _STREAM_MAX_PREFIX and programs >= _STREAM_MIN_PROGRAMS)


def stream_applies(settings: dict, slices: int, grid_h: int, grid_w: int, window: int, num_prefix: int,
                   D: int) -> bool:
    """Whether a forward call with these launch settings (sa2vp_kernels.triton.tuning) runs the
    row-streaming kernel."""
    if not settings.get("fwd_stream", FWD_STREAM):
        return False
    segments = _stream_segments(settings.get("stream_segments") or _STREAM_SEGMENTS, grid_h)[0]
    return _stream_fits(slices * segments, grid_w, window, num_prefix, D)


def _stream_num_warps(dtype: torch.dtype, grid_w: int, D: int) -> int:
    """The streaming forward's default warps: _STREAM_NUM_WARPS for rows of 16-bit values up to 32 x 64,
    twice that for float32 (its exact dots hold their operands in registers) or wider rows, four times
    for both. (Compiled for sm_90, Triton 3.6 and 3.8: 16-bit 14 x 64 rows take 135-145 registers with 4
    warps, no spills; float32 ones 255 with 8 warps and spill 8 bytes.)"""
    wide = max(16, triton.next_power_of_2(grid_w)) * max(16, triton.next_power_of_2(D)) > 32 * 64
    return _STREAM_NUM_WARPS * (2 if dtype.itemsize >= 4 else 1) * (2 if wide else 1)


def _bwd_stream_fits(slices: int, grid_h: int, grid_w: int, window: int, num_prefix: int, D: int) -> bool:
    """Whether the row-streaming backward takes a call of these shapes (see BWD_STREAM; the dtype is checked
    apart)."""
    segments = _stream_segments(_BWD_STREAM_SEGMENTS, grid_h)[0]
    return _stream_fits(slices * segments, grid_w, window, num_prefix, D)


def _stream_segments(requested: int, grid_h: int) -> tuple[int, int]:
    """``(segments, rows per segment)`` for splitting ``grid_h`` rows among about ``requested`` programs,
    none empty."""
    seg_rows = triton.cdiv(grid_h, max(1, min(requested, grid_h)))
    return triton.cdiv(grid_h, seg_rows), seg_rows


def _parts_buffers(n_queries: int, n_parts: int, D: int, block_d: int, acc_dtype: torch.dtype, inline: bool,
                   n_counters: int, device) -> tuple:
    """The prefix queries' parts of a forward split among programs: ``(part_o, part_lse, counters,
    meta)``, with ``counters`` (zeroed; FWD_INLINE_COMBINE) or None, and ``meta`` the combine's block
    sizes (BLOCK_PARTS, PARTS_DC)."""
    part_o = torch.empty((n_queries * n_parts, D), dtype=acc_dtype, device=device)
    part_lse = torch.empty((n_queries * n_parts,), dtype=acc_dtype, device=device)
    counters = torch.zeros((n_counters,), dtype=torch.int32, device=device) if inline else None
    block_t = triton.next_power_of_2(n_parts)
    return part_o, part_lse, counters, dict(BLOCK_PARTS=block_t, PARTS_DC=min(block_d, max(16, 4096 // block_t)))


def _combine_parts(part_o, part_lse, out, lse, N, num_prefix, n_parts, meta):
    """The forward's second launch: each prefix query's output and log-sum-exp from its parts."""
    B, H = out.shape[:2]
    _launch(_combine_parts_kernel, (B * H * num_prefix,), part_o, part_lse, out, lse, N, num_prefix, n_parts,
            WEIGHTED=True, D=out.shape[-1], BLOCK_T=meta["BLOCK_PARTS"], BLOCK_DC=meta["PARTS_DC"], num_warps=2)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, grid_h, grid_w, window, num_prefix):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape (B, heads, N, head_dim), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must share q's dtype and device, got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in the last dim, got strides {t.stride()}")
    if grid_h < 1 or grid_w < 1 or window < 1 or window % 2 == 0 or num_prefix < 0:
        raise ValueError(f"need grid >= 1 x 1, odd window >= 1, num_prefix >= 0; got grid "
                         f"{grid_h} x {grid_w}, window {window}, num_prefix {num_prefix}")
    if q.shape[2] != num_prefix + grid_h * grid_w:
        raise ValueError(f"q has {q.shape[2]} tokens but num_prefix + grid_h * grid_w = "
                         f"{num_prefix + grid_h * grid_w}")


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _launch(kernel, grid, *args, **meta):
    """Launch through ``wrap_triton`` (so torch.compile sees the kernel). Under TRITON_INTERPRET the
    kernels are plain Python that needs real data: a fake-tensor run (tracing, opcheck) only wants
    the outputs' metadata, which the launcher has already allocated."""
    if _INTERPRETED and any(isinstance(a, torch.Tensor) and (is_fake(a) or a.is_meta) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def local_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_h: int, grid_w: int,
                          window: int, num_prefix: int, zero_border: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out, lse)``, out contiguous in q's dtype, lse float32 (float64 for float64)."""
    _check_inputs(q, k, v, grid_h, grid_w, window, num_prefix)
    B, H, N, D = q.shape
    D = int(D)  # a kernel constant (block sizes and chunk loops are specialised on it)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=_acc_dtype(q.dtype), device=q.device)
    rad = window // 2
    ry, rx = min(rad, grid_h - 1), min(rad, grid_w - 1)
    n_prefix_programs = B * H * num_prefix
    cfg = _fwd_config(D, q.dtype)
    tuned = tuning.attention_settings(q.device, q.dtype, D)
    inline = bool(tuned.get("fwd_inline_combine", FWD_INLINE_COMBINE))
    if stream_applies(tuned, B * H, grid_h, grid_w, window, num_prefix, D):
        segments, seg_rows = _stream_segments(tuned.get("stream_segments") or _STREAM_SEGMENTS, grid_h)
        split = num_prefix > 0 and segments > 1
        part_o = part_lse = counters = lse  # (not used without a split)
        meta = dict(BLOCK_PARTS=1, PARTS_DC=16)
        if split:
            part_o, part_lse, counters, meta = _parts_buffers(B * H * num_prefix, segments, D, cfg.block_d, lse.dtype,
                                                              inline, B * H, q.device)
        _launch(
            _local_attn_fwd_stream_kernel, (B * H * segments,), q, k, v, out, lse, part_o, part_lse,
            lse if counters is None else counters,
            *_strides(q, k, v), H, N, num_prefix, grid_h, grid_w, rad, seg_rows, *split_float(scale),
            ZERO_BORDER=bool(zero_border), FP64=q.dtype == torch.float64, IEEE=q.dtype == torch.float32,
            HAS_PREFIX=num_prefix > 0, SEGMENTS=segments, RELOAD=bool(tuned.get("stream_reload", STREAM_RELOAD)),
            PREFETCH=bool(tuned.get("stream_prefetch", STREAM_PREFETCH)), INLINE_COMBINE=split and inline,
            BLOCK_T=max(16, triton.next_power_of_2(num_prefix)),
            BLOCK_W=max(16, triton.next_power_of_2(grid_w)), D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            STAGES=tuned.get("stream_stages") or _STREAM_STAGES,
            num_warps=tuned.get("stream_num_warps") or _stream_num_warps(q.dtype, grid_w, D), **meta,
        )
        if split and not inline:
            _combine_parts(part_o, part_lse, out, lse, N, num_prefix, segments, meta)
        return out, lse
    plan = None
    if tuned.get("fwd_fused_prefix", FWD_FUSED_PREFIX) and 1 <= num_prefix <= _FUSED_PREFIX_MAX:
        plan = _fwd_tile_plan(tuned, grid_h, grid_w, ry, rx, num_prefix, D, q.dtype, num_prefix)
    fused = plan is not None
    if not fused:
        plan = _fwd_tile_plan(tuned, grid_h, grid_w, ry, rx, 0, D, q.dtype)
    args = (q, k, v, out, lse)
    strides = (*_strides(q, k, v), H, N, num_prefix, grid_h, grid_w, rad, ry, rx)
    common = dict(ZERO_BORDER=bool(zero_border), FP64=q.dtype == torch.float64, BLOCK_N=cfg.block_n,
                  D=D, BLOCK_D=cfg.block_d)
    if plan is not None:
        tiles = plan.tiles(grid_h)
        splits, split_len = 1, N
        if fused:
            parts = tiles
            n_prefix_programs = 0
        elif num_prefix:
            splits, split_len = _prefix_splits(tuned.get("fwd_prefix_splits", FWD_PREFIX_SPLITS), N, cfg.block_n)
            parts = splits
            n_prefix_programs *= splits
        split = fused or splits > 1
        part_o = part_lse = counters = lse  # (not used without a split)
        meta = dict(BLOCK_PARTS=1, PARTS_DC=16)
        if split:
            # (counters: one per slice for the fused tiles, which combine all of a slice's prefix queries
            # at once; one per prefix query for the split prefix programs)
            part_o, part_lse, counters, meta = _parts_buffers(B * H * num_prefix, parts, D, cfg.block_d, lse.dtype,
                                                              inline, B * H * (1 if fused else num_prefix), q.device)
        _launch(
            _local_attn_fwd_tiled_kernel, (n_prefix_programs + B * H * tiles,), *args, part_o, part_lse,
            lse if counters is None else counters, *strides, plan.rows, plan.cols, plan.x_tiles, plan.halo_x, plan.halo_cols, n_prefix_programs,
            split_len, *split_float(scale), **common, IEEE=q.dtype == torch.float32, FUSE_PREFIX=fused,
            EARLY_V=tuned.get("fwd_early_v", FWD_EARLY_V) and D <= plan.block_dc, PREFIX_SPLITS=splits,
            INLINE_COMBINE=split and inline,
            BLOCK_Q=plan.block, BLOCK_K=plan.block_halo, BLOCK_DC=plan.block_dc, STAGES=plan.stages,
            PREFIX_STAGES=_PREFIX_STAGES, num_warps=plan.fwd_num_warps, **meta,
        )
        if split and not inline:
            _combine_parts(part_o, part_lse, out, lse, N, num_prefix, parts, meta)
    else:
        args = (*args, *strides)
        bhg = B * H * grid_h * grid_w
        _launch(
            _local_attn_fwd_kernel, (n_prefix_programs + triton.cdiv(bhg, cfg.block_q),), *args,
            n_prefix_programs, bhg, *split_float(scale), **common, BLOCK_Q=cfg.block_q,
            STAGES=cfg.stages, num_warps=cfg.num_warps,
        )
    return out, lse


def local_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, grid_h: int, grid_w: int, window: int,
                          num_prefix: int, zero_border: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(grad_q, grad_k, grad_v)``, contiguous in q's dtype; deterministic (no atomics).

    ``zero_border`` needs no special case here: the zero neighbours are in ``lse`` already and
    their keys and values (zeros) receive no gradient.
    """
    _check_inputs(q, k, v, grid_h, grid_w, window, num_prefix)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"grad_out and out must have q's shape {tuple(q.shape)} and lse "
                         f"{tuple(q.shape[:3])}; got {tuple(grad_out.shape)}, {tuple(out.shape)}, "
                         f"{tuple(lse.shape)}")
    B, H, N, D = q.shape
    D = int(D)  # a kernel constant (block sizes and chunk loops are specialised on it)
    acc_dtype = _acc_dtype(q.dtype)
    grad_out = grad_out.to(q.dtype)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out.to(q.dtype)
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.to(acc_dtype).contiguous()
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty((B, H, N), dtype=acc_dtype, device=q.device)
    rad = window // 2
    ry, rx = min(rad, grid_h - 1), min(rad, grid_w - 1)
    bhg = B * H * grid_h * grid_w
    bht = B * H * num_prefix
    cfg = _bwd_config(D, q.dtype)
    fp64 = q.dtype == torch.float64
    ieee = q.dtype == torch.float32
    shape_args = (H, N, num_prefix, grid_h, grid_w, ry, rx)

    tuned = tuning.attention_settings(q.device, q.dtype, D)
    if (tuned.get("bwd_stream", BWD_STREAM) and (q.dtype.itemsize == 2 or _INTERPRETED)
            and _bwd_stream_fits(B * H, grid_h, grid_w, window, num_prefix, D)):
        segments, seg_rows = _stream_segments(_BWD_STREAM_SEGMENTS, grid_h)
        split = num_prefix > 0 and segments > 1
        part_dq = torch.empty((bht * segments, D), dtype=acc_dtype, device=q.device) if split else delta
        _launch(
            _local_attn_bwd_stream_kernel, (B * H * segments,), q, k, v, grad_out, out, lse, dq, dk, dv, part_dq,
            *_strides(q, k, v, grad_out, out), H, N, num_prefix, grid_h, grid_w, rad, seg_rows,
            *split_float(scale), FP64=fp64, IEEE=ieee, HAS_PREFIX=num_prefix > 0, SEGMENTS=segments,
            BLOCK_T=max(16, triton.next_power_of_2(num_prefix)), BLOCK_W=max(16, triton.next_power_of_2(grid_w)),
            D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            num_warps=_BWD_STREAM_NUM_WARPS or _stream_num_warps(q.dtype, grid_w, D),
        )
        if split:
            block_t = triton.next_power_of_2(segments)
            _launch(_combine_parts_kernel, (bht,), part_dq, part_dq, dq, lse, N, num_prefix, segments,
                    WEIGHTED=False, D=D, BLOCK_T=block_t, BLOCK_DC=min(cfg.block_d, max(16, 4096 // block_t)),
                    num_warps=2)
        return dq, dk, dv

    plan = None
    if tuned.get("bwd_fused_prefix", BWD_FUSED_PREFIX) and 1 <= num_prefix <= _FUSED_PREFIX_MAX:
        plan = _tile_plan(grid_h, grid_w, ry, rx, num_prefix, D, q.dtype, num_prefix)
    fused = plan is not None
    if not fused:
        plan = _tile_plan(grid_h, grid_w, ry, rx, 0, D, q.dtype)
    args = (q, k, v, grad_out, out, lse, delta, dq)
    strides = (*_strides(q, k, v, grad_out, out), *shape_args)
    common = dict(FP64=fp64, BLOCK_N=cfg.block_n, D=D, BLOCK_D=cfg.block_d)
    if plan is not None:
        tiles = plan.tiles(grid_h)
        part_dq = torch.empty((bht * tiles, D), dtype=acc_dtype, device=q.device) if fused else delta
        _launch(
            _local_attn_bwd_dq_tiled_kernel, ((0 if fused else bht) + B * H * tiles,), *args, part_dq, *strides,
            plan.rows, plan.cols, plan.x_tiles, plan.halo_x, plan.halo_cols, 0 if fused else bht,
            *split_float(scale), **common, IEEE=ieee, FUSE_PREFIX=fused, BLOCK_Q=plan.block,
            BLOCK_K=plan.block_halo, BLOCK_DC=plan.block_dc, STAGES=plan.stages, PREFIX_STAGES=_PREFIX_STAGES,
            num_warps=plan.num_warps,
        )
        if fused:
            block_t = triton.next_power_of_2(tiles)
            _launch(_combine_parts_kernel, (bht,), part_dq, part_dq, dq, lse, N, num_prefix, tiles, WEIGHTED=False,
                    D=D, BLOCK_T=block_t, BLOCK_DC=min(cfg.block_d, max(16, 4096 // block_t)), num_warps=2)
    else:
        args = (*args, *strides)
        _launch(
            _local_attn_bwd_dq_kernel, (bht + triton.cdiv(bhg, cfg.block_q),), *args,
            bht, bhg, *split_float(scale), **common, BLOCK_Q=cfg.block_q, STAGES=cfg.stages,
            num_warps=cfg.num_warps,
        )

    # Prefix keys: programs of cfg.block_q keys flattened over (batch, heads, prefix).
    n_prefix_programs = triton.cdiv(bht, cfg.block_q)
    plan = _tile_plan(grid_h, grid_w, ry, rx, num_prefix, D, q.dtype)
    args = (q, k, v, grad_out, lse, delta, dk, dv, *_strides(q, k, v, grad_out), *shape_args)
    common = dict(FP64=fp64, D=D, BLOCK_D=cfg.block_d)
    if plan is not None:
        _launch(
            _local_attn_bwd_dkdv_tiled_kernel, (n_prefix_programs + B * H * plan.tiles(grid_h),),
            *args, plan.rows, plan.cols, plan.x_tiles, plan.halo_x, plan.halo_cols,
            n_prefix_programs, bht, *split_float(scale), **common, IEEE=ieee, BLOCK_K=plan.block,
            BLOCK_Q=plan.block_halo, PREFIX_ROWS=cfg.block_q, BLOCK_DC=plan.block_dc,
            STAGES=plan.stages, num_warps=plan.num_warps,
        )
    else:
        _launch(
            _local_attn_bwd_dkdv_kernel, (n_prefix_programs + triton.cdiv(bhg, cfg.block_q),), *args,
            n_prefix_programs, bht, bhg, *split_float(scale), **common, BLOCK_Q=cfg.block_q,
            STAGES=cfg.stages, num_warps=cfg.num_warps,
        )
    return dq, dk, dv


# The registered ops (what torch.compile, export and opcheck see); eager calls from the public API run
# the launchers above directly (sa2vp_kernels._dispatch.eager_triton).
local_attn_fwd_triton = triton_op("sa2vp_kernels::local_attn_fwd_triton", mutates_args=())(local_attn_fwd)
local_attn_bwd_triton = triton_op("sa2vp_kernels::local_attn_bwd_triton", mutates_args=())(local_attn_bwd)


if _INTERPRETED:
    # Interpreted kernels are Python running on real data, so torch.compile cannot trace into the
    # launchers (it would record the allocations but not the kernels). Keep the ops opaque to it,
    # as torch.export does; their fake implementations still come from the launchers.
    def _opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (local_attn_fwd_triton, local_attn_bwd_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
