"""Triton kernels of the spatially aligned local cross attention, forward and backward.

Layout: ``q, k, v`` are ``(B, heads, N, D)`` with ``N = T + gh * gw`` (``T`` prefix tokens, then the
grid in row-major order), any strides for the first three dims and unit stride for the last.

* Forward, one launch. The first ``B * heads * T`` programs each compute one prefix query against all
  ``N`` keys (online softmax over blocks of keys); they are long, so they start first and overlap with
  the rest. Every other program takes a tile of ``BLOCK_Q`` consecutive grid queries of one
  ``(batch, head)`` and walks the window offsets: at each offset the tile's neighbours are one shifted
  run of rows, so the loads stay coalesced and neighbouring queries reuse keys through L1/L2. Each
  query has its own keys, so the scores are elementwise products reduced over ``D``, not matrix
  products; ``D`` is covered by one power-of-two block and ``BLOCK_Q`` shrinks as ``D`` grows.
* Backward, two launches, no atomics. The first is query-centric: ``delta = rowsum(dO * O)`` and
  ``dq`` for every query (prefix programs first again). The second is key-centric: a grid key
  gathers from the grid queries in the window around it plus every prefix query, a prefix key from
  the prefix queries only; each key's sums run in a fixed order, so the result is bitwise
  reproducible.

Borders: out-of-grid neighbours are skipped. With ``zero_border`` they still count as score 0 with
value 0; their number per query is known in closed form, so the softmax starts from them instead of
visiting them. Only in-grid offsets are visited (``|dy| <= min(r, gh - 1)``, same for x), so a window
larger than the grid costs nothing extra.

Accumulation is float32 (float64 for float64 inputs). ``scale`` arrives as a float32 pair
``hi + lo`` so that float64 runs see it to double precision.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

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
# Forward
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_prefix_query(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bh, i,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, H, N, sc,
                      BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    """Prefix query ``i`` of slice ``bh`` against all N keys, online softmax over key blocks."""
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
    for start in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        n = start + offs_n
        valid = n < N
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
    row = bh.to(tl.int64) * N + i
    tl.store(out_ptr + row * D + offs_d, (acc / l).to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + row, m + tl.log(l))


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
# Backward, launch 1: delta and dq (query-centric)
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
# Backward, launch 2: dk and dv (key-centric)
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
# Host side: block sizes and launchers
# ---------------------------------------------------------------------------------------------------

_INTERPRETED = not isinstance(_local_attn_fwd_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True)
class _Config:
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


def _heuristic(D: int, dtype: torch.dtype, budget: int, min_block_q: int) -> _Config:
    block_d = triton.next_power_of_2(D)
    if dtype == torch.float64:
        budget //= 2
    block_q = max(min_block_q, min(64, budget // block_d))
    block_n = max(1, min(128, 4 * budget // block_d))
    tile = block_q * block_d * (2 if dtype == torch.float64 else 1)
    num_warps = 2 if tile <= 512 else 4 if tile <= 4096 else 8 if tile <= 16384 else 16
    return _Config(block_q, block_n, block_d, num_warps, stages=1)


def _split_scale(scale: float) -> tuple[float, float]:
    """``scale`` as float32 ``hi + lo`` (kernels take float32 scalars; float64 runs add both)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


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


@triton_op("sa2vp_kernels::local_attn_fwd_triton", mutates_args=())
def local_attn_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_h: int, grid_w: int,
                          window: int, num_prefix: int, zero_border: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out, lse)``, out contiguous in q's dtype, lse float32 (float64 for float64)."""
    _check_inputs(q, k, v, grid_h, grid_w, window, num_prefix)
    B, H, N, D = q.shape
    cfg = _fwd_config(D, q.dtype)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=_acc_dtype(q.dtype), device=q.device)
    rad = window // 2
    n_prefix_programs = B * H * num_prefix
    bhg = B * H * grid_h * grid_w
    scale_hi, scale_lo = _split_scale(scale)
    grid = (n_prefix_programs + triton.cdiv(bhg, cfg.block_q),)
    _launch(
        _local_attn_fwd_kernel, grid, q, k, v, out, lse, *_strides(q, k, v),
        H, N, num_prefix, grid_h, grid_w, rad, min(rad, grid_h - 1), min(rad, grid_w - 1),
        n_prefix_programs, bhg, scale_hi, scale_lo,
        ZERO_BORDER=bool(zero_border), FP64=q.dtype == torch.float64, BLOCK_Q=cfg.block_q,
        BLOCK_N=cfg.block_n, D=D, BLOCK_D=cfg.block_d, STAGES=cfg.stages, num_warps=cfg.num_warps,
    )
    return out, lse


@triton_op("sa2vp_kernels::local_attn_bwd_triton", mutates_args=())
def local_attn_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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
    cfg = _bwd_config(D, q.dtype)
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
    scale_hi, scale_lo = _split_scale(scale)
    fp64 = q.dtype == torch.float64
    n_tiles = triton.cdiv(bhg, cfg.block_q)
    _launch(
        _local_attn_bwd_dq_kernel, (bht + n_tiles,), q, k, v, grad_out, out, lse, delta, dq,
        *_strides(q, k, v, grad_out, out),
        H, N, num_prefix, grid_h, grid_w, ry, rx, bht, bhg, scale_hi, scale_lo,
        FP64=fp64, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, D=D, BLOCK_D=cfg.block_d,
        STAGES=cfg.stages, num_warps=cfg.num_warps,
    )
    n_prefix_programs = triton.cdiv(bht, cfg.block_q)
    _launch(
        _local_attn_bwd_dkdv_kernel, (n_prefix_programs + n_tiles,), q, k, v, grad_out, lse, delta, dk, dv,
        *_strides(q, k, v, grad_out),
        H, N, num_prefix, grid_h, grid_w, ry, rx, n_prefix_programs, bht, bhg, scale_hi, scale_lo,
        FP64=fp64, BLOCK_Q=cfg.block_q, D=D, BLOCK_D=cfg.block_d, STAGES=cfg.stages,
        num_warps=cfg.num_warps,
    )
    return dq, dk, dv


if _INTERPRETED:
    # Interpreted kernels are Python running on real data, so torch.compile cannot trace into the
    # launchers (it would record the allocations but not the kernels). Keep the ops opaque to it,
    # as torch.export does; their fake implementations still come from the launchers.
    def _opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (local_attn_fwd_triton, local_attn_bwd_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
