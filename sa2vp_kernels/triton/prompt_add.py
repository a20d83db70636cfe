"""Triton kernels of ``prompt_add`` (ops ``sa2vp_kernels::prompt_add_fwd_triton`` / ``_bwd_triton``).

    out = target + scale * drop(up(drop(gelu(down(layer_norm(message)))))) [+ deep_scale * deep]

Forward, one program per tile of ``BLOCK_M`` tokens holding whole rows of ``C`` channels: LayerNorm
statistics in fp32, ``z = y @ down_weight^T`` and ``u = h @ up_weight^T`` as two small ``tl.dot`` with
the rank padded to ``BLOCK_R >= 16``, the dropout masks from the shared counter-based hash, the
residual and deep terms, one store.  It saves mean, rstd and ``z`` (tokens x r, fp32).

Backward, three kernels:

* ``_bwd_rows_kernel`` (token tiles): ``gu = scale * drop'(grad_out)``, ``gz = drop'(gu @ up_weight) *
  gelu'(z)``, ``gy = gz @ down_weight`` and the LayerNorm backward into ``grad_message``; stores ``gz``.
* ``_bwd_cols_kernel`` (channel tiles x token splits): the weight gradients as sums over tokens,
  ``gu^T @ h``, ``sum gu``, ``A = gz^T @ xhat`` and ``sum gz``, one partial per split.
* ``_bwd_finalize_kernel`` (channel tiles): the partials added in split order (deterministic, no
  atomics), then ``grad_down_weight = A * norm_weight + sum(gz) (x) norm_bias``, ``grad_norm_weight =
  sum_j down_weight * A``, ``grad_norm_bias = sum(gz) @ down_weight`` (``BWD_FINALIZE_KERNEL`` off:
  PyTorch ops on the host do this).

Rows too wide for one tile's shared memory (float32 beyond 1024 channels, 16-bit beyond 2048, float64
beyond 512, at r <= 16), and 16-bit rows wider than 256 channels, run ``_fwd_wide_kernel`` /
``_bwd_rows_wide_kernel``: the same steps over chunks of channels. The forward reads the message once
for the LayerNorm statistics and ``z`` (shifted sums, ``_stats_z_one_pass``; three passes with
``FWD_ONE_PASS`` off); the backward rows read it once more for ``grad_message``, its LayerNorm sums
coming from ``z`` (``BWD_FROM_Z``; a pass over the message with it off).

Matrix products take the inputs' dtype (bf16/fp16 on tensor cores like PyTorch's own linear layers,
fp32 in full IEEE precision, fp64 under the interpreter) and accumulate in fp32 (fp64 for fp64).
The long sums of the chunked kernels (over chunks of channels: LayerNorm statistics, ``z``, ``gh``,
``c1``, ``c2``) and of ``_bwd_cols_kernel`` (over token tiles) add their per-step partials in fp64
for fp32 inputs (``ACC64``): one fp32 chain over every step (a GPU dot with a running accumulator is
one FMA chain over all of its K) was about ten times less accurate than PyTorch at C = 4096 on an
H200. 16-bit inputs keep fp32 there (their rounding dominates; the chunked kernels are their fast path).
Block sizes come from a small deterministic heuristic, no autotuning.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import tuning
from ._scalars import join_float, split_float

from ..reference.prompt_add import HIDDEN_STREAM, OUTPUT_STREAM, drop_threshold, stream_key

_GOLDEN = 0x9E3779B9


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x = x * 0x85EBCA6B
    x ^= x >> 13
    x = x * 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _keep(rows, cols, key, threshold):
    """Keep mask of the (rows x cols) tile of one dropout stream (see reference/prompt_add.py)."""
    # key and threshold may arrive as Python ints: torch's mutation analysis of a wrap_triton kernel
    # (torch 2.11, Triton 3.6) binds them as constants, and a failed analysis marks every input as
    # mutated, which broke opcheck's test_aot_dispatch_static with dropout.
    zero = tl.zeros([], tl.int32)
    state = _fmix32(_fmix32(rows.to(tl.uint32)) ^ (zero + key).to(tl.uint32, bitcast=True))
    u = _fmix32(state[:, None] ^ (cols.to(tl.uint32) * 0x9E3779B9)[None, :])
    return (u >> 1) >= (zero + threshold).to(tl.uint32)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


# ---- pieces shared by the whole-row and the chunked (wide) token-tile kernels -----------------------


@triton.jit
def _to_sum(x, ACC64: tl.constexpr):
    """A partial sum in the dtype the steps of a long sum are added in: fp64 under ``ACC64``, else
    unchanged (an fp32 partial converted before the add, so that the compiler cannot fold the steps of
    ``acc += tl.dot(...)`` into one FMA chain)."""
    if ACC64:
        return x.to(tl.float64)
    else:
        return x


@triton.jit
def _token_rows(M, N, BLOCK_M: tl.constexpr):
    """The BLOCK_M tokens of this program: flat index, validity, int64 index, batch and position."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    return rows, rows < M, rows64, rows64 // N, rows64 % N


@triton.jit
def _hidden(z, rows, rows64, row_ok, rr, r_ok, z_ptr, db_ptr, R, inv_keep, threshold, key_h,
            DROPOUT: tl.constexpr):
    """z += down_bias (stored for the backward), then h = drop(gelu(z)) in the products' dtype."""
    z += tl.load(db_ptr + rr, mask=r_ok, other=0.0).to(z.dtype)[None, :]
    tl.store(z_ptr + rows64[:, None] * R + rr[None, :], z, mask=row_ok[:, None] & r_ok[None, :])
    h = _gelu(z)
    if DROPOUT:
        h = tl.where(_keep(rows, rr, key_h, threshold), h * inv_keep, 0.0)
    return h


@triton.jit
def _store_out(u, rows, rows64, n, cols, col_ok, tile_ok, t_rows, target_ptr, out_ptr, ub_ptr, deep_ptr, ds_ptr,
               C, scale, inv_keep, threshold, key_o, HAS_DEEP: tl.constexpr, DROPOUT: tl.constexpr):
    """out = target + scale * drop(u + up_bias) [+ deep_scale * deep] for the columns cols."""
    u += tl.load(ub_ptr + cols, mask=col_ok, other=0.0).to(u.dtype)[None, :]
    if DROPOUT:
        u = tl.where(_keep(rows, cols, key_o, threshold), u * inv_keep, 0.0)
    t = tl.load(target_ptr + t_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
    out = t.to(u.dtype) + scale * u
    if HAS_DEEP:
        d = tl.load(deep_ptr + n[:, None] * C + cols[None, :], mask=tile_ok, other=0.0).to(u.dtype)
        ds = tl.load(ds_ptr + cols, mask=col_ok, other=0.0).to(u.dtype)
        out += ds[None, :] * d
    tl.store(out_ptr + rows64[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grad_up(grad_ptr, g_rows, rows, cols, tile_ok, acc_ty, scale, inv_keep, threshold, key_o,
             DROPOUT: tl.constexpr):
    """gu = scale * drop'(grad_out) for the columns cols."""
    go = tl.load(grad_ptr + g_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
    gu = go.to(acc_ty) * scale
    if DROPOUT:
        gu = tl.where(_keep(rows, cols, key_o, threshold), gu * inv_keep, 0.0)
    return gu


@triton.jit
def _grad_hidden(gh, rows, rows64, rr, low_ok, z_ptr, gz_ptr, R, inv_keep, threshold, key_h,
                 DROPOUT: tl.constexpr):
    """gz = drop'(gh) * gelu'(z), stored for the weight-gradient kernel."""
    if DROPOUT:
        gh = tl.where(_keep(rows, rr, key_h, threshold), gh * inv_keep, 0.0)
    z = tl.load(z_ptr + rows64[:, None] * R + rr[None, :], mask=low_ok, other=0.0)
    gz = tl.where(low_ok, gh * _gelu_grad(z), 0.0)
    tl.store(gz_ptr + rows64[:, None] * R + rr[None, :], gz, mask=low_ok)
    return gz


@triton.jit
def _grad_ln_terms(gz, cols, col_ok, tile_ok, x_rows, rr, r_ok, message_ptr, nw_ptr, dw_ptr, mean, rstd, C):
    """gy * gamma (gy = gz @ down_weight; down_weight (R, C): tile element (j, c) at j * C + c) and xhat
    for the columns cols."""
    acc_ty = mean.dtype
    wd = tl.load(dw_ptr + rr[:, None] * C + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    gyg = tl.dot(gz.to(message_ptr.dtype.element_ty), wd, input_precision="ieee", out_dtype=acc_ty) * gamma[None, :]
    x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
    xhat = tl.where(tile_ok, (x.to(acc_ty) - mean[:, None]) * rstd[:, None], 0.0)
    return gyg, xhat


# ---- whole rows -----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "key_h", "key_o"])
def _fwd_kernel(target_ptr, message_ptr, out_ptr, mean_ptr, rstd_ptr, z_ptr, nw_ptr, nb_ptr, dw_ptr, db_ptr, uw_ptr,
                ub_ptr, deep_ptr, ds_ptr, M, N, C, R, stride_tb, stride_tn, stride_mb, stride_mn, scale_hi, scale_lo,
                eps_hi, eps_lo, inv_keep_hi, inv_keep_lo, threshold, key_h, key_o, HAS_DEEP: tl.constexpr,
                DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    acc_ty = z_ptr.dtype.element_ty
    # float arguments arrive as float32 pairs (_scalars.py)
    scale = join_float(scale_hi, scale_lo, acc_ty)
    eps = join_float(eps_hi, eps_lo, acc_ty)
    inv_keep = join_float(inv_keep_hi, inv_keep_lo, acc_ty)
    dot_ty = message_ptr.dtype.element_ty
    rows, row_ok, rows64, b, n = _token_rows(M, N, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    tile_ok = row_ok[:, None] & col_ok[None, :]

    # LayerNorm (statistics in fp32, fp64 for fp64 inputs).
    x = tl.load(message_ptr + (b * stride_mb + n * stride_mn)[:, None] + cols[None, :], mask=tile_ok, other=0.0)
    x = x.to(acc_ty)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(tile_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    tl.store(mean_ptr + rows64, mean, mask=row_ok)
    tl.store(rstd_ptr + rows64, rstd, mask=row_ok)
    gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    beta = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]

    # z = y @ down_weight^T + down_bias   (down_weight (R, C): tile element (c, j) at j * C + c)
    wd_t = tl.load(dw_ptr + rr[None, :] * C + cols[:, None], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
    z = tl.dot(y.to(dot_ty), wd_t, input_precision="ieee", out_dtype=acc_ty)
    h = _hidden(z, rows, rows64, row_ok, rr, r_ok, z_ptr, db_ptr, R, inv_keep, threshold, key_h, DROPOUT)

    # u = h @ up_weight^T + up_bias   (up_weight (C, R): tile element (j, c) at c * R + j)
    wu_t = tl.load(uw_ptr + cols[None, :] * R + rr[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    u = tl.dot(h.to(dot_ty), wu_t, input_precision="ieee", out_dtype=acc_ty)
    _store_out(u, rows, rows64, n, cols, col_ok, tile_ok, b * stride_tb + n * stride_tn, target_ptr, out_ptr, ub_ptr,
               deep_ptr, ds_ptr, C, scale, inv_keep, threshold, key_o, HAS_DEEP, DROPOUT)


@triton.jit(do_not_specialize=["threshold", "key_h", "key_o"])
def _bwd_rows_kernel(grad_ptr, message_ptr, mean_ptr, rstd_ptr, z_ptr, nw_ptr, dw_ptr, uw_ptr, dx_ptr, gz_ptr, M, N,
                     C, R, stride_gb, stride_gn, stride_mb, stride_mn, scale_hi, scale_lo, inv_keep_hi, inv_keep_lo,
                     threshold, key_h, key_o, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    acc_ty = z_ptr.dtype.element_ty
    # float arguments arrive as float32 pairs (_scalars.py)
    scale = join_float(scale_hi, scale_lo, acc_ty)
    inv_keep = join_float(inv_keep_hi, inv_keep_lo, acc_ty)
    dot_ty = message_ptr.dtype.element_ty
    rows, row_ok, rows64, b, n = _token_rows(M, N, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    tile_ok = row_ok[:, None] & col_ok[None, :]

    gu = _grad_up(grad_ptr, b * stride_gb + n * stride_gn, rows, cols, tile_ok, acc_ty, scale, inv_keep, threshold,
                  key_o, DROPOUT)
    # gh = gu @ up_weight   (up_weight (C, R): tile element (c, j) at c * R + j)
    wu = tl.load(uw_ptr + cols[:, None] * R + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
    gh = tl.dot(gu.to(dot_ty), wu, input_precision="ieee", out_dtype=acc_ty)
    gz = _grad_hidden(gh, rows, rows64, rr, row_ok[:, None] & r_ok[None, :], z_ptr, gz_ptr, R, inv_keep, threshold,
                      key_h, DROPOUT)
    mean = tl.load(mean_ptr + rows64, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)
    gyg, xhat = _grad_ln_terms(gz, cols, col_ok, tile_ok, b * stride_mb + n * stride_mn, rr, r_ok, message_ptr,
                               nw_ptr, dw_ptr, mean, rstd, C)
    c1 = tl.sum(gyg, axis=1) / C
    c2 = tl.sum(gyg * xhat, axis=1) / C
    dx = rstd[:, None] * (gyg - c1[:, None] - xhat * c2[:, None])
    tl.store(dx_ptr + rows64[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)


# ---- rows in chunks of BLOCK_C channels -----------------------------------------------------------


@triton.jit
def _weight_sums(nw_ptr, nb_ptr, dw_ptr, rr, r_ok, C, acc_ty, ACC64: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """(down_weight @ norm_weight, down_weight @ norm_bias), R-vectors, in a loop of their own (inside
    a loop over the message their tiles cost registers: 168 instead of 128 per thread for the forward
    at C = 768, r = 16, bf16, sm_90)."""
    g = _to_sum(tl.zeros([BLOCK_R], acc_ty), ACC64)
    bw = _to_sum(tl.zeros([BLOCK_R], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        beta = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        w = tl.load(dw_ptr + rr[:, None] * C + cols[None, :], mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0).to(acc_ty)
        g += _to_sum(tl.sum(w * gamma[None, :], axis=1), ACC64)
        bw += _to_sum(tl.sum(w * beta[None, :], axis=1), ACC64)
    return g, bw


@triton.jit
def _stats_z_three_pass(message_ptr, x_rows, row_ok, rr, r_ok, nw_ptr, nb_ptr, dw_ptr, C, eps, acc_ty, dot_ty,
                        ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """(mean, rstd, z - down_bias) of a token tile in three passes over the message: mean, variance,
    then ``y = layer_norm(x)`` and ``z = y @ down_weight^T`` chunk by chunk."""
    total = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tile_ok = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(acc_ty)
        total += _to_sum(tl.sum(x, axis=1), ACC64)
    mean = (total / C).to(acc_ty)
    total = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tile_ok = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(acc_ty)
        xc = tl.where(tile_ok, x - mean[:, None], 0.0)
        total += _to_sum(tl.sum(xc * xc, axis=1), ACC64)
    rstd = 1.0 / tl.sqrt((total / C).to(acc_ty) + eps)

    z = _to_sum(tl.zeros([BLOCK_M, BLOCK_R], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(acc_ty)
        gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        beta = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        y = tl.where(tile_ok, x - mean[:, None], 0.0) * rstd[:, None] * gamma[None, :] + beta[None, :]
        wd_t = tl.load(dw_ptr + rr[None, :] * C + cols[:, None], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        z += _to_sum(tl.dot(y.to(dot_ty), wd_t, input_precision="ieee", out_dtype=acc_ty), ACC64)
    return mean, rstd, z.to(acc_ty)


@triton.jit
def _stats_z_one_pass(message_ptr, x_rows, row_ok, rr, r_ok, nw_ptr, nb_ptr, dw_ptr, C, eps, acc_ty, dot_ty,
                      ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """(mean, rstd, z - down_bias) of a token tile in one pass over the message.

    With ``s`` a per-row shift (the mean of the first chunk, close to the row's mean), ``xs = x - s``,
    ``d = mean(xs)`` and ``g = down_weight @ gamma``, ``b = down_weight @ beta``:

        var = mean(xs^2) - d^2,    z = rstd * ((xs * gamma) @ down_weight^T - d * g) + b

    since ``y = (xs - d) * rstd * gamma + beta``. The shift keeps ``d`` small, so neither difference
    cancels. The products take ``xs * gamma`` in the products' dtype (as the three passes take ``y``).
    """
    cols = tl.arange(0, BLOCK_C)
    tile_ok = row_ok[:, None] & (cols < C)[None, :]
    x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(acc_ty)
    shift = tl.sum(x, axis=1) / tl.minimum(C, BLOCK_C)
    s1 = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
    s2 = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
    p = _to_sum(tl.zeros([BLOCK_M, BLOCK_R], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(message_ptr + x_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(acc_ty)
        xs = tl.where(tile_ok, x - shift[:, None], 0.0)
        s1 += _to_sum(tl.sum(xs, axis=1), ACC64)
        s2 += _to_sum(tl.sum(xs * xs, axis=1), ACC64)
        gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
        wd_t = tl.load(dw_ptr + rr[None, :] * C + cols[:, None], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        p += _to_sum(tl.dot((xs * gamma[None, :]).to(dot_ty), wd_t, input_precision="ieee", out_dtype=acc_ty),
                     ACC64)
    g, bw = _weight_sums(nw_ptr, nb_ptr, dw_ptr, rr, r_ok, C, acc_ty, ACC64, BLOCK_C, BLOCK_R)
    d = s1 / C
    var = tl.maximum(s2 / C - d * d, 0.0)
    mean = (shift + d).to(acc_ty)
    rstd = 1.0 / tl.sqrt(var.to(acc_ty) + eps)
    z = rstd.to(p.dtype)[:, None] * (p - d[:, None] * g[None, :]) + bw[None, :]
    return mean, rstd, z.to(acc_ty)


@triton.jit(do_not_specialize=["threshold", "key_h", "key_o"])
def _fwd_wide_kernel(target_ptr, message_ptr, out_ptr, mean_ptr, rstd_ptr, z_ptr, nw_ptr, nb_ptr, dw_ptr, db_ptr,
                     uw_ptr, ub_ptr, deep_ptr, ds_ptr, M, N, C, R, stride_tb, stride_tn, stride_mb, stride_mn,
                     scale_hi, scale_lo, eps_hi, eps_lo, inv_keep_hi, inv_keep_lo, threshold, key_h, key_o,
                     HAS_DEEP: tl.constexpr, DROPOUT: tl.constexpr, ACC64: tl.constexpr, ONE_PASS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """_fwd_kernel for rows wider than a tile: the channels in chunks of BLOCK_C, the LayerNorm
    statistics and ``z`` in one pass over the message (ONE_PASS, the default) or in three (mean,
    variance, down projection), then the output chunk by chunk. The sums over chunks add in fp64
    under ACC64 (module docstring)."""
    acc_ty = z_ptr.dtype.element_ty
    # float arguments arrive as float32 pairs (_scalars.py)
    scale = join_float(scale_hi, scale_lo, acc_ty)
    eps = join_float(eps_hi, eps_lo, acc_ty)
    inv_keep = join_float(inv_keep_hi, inv_keep_lo, acc_ty)
    dot_ty = message_ptr.dtype.element_ty
    rows, row_ok, rows64, b, n = _token_rows(M, N, BLOCK_M)
    x_rows = b * stride_mb + n * stride_mn
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R

    if ONE_PASS:
        mean, rstd, z = _stats_z_one_pass(message_ptr, x_rows, row_ok, rr, r_ok, nw_ptr, nb_ptr, dw_ptr, C, eps,
                                          acc_ty, dot_ty, ACC64, BLOCK_M, BLOCK_C, BLOCK_R)
    else:
        mean, rstd, z = _stats_z_three_pass(message_ptr, x_rows, row_ok, rr, r_ok, nw_ptr, nb_ptr, dw_ptr, C, eps,
                                            acc_ty, dot_ty, ACC64, BLOCK_M, BLOCK_C, BLOCK_R)
    tl.store(mean_ptr + rows64, mean, mask=row_ok)
    tl.store(rstd_ptr + rows64, rstd, mask=row_ok)
    h = _hidden(z, rows, rows64, row_ok, rr, r_ok, z_ptr, db_ptr, R, inv_keep, threshold, key_h, DROPOUT).to(dot_ty)

    t_rows = b * stride_tb + n * stride_tn
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        wu_t = tl.load(uw_ptr + cols[None, :] * R + rr[:, None], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(h, wu_t, input_precision="ieee", out_dtype=acc_ty)
        _store_out(u, rows, rows64, n, cols, col_ok, row_ok[:, None] & col_ok[None, :], t_rows, target_ptr, out_ptr,
                   ub_ptr, deep_ptr, ds_ptr, C, scale, inv_keep, threshold, key_o, HAS_DEEP, DROPOUT)


@triton.jit(do_not_specialize=["threshold", "key_h", "key_o"])
def _bwd_rows_wide_kernel(grad_ptr, message_ptr, mean_ptr, rstd_ptr, z_ptr, nw_ptr, nb_ptr, dw_ptr, db_ptr, uw_ptr,
                          dx_ptr, gz_ptr, M, N, C, R, stride_gb, stride_gn, stride_mb, stride_mn, scale_hi, scale_lo,
                          inv_keep_hi, inv_keep_lo, threshold, key_h, key_o, DROPOUT: tl.constexpr,
                          ACC64: tl.constexpr, FROM_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """_bwd_rows_kernel for rows wider than a tile: gh over chunks of channels, the LayerNorm sums
    c1 = mean(gy * gamma) and c2 = mean(gy * gamma * xhat), then grad_message chunk by chunk (gy
    recomputed from gz). The sums over chunks add in fp64 under ACC64 (module docstring).

    Under FROM_Z (the default) c1 and c2 need no pass over the message: with gy = gz @ down_weight,
    ``C * c1 = gz . (down_weight @ gamma)`` and ``C * c2 = gz . (z - down_bias - down_weight @ beta)``,
    because ``z = (xhat * gamma + beta) @ down_weight^T + down_bias``. Otherwise a pass over the
    message sums them."""
    acc_ty = z_ptr.dtype.element_ty
    # float arguments arrive as float32 pairs (_scalars.py)
    scale = join_float(scale_hi, scale_lo, acc_ty)
    inv_keep = join_float(inv_keep_hi, inv_keep_lo, acc_ty)
    dot_ty = message_ptr.dtype.element_ty
    rows, row_ok, rows64, b, n = _token_rows(M, N, BLOCK_M)
    g_rows = b * stride_gb + n * stride_gn
    x_rows = b * stride_mb + n * stride_mn
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    low_ok = row_ok[:, None] & r_ok[None, :]

    gh = _to_sum(tl.zeros([BLOCK_M, BLOCK_R], acc_ty), ACC64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        gu = _grad_up(grad_ptr, g_rows, rows, cols, row_ok[:, None] & col_ok[None, :], acc_ty, scale, inv_keep,
                      threshold, key_o, DROPOUT)
        wu = tl.load(uw_ptr + cols[:, None] * R + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        gh += _to_sum(tl.dot(gu.to(dot_ty), wu, input_precision="ieee", out_dtype=acc_ty), ACC64)
    gz = _grad_hidden(gh.to(acc_ty), rows, rows64, rr, low_ok, z_ptr, gz_ptr, R, inv_keep, threshold, key_h,
                      DROPOUT)

    mean = tl.load(mean_ptr + rows64, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)
    if FROM_Z:
        g, bw = _weight_sums(nw_ptr, nb_ptr, dw_ptr, rr, r_ok, C, acc_ty, ACC64, BLOCK_C, BLOCK_R)
        z = tl.load(z_ptr + rows64[:, None] * R + rr[None, :], mask=low_ok, other=0.0)
        db = tl.load(db_ptr + rr, mask=r_ok, other=0.0).to(acc_ty)
        zc = z - db[None, :] - bw.to(acc_ty)[None, :]
        c1 = tl.sum(gz * g.to(acc_ty)[None, :], axis=1) / C
        c2 = tl.sum(tl.where(low_ok, gz * zc, 0.0), axis=1) / C
    else:
        c1 = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
        c2 = _to_sum(tl.zeros([BLOCK_M], acc_ty), ACC64)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            gyg, xhat = _grad_ln_terms(gz, cols, col_ok, row_ok[:, None] & col_ok[None, :], x_rows, rr, r_ok,
                                       message_ptr, nw_ptr, dw_ptr, mean, rstd, C)
            c1 += _to_sum(tl.sum(gyg, axis=1), ACC64)
            c2 += _to_sum(tl.sum(gyg * xhat, axis=1), ACC64)
        c1 = (c1 / C).to(acc_ty)
        c2 = (c2 / C).to(acc_ty)
    # (two pipeline stages: with Triton's default three this loop took 180 registers per thread at the
    # benchmark shape on sm_90 under FROM_Z, two resident programs per SM instead of four at 128)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=2):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        tile_ok = row_ok[:, None] & col_ok[None, :]
        gyg, xhat = _grad_ln_terms(gz, cols, col_ok, tile_ok, x_rows, rr, r_ok, message_ptr, nw_ptr, dw_ptr, mean,
                                   rstd, C)
        dx = rstd[:, None] * (gyg - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + rows64[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["threshold", "key_h", "key_o"])
def _bwd_cols_kernel(grad_ptr, message_ptr, mean_ptr, rstd_ptr, z_ptr, gz_ptr, part_w_ptr, part_a_ptr, part_b_ptr,
                     part_gz_ptr, M, N, C, R, rows_per_split, stride_gb, stride_gn, stride_mb, stride_mn, scale_hi, scale_lo,
                     inv_keep_hi, inv_keep_lo, threshold, key_h, key_o, DROPOUT: tl.constexpr, ACC64: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    acc_ty = z_ptr.dtype.element_ty
    # float arguments arrive as float32 pairs (_scalars.py)
    scale = join_float(scale_hi, scale_lo, acc_ty)
    inv_keep = join_float(inv_keep_hi, inv_keep_lo, acc_ty)
    dot_ty = message_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    # Sums over the split's tokens, one BLOCK_M tile per step, the steps added in fp64 under ACC64.
    acc_w = _to_sum(tl.zeros((BLOCK_C, BLOCK_R), dtype=acc_ty), ACC64)  # gu^T @ h
    acc_a = _to_sum(tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_ty), ACC64)  # gz^T @ xhat
    acc_b = _to_sum(tl.zeros((BLOCK_C,), dtype=acc_ty), ACC64)          # sum of gu
    acc_gz = _to_sum(tl.zeros((BLOCK_R,), dtype=acc_ty), ACC64)         # sum of gz (stored by column tile 0)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        b = rows64 // N
        n = rows64 % N
        tile_ok = row_ok[:, None] & col_ok[None, :]
        low_ok = row_ok[:, None] & r_ok[None, :]
        go = tl.load(grad_ptr + (b * stride_gb + n * stride_gn)[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        gu = go.to(acc_ty) * scale
        if DROPOUT:
            gu = tl.where(_keep(rows, cols, key_o, threshold), gu * inv_keep, 0.0)
        z = tl.load(z_ptr + rows64[:, None] * R + rr[None, :], mask=low_ok, other=0.0)
        h = tl.where(low_ok, _gelu(z), 0.0)
        if DROPOUT:
            h = tl.where(_keep(rows, rr, key_h, threshold), h * inv_keep, 0.0)
        acc_w += _to_sum(tl.dot(tl.trans(gu.to(dot_ty)), h.to(dot_ty), input_precision="ieee", out_dtype=acc_ty),
                         ACC64)
        acc_b += _to_sum(tl.sum(gu, axis=0), ACC64)
        gz = tl.load(gz_ptr + rows64[:, None] * R + rr[None, :], mask=low_ok, other=0.0)
        acc_gz += _to_sum(tl.sum(gz, axis=0), ACC64)
        x = tl.load(message_ptr + (b * stride_mb + n * stride_mn)[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        mean = tl.load(mean_ptr + rows64, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)
        xhat = tl.where(tile_ok, (x.to(acc_ty) - mean[:, None]) * rstd[:, None], 0.0)
        acc_a += _to_sum(tl.dot(tl.trans(gz.to(dot_ty)), xhat.to(dot_ty), input_precision="ieee",
                                out_dtype=acc_ty), ACC64)
    base = split.to(tl.int64) * C * R
    tl.store(part_w_ptr + base + cols[:, None] * R + rr[None, :], acc_w.to(acc_ty),
             mask=col_ok[:, None] & r_ok[None, :])
    tl.store(part_a_ptr + base + rr[:, None] * C + cols[None, :], acc_a.to(acc_ty),
             mask=r_ok[:, None] & col_ok[None, :])
    tl.store(part_b_ptr + split.to(tl.int64) * C + cols, acc_b.to(acc_ty), mask=col_ok)
    tl.store(part_gz_ptr + split.to(tl.int64) * R + rr, acc_gz.to(acc_ty), mask=r_ok & (pid_c == 0))


@triton.jit
def _bwd_finalize_kernel(part_w_ptr, part_a_ptr, part_b_ptr, part_gz_ptr, nw_ptr, nb_ptr, dw_ptr, g_nw_ptr, g_nb_ptr,
                         g_dw_ptr, g_db_ptr, g_uw_ptr, g_ub_ptr, splits, C, R, ACC64: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """The parameter gradients of a channel tile from the token splits' partials (added in split order):
    grad_up_weight = sum W, grad_up_bias = sum b, with A = sum A_s and gdb = sum gz_s (= grad_down_bias),
    grad_down_weight = A * norm_weight + gdb (x) norm_bias, grad_norm_weight = sum_j down_weight * A,
    grad_norm_bias = gdb @ down_weight; written in the parameters' dtype."""
    acc_ty = part_w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    cr_ok = col_ok[:, None] & r_ok[None, :]
    rc_ok = r_ok[:, None] & col_ok[None, :]
    w = _to_sum(tl.zeros((BLOCK_C, BLOCK_R), dtype=acc_ty), ACC64)
    a = _to_sum(tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_ty), ACC64)
    b = _to_sum(tl.zeros((BLOCK_C,), dtype=acc_ty), ACC64)
    gdb = _to_sum(tl.zeros((BLOCK_R,), dtype=acc_ty), ACC64)
    for s in range(0, splits):
        s64 = tl.zeros([], tl.int64) + s
        base = s64 * C * R
        w += _to_sum(tl.load(part_w_ptr + base + cols[:, None] * R + rr[None, :], mask=cr_ok, other=0.0), ACC64)
        a += _to_sum(tl.load(part_a_ptr + base + rr[:, None] * C + cols[None, :], mask=rc_ok, other=0.0), ACC64)
        b += _to_sum(tl.load(part_b_ptr + s64 * C + cols, mask=col_ok, other=0.0), ACC64)
        gdb += _to_sum(tl.load(part_gz_ptr + s64 * R + rr, mask=r_ok, other=0.0), ACC64)
    a = a.to(acc_ty)
    gdb = gdb.to(acc_ty)
    gamma = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    beta = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    wd = tl.load(dw_ptr + rr[:, None] * C + cols[None, :], mask=rc_ok, other=0.0).to(acc_ty)
    out_ty = g_uw_ptr.dtype.element_ty
    tl.store(g_uw_ptr + cols[:, None] * R + rr[None, :], w.to(acc_ty).to(out_ty), mask=cr_ok)
    tl.store(g_ub_ptr + cols, b.to(acc_ty).to(out_ty), mask=col_ok)
    tl.store(g_dw_ptr + rr[:, None] * C + cols[None, :],
             (a * gamma[None, :] + gdb[:, None] * beta[None, :]).to(out_ty), mask=rc_ok)
    tl.store(g_nw_ptr + cols, tl.sum(wd * a, axis=0).to(out_ty), mask=col_ok)
    tl.store(g_nb_ptr + cols, tl.sum(gdb[:, None] * wd, axis=0).to(out_ty), mask=col_ok)
    tl.store(g_db_ptr + rr, gdb.to(out_ty), mask=r_ok & (pid == 0))


# Variants of the chunked ("wide") token-tile kernels, both on by default (bench/gpu_variants.py times
# them against the variants they replace): the forward's LayerNorm statistics and z in one pass over the
# message instead of three (_stats_z_one_pass), the backward's LayerNorm sums from z instead of a pass
# over the message (_bwd_rows_wide_kernel).
FWD_ONE_PASS = True
BWD_FROM_Z = True
# The backward's parameter gradients from the token splits' partials in one kernel (_bwd_finalize_kernel)
# instead of about twenty small PyTorch ops (sums over the splits and over the tokens, casts, products).
BWD_FINALIZE_KERNEL = True


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Shared memory of the token-tile kernels: their tl.dot operands, a BLOCK_M x BLOCK_C tile of rows and
# a BLOCK_R x BLOCK_C weight tile, in the input dtype (python -m sa2vp_kernels.triton.aot, Triton 3.8,
# sm_80/sm_90: e.g. 128 KiB for whole rows of C = 768, r = 16 in float32).
_A100_SHARED = 166912  # opt-in shared memory per block of an A100 (the smallest card the build targets)
# Whole rows whose tiles would need more than this run the chunked ("wide") kernels, with chunks of
# channels whose tiles need at most _CHUNK_SHARED (the chunk loops are software-pipelined, which holds
# up to three chunks: 16 KiB keeps them under 48 KiB and free of spills on sm_80/sm_90 for C up to 4096
# and r up to 64). The choice depends only on (C, r, dtype), so the interpreter and every GPU run the
# same configuration.
_WIDE_SHARED = _A100_SHARED
_CHUNK_SHARED = 16 * 1024
_PIPELINE_STAGES = 3  # Triton's default num_stages on sm_80/sm_90
# 16-bit rows wider than this run chunked too: on an H200 (bench/run_gpu.py, tune section, B=64, N=197,
# C=768, r=16, p=0.1, bfloat16, CUDA-graph medians) whole rows with 8 warps took 0.0663 ms forward and
# 0.2295 ms forward + backward, chunks of 256 channels with 4 warps 0.0375 and 0.1785 ms (chunks of 128:
# 0.0368 and 0.1855 ms).
_HALF_WHOLE_ROWS_MAX = 256


def _tile_shared_bytes(block_m: int, block_c: int, block_r: int, dtype: torch.dtype, wide: bool = False) -> int:
    return (block_m + block_r) * block_c * dtype.itemsize * (_PIPELINE_STAGES if wide else 1)


def _shared_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device (looked up once per device: launches are on the
    host's critical path)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_limit_of(index)


@functools.lru_cache(maxsize=None)
def _shared_limit_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", _A100_SHARED))


def _check_fits(block_m: int, block_c: int, block_r: int, dtype: torch.dtype, device: torch.device,
                C: int, r: int, wide: bool = False) -> None:
    """A clear error, before launching, when the tiles cannot fit the GPU's shared memory."""
    if _INTERPRETED or device.type != "cuda":
        return
    need, limit = _tile_shared_bytes(block_m, block_c, block_r, dtype, wide), _shared_limit(device)
    if need > limit:
        raise ValueError(
            f"prompt_add with backend='triton': tiles of {block_c} channels ({C} channels, rank r = {r}, "
            f"{str(dtype).replace('torch.', '')}) need {need} bytes of shared memory per block and this GPU "
            f"has {limit}. Use backend='cuda' (or 'auto')")


def _row_blocks(C: int, r: int, dtype: torch.dtype) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_C, BLOCK_R, num_warps, wide) of the token-tile kernels.

    Whole rows (BLOCK_C >= C) unless their tiles need more shared memory than _WIDE_SHARED, or the
    rows are 16-bit and wider than _HALF_WHOLE_ROWS_MAX channels; then ``wide`` and chunks of BLOCK_C
    channels. One warp per 2048 elements of the tile for 16-bit inputs,
    per 1024 for 32/64-bit ones: with 2048 a float32 tile of C = 768 needs more than 255 registers per
    thread on sm_80/sm_90 and spills (``python -m sa2vp_kernels.triton.aot`` reports registers and
    spills per configuration).
    """
    block_m = 16
    block_r = max(16, triton.next_power_of_2(r))
    block_c = triton.next_power_of_2(C)
    wide = (_tile_shared_bytes(block_m, block_c, block_r, dtype) > _WIDE_SHARED
            or (dtype.itemsize < 4 and block_c > _HALF_WHOLE_ROWS_MAX))
    if wide:
        chunk = max(16, _CHUNK_SHARED // ((block_m + block_r) * dtype.itemsize))
        block_c = min(block_c, 1 << (chunk.bit_length() - 1))
    per_warp = 2048 if dtype.itemsize < 4 else 1024
    num_warps = min(16, max(4, block_m * block_c // per_warp))
    return block_m, block_c, block_r, num_warps, wide


# Launch configurations (BLOCK_M, num_warps, BLOCK_C; 0 keeps the default's value, BLOCK_C -1 means whole rows)
# that the "tune" section of bench/run_gpu.py and bench/gpu_variants.py time at the benchmark shape (B=64,
# N=197, C=768, r=16, bfloat16), the default among them. A BLOCK_C below the row width runs the chunked
# kernels. Every program reads the weights from L2 (72 KiB at that shape with the one-pass forward's weight
# sums: about as much as its 16 rows of target, message and output); 32 rows per program halve those
# reads (64 rows: a quarter). On an H100 fewer warps per program did better (16 rows: 2 warps 32.3 us,
# 4 warps 35.6 us, 8 warps with 256 channels 45.6 us), hence 64-channel chunks with 2 and 4 warps (1 warp
# with 128 channels, 2 warps with 256 channels or with 32 rows spill registers on sm_90). Each compiles for sm_90
# without spills (python -m sa2vp_kernels.triton.aot compiles them all, tests/test_triton_aot.py).
TUNE_CONFIGS = ((16, 8, -1), (16, 4, 0), (16, 4, 128), (16, 8, 256), (32, 8, 256), (16, 2, 128), (32, 4, 128),
                (32, 8, 128), (64, 8, 64), (16, 2, 64), (32, 4, 64))


def tuned_row_blocks(block_m: int, num_warps: int, block_c: int):
    """A replacement of ``_row_blocks`` with the given values (0: the default's; block_c -1: whole
    rows), for tuning sweeps."""
    default = _row_blocks

    def rows(C: int, r: int, dtype: torch.dtype) -> tuple[int, int, int, int, bool]:
        d = default(C, r, dtype)
        bc = triton.next_power_of_2(C) if block_c == -1 else block_c or d[1]
        if bc & (bc - 1):
            raise ValueError(f"block_c must be a power of two, got {block_c}")
        return (block_m or d[0], bc, d[2], num_warps or d[3], bc < triton.next_power_of_2(C) if block_c else d[4])

    return rows


def _fwd_row_blocks(tuned: dict, C: int, r: int, dtype: torch.dtype, device: torch.device):
    """The forward's ``_row_blocks``, with the tuned ``block_m``, ``num_warps`` and ``block_c``
    (sa2vp_kernels.triton.tuning) where the default runs chunked rows and the tuned tiles fit (whole
    rows within _WIDE_SHARED, chunks within the GPU's shared memory)."""
    default = _row_blocks(C, r, dtype)
    if not default[4] or not any(tuned.get(k, 0) for k in ("block_m", "num_warps", "block_c")):
        return default
    blocks = tuned_row_blocks(tuned.get("block_m", 0), tuned.get("num_warps", 0), tuned.get("block_c", 0))(C, r, dtype)
    block_m, block_c, block_r, _, wide = blocks
    need = _tile_shared_bytes(block_m, block_c, block_r, dtype, wide)
    if wide:  # (the interpreter has no shared memory)
        fits = _INTERPRETED or device.type != "cuda" or need <= _shared_limit(device)
    else:
        fits = need <= _WIDE_SHARED
    return blocks if fits else default


def _cols_blocks(C: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, num_warps) of the weight-gradient kernel. Its float32 dots are exact
    (FMA, operands in registers), which spills at the 16-bit tile size: narrower tiles there."""
    if dtype.itemsize < 4:
        return min(64, max(16, triton.next_power_of_2(C))), 64, 4
    return min(32, max(16, triton.next_power_of_2(C))), 16, 4


def _acc64(dtype: torch.dtype) -> bool:
    """ACC64 of the kernels with long sums over chunks or token tiles: partials added in fp64 for fp32
    (and fp64) inputs; 16-bit inputs keep fp32 (module docstring)."""
    return dtype.itemsize >= 4


def _dropout_args(dropout_p: float, seed: int):
    """(inv_keep, threshold, key_hidden, key_out) with the 32-bit keys as signed int32 values."""
    if dropout_p == 0:
        return 1.0, 0, 0, 0

    def as_i32(k):
        return k - (1 << 32) if k >= (1 << 31) else k

    return (1.0 / (1.0 - dropout_p), drop_threshold(dropout_p), as_i32(stream_key(seed, HIDDEN_STREAM)),
            as_i32(stream_key(seed, OUTPUT_STREAM)))


def prompt_add_fwd(target: torch.Tensor, message: torch.Tensor, norm_weight: torch.Tensor,
                          norm_bias: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
                          up_weight: torch.Tensor, up_bias: torch.Tensor, deep: Optional[torch.Tensor],
                          deep_scale: Optional[torch.Tensor], scale: float, dropout_p: float, eps: float,
                          seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, C = message.shape
    M, r = B * N, down_weight.shape[0]
    stat = _stat_dtype(message.dtype)
    out = torch.empty((B, N, C), dtype=target.dtype, device=target.device)
    mean = torch.empty((M,), dtype=stat, device=message.device)
    rstd = torch.empty((M,), dtype=stat, device=message.device)
    z = torch.empty((M, r), dtype=stat, device=message.device)
    tuned = tuning.prompt_add_settings(message.device, message.dtype, C, r)
    block_m, block_c, block_r, num_warps, wide = _fwd_row_blocks(tuned, C, r, message.dtype, message.device)
    _check_fits(block_m, block_c, block_r, message.dtype, message.device, C, r, wide)
    inv_keep, threshold, key_h, key_o = _dropout_args(dropout_p, seed)
    has_deep = deep is not None
    wrap_triton(_fwd_wide_kernel if wide else _fwd_kernel)[(triton.cdiv(M, block_m),)](
        target, message, out, mean, rstd, z, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias,
        deep if has_deep else message, deep_scale if has_deep else norm_weight, M, N, C, r,
        target.stride(0), target.stride(1), message.stride(0), message.stride(1),
        *split_float(scale), *split_float(eps), *split_float(inv_keep), threshold, key_h, key_o, HAS_DEEP=has_deep,
        DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps,
        # (whole rows: one dot, no sums over chunks)
        **({"ACC64": _acc64(message.dtype), "ONE_PASS": tuned.get("fwd_one_pass", FWD_ONE_PASS)} if wide else {}))
    return out, mean, rstd, z


def prompt_add_bwd(grad_out: torch.Tensor, message: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          z: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor, scale: float,
                          dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor]:
    B, N, C = message.shape
    M, r = B * N, down_weight.shape[0]
    stat = z.dtype
    dev = message.device
    inv_keep, threshold, key_h, key_o = _dropout_args(dropout_p, seed)
    dropout = dropout_p > 0
    tuned = tuning.prompt_add_settings(dev, message.dtype, C, r)

    grad_message = torch.empty((B, N, C), dtype=message.dtype, device=dev)
    gz = torch.empty((M, r), dtype=stat, device=dev)
    block_m, block_c, block_r, num_warps, wide = _row_blocks(C, r, message.dtype)
    _check_fits(block_m, block_c, block_r, message.dtype, message.device, C, r, wide)
    rows_args = (grad_message, gz, M, N, C, r, grad_out.stride(0), grad_out.stride(1), message.stride(0),
                 message.stride(1), *split_float(scale), *split_float(inv_keep), threshold, key_h, key_o)
    rows_meta = dict(DROPOUT=dropout, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps)
    if wide:
        wrap_triton(_bwd_rows_wide_kernel)[(triton.cdiv(M, block_m),)](
            grad_out, message, mean, rstd, z, norm_weight, norm_bias, down_weight, down_bias, up_weight, *rows_args,
            ACC64=_acc64(message.dtype), FROM_Z=tuned.get("bwd_from_z", BWD_FROM_Z), **rows_meta)
    else:
        wrap_triton(_bwd_rows_kernel)[(triton.cdiv(M, block_m),)](
            grad_out, message, mean, rstd, z, norm_weight, down_weight, up_weight, *rows_args, **rows_meta)

    # Weight gradients: channel tiles x token splits, partials added in split order.
    cols_block, rows_block, cols_warps = _cols_blocks(C, message.dtype)
    splits = max(1, min(32, triton.cdiv(M, 4 * rows_block)))
    rows_per_split = triton.cdiv(triton.cdiv(M, rows_block), splits) * rows_block
    splits = triton.cdiv(M, rows_per_split)
    part_w = torch.empty((splits, C, r), dtype=stat, device=dev)
    part_a = torch.empty((splits, r, C), dtype=stat, device=dev)
    part_b = torch.empty((splits, C), dtype=stat, device=dev)
    part_gz = torch.empty((splits, r), dtype=stat, device=dev)
    wrap_triton(_bwd_cols_kernel)[(triton.cdiv(C, cols_block), splits)](
        grad_out, message, mean, rstd, z, gz, part_w, part_a, part_b, part_gz, M, N, C, r, rows_per_split,
        grad_out.stride(0), grad_out.stride(1), message.stride(0), message.stride(1), *split_float(scale),
        *split_float(inv_keep), threshold,
        key_h, key_o, DROPOUT=dropout, ACC64=_acc64(message.dtype), BLOCK_M=rows_block, BLOCK_C=cols_block,
        BLOCK_R=block_r, num_warps=cols_warps)
    dt = message.dtype
    if tuned.get("bwd_finalize_kernel", BWD_FINALIZE_KERNEL):
        grads = [torch.empty(shape, dtype=dt, device=dev) for shape in ((C,), (C,), (r, C), (r,), (C, r), (C,))]
        fin_block = min(64, max(16, triton.next_power_of_2(C)))
        wrap_triton(_bwd_finalize_kernel)[(triton.cdiv(C, fin_block),)](
            part_w, part_a, part_b, part_gz, norm_weight, norm_bias, down_weight, *grads, splits, C, r,
            ACC64=_acc64(dt), BLOCK_C=fin_block, BLOCK_R=block_r, num_warps=4)
        return (grad_message, *grads)
    grad_up_weight = part_w.sum(0)
    grad_up_bias = part_b.sum(0)
    a = part_a.sum(0)
    grad_down_bias = gz.sum(0)
    gamma, beta, wd = norm_weight.to(stat), norm_bias.to(stat), down_weight.to(stat)
    grad_down_weight = a * gamma + grad_down_bias[:, None] * beta
    grad_norm_weight = (wd * a).sum(0)
    grad_norm_bias = grad_down_bias @ wd
    return (grad_message, grad_norm_weight.to(dt), grad_norm_bias.to(dt), grad_down_weight.to(dt),
            grad_down_bias.to(dt), grad_up_weight.to(dt), grad_up_bias.to(dt))


# The registered ops (what torch.compile, export and opcheck see); eager calls from the public API run
# the launchers above directly (sa2vp_kernels._dispatch.eager_triton).
prompt_add_fwd_triton = triton_op("sa2vp_kernels::prompt_add_fwd_triton", mutates_args=())(prompt_add_fwd)
prompt_add_bwd_triton = triton_op("sa2vp_kernels::prompt_add_bwd_triton", mutates_args=())(prompt_add_bwd)


_INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)
