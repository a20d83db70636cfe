"""Triton kernels of the prompt map, forward and backward.

``out[n] = resample(embed)[n] @ weight.T + bias + pos_embed[n]`` where ``resample`` takes the grid rows
of ``embed`` (on ``embed_h x embed_w``) bilinearly to the token grid ``grid_h x grid_w`` with ATen's
``align_corners=False`` taps and passes the ``T`` prefix rows through.

* Forward, one launch: a program per output token gathers its four source rows, blends them into one
  ``r``-vector and walks the channels in blocks (``(BLOCK_C, BLOCK_R)`` weight tiles, sum over ``r``).
* Backward, three launches, no atomics, every sum in a fixed order:
  1. per token: the resampled row ``res[n]`` (recomputed) and ``d_res[n] = grad[n] @ weight``;
  2. per block of channels: ``d_weight = grad^T @ res`` and ``d_bias = sum_n grad[n]``;
  3. per source row of ``embed``: ``d_embed`` gathers ``d_res`` over the outputs its taps reach (the
     adjoint of the resampling); prefix rows copy ``d_res``.

Accumulation is float32 (float64 for float64 inputs). The two long sums, ``d_res`` over the ``C``
channels and ``d_weight`` / ``d_bias`` over the ``N`` tokens, add their per-step partials (a dot over
``BLOCK_C`` channels, a sum over ``BLOCK_N`` tokens) in float64 for float32 inputs (``ACC64``): one
float32 chain over every step (a GPU dot with a running accumulator is one FMA chain over all of its
K) was several times less accurate than PyTorch's blocked sums (768 channels, 3136 tokens on an
H200). 16-bit inputs keep float32 (their rounding dominates).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _to_acc(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _to_sum(x, ACC64: tl.constexpr):
    """A partial sum in the dtype its steps are added in: float64 under ``ACC64``, else unchanged (a
    float32 partial converted before the add, so that the compiler cannot fold the steps into one FMA
    chain)."""
    if ACC64:
        return x.to(tl.float64)
    else:
        return x


@triton.jit
def _tap(dst, in_size, out_size, FP64: tl.constexpr):
    """Bilinear taps of output index ``dst``: ``i0`` (weight ``1 - l1``) and ``i1`` (weight ``l1``)."""
    zero = tl.zeros([], tl.int32)  # scalars may arrive as Python ints (constants, interpreter loops)
    scale = _to_acc(zero + in_size, FP64) / _to_acc(zero + out_size, FP64)
    src = tl.maximum(scale * (_to_acc(zero + dst, FP64) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    l1 = tl.minimum(tl.maximum(src - _to_acc(i0, FP64), 0.0), 1.0)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, l1


@triton.jit
def _tap_weight(dst, src, in_size, out_size, FP64: tl.constexpr):
    """Entry ``(dst, src)`` of the 1-D resampling matrix."""
    i0, i1, l1 = _tap(dst, in_size, out_size, FP64)
    return tl.where(i0 == src, 1.0 - l1, 0.0) + tl.where(i1 == src, l1, 0.0)


@triton.jit
def _adjoint_range(src, in_size, out_size):
    """Output indices ``[lo, hi]`` that contain every output whose taps reach source index ``src``
    (source coordinate in ``[src - 1, src + 1)``, widened by one each side against rounding)."""
    in_size = tl.zeros([], tl.int32) + in_size  # a tensor even when the size arrives as a constant
    num_lo = tl.maximum(2 * out_size * (src - 1) + out_size - in_size, 0)
    num_hi = tl.maximum(2 * out_size * (src + 1) + out_size - in_size, 0)
    lo = tl.maximum(num_lo // (2 * in_size) - 1, 0)
    hi = tl.minimum(num_hi // (2 * in_size) + 1, out_size - 1)
    same = in_size == out_size
    return tl.where(same, src, lo), tl.where(same, src, hi)


@triton.jit
def _resampled_rows(embed_ptr, offs_n, mask_n, offs_r, R, T, GH, GW, EH, EW, FP64: tl.constexpr):
    """``(BLOCK_N, BLOCK_R)`` tile: rows ``offs_n`` of ``resample(embed)``, zero where masked."""
    is_grid = offs_n >= T
    g = tl.maximum(offs_n - T, 0)
    y = g // GW
    x = g - y * GW
    y0, y1, ly = _tap(y, EH, GH, FP64)
    x0, x1, lx = _tap(x, EW, GW, FP64)
    # A prefix row is its own four taps with weights (1, 0, 0, 0).
    ly = tl.where(is_grid, ly, 0.0)[:, None]
    lx = tl.where(is_grid, lx, 0.0)[:, None]
    mask = mask_n[:, None] & (offs_r[None, :] < R)
    e00 = _load_embed_rows(embed_ptr, tl.where(is_grid, T + y0 * EW + x0, offs_n), offs_r, mask, R, FP64)
    e01 = _load_embed_rows(embed_ptr, tl.where(is_grid, T + y0 * EW + x1, offs_n), offs_r, mask, R, FP64)
    e10 = _load_embed_rows(embed_ptr, tl.where(is_grid, T + y1 * EW + x0, offs_n), offs_r, mask, R, FP64)
    e11 = _load_embed_rows(embed_ptr, tl.where(is_grid, T + y1 * EW + x1, offs_n), offs_r, mask, R, FP64)
    return (1.0 - ly) * ((1.0 - lx) * e00 + lx * e01) + ly * ((1.0 - lx) * e10 + lx * e11)


@triton.jit
def _load_embed_rows(embed_ptr, rows, offs_r, mask, R, FP64: tl.constexpr):
    return _to_acc(tl.load(embed_ptr + rows[:, None] * R + offs_r[None, :], mask=mask, other=0.0), FP64)


@triton.jit
def _prompt_map_fwd_kernel(embed_ptr, weight_ptr, bias_ptr, pos_ptr, out_ptr,
                           N, R, C, T, GH, GW, EH, EW,
                           HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, FP64: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_c = offs_c < C
    rows = _resampled_rows(embed_ptr, offs_n, mask_n, offs_r, R, T, GH, GW, EH, EW, FP64)
    w_mask = mask_c[:, None] & (offs_r[None, :] < R)
    w = _to_acc(tl.load(weight_ptr + offs_c[:, None] * R + offs_r[None, :], mask=w_mask, other=0.0), FP64)
    acc = tl.sum(rows[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += _to_acc(tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0), FP64)[None, :]
    nc = offs_n[:, None] * C + offs_c[None, :]
    mask = mask_n[:, None] & mask_c[None, :]
    if HAS_POS:
        acc += _to_acc(tl.load(pos_ptr + nc, mask=mask, other=0.0), FP64)
    tl.store(out_ptr + nc, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows_kernel(grad_ptr, embed_ptr, weight_ptr, res_ptr, d_res_ptr,
                     N, R, C, T, GH, GW, EH, EW,
                     FP64: tl.constexpr, ACC64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    nr = offs_n[:, None] * R + offs_r[None, :]
    nr_mask = mask_n[:, None] & mask_r[None, :]
    rows = _resampled_rows(embed_ptr, offs_n, mask_n, offs_r, R, T, GH, GW, EH, EW, FP64)
    tl.store(res_ptr + nr, rows, mask=nr_mask)
    d = _to_sum(rows * 0.0, ACC64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g = tl.load(grad_ptr + offs_n[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + offs_c[:, None] * R + offs_r[None, :], mask=mask_c[:, None] & mask_r[None, :],
                    other=0.0)
        if FP64:
            d += tl.sum(g.to(tl.float64)[:, :, None] * w.to(tl.float64)[None, :, :], axis=1)
        else:
            # An explicit dot: Triton 3.6 rewrites a broadcast-and-sum of this shape into a dot in
            # TF32 (about 1e-3 relative error in float32). Here 16-bit operands stay 16-bit (exact
            # products, float32 sums) and float32 ones use full-precision FMAs. One dot per block of
            # channels, the blocks added in float64 for float32 inputs (see the module docstring).
            d += _to_sum(tl.dot(g, w, input_precision="ieee", out_dtype=tl.float32), ACC64)
    tl.store(d_res_ptr + nr, d.to(d_res_ptr.dtype.element_ty), mask=nr_mask)


@triton.jit
def _bwd_weight_kernel(grad_ptr, res_ptr, d_weight_ptr, d_bias_ptr, N, R, C,
                       FP64: tl.constexpr, ACC64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    # Sums of BLOCK_N tokens per step, the steps added in float64 for float32 inputs (module docstring).
    acc_w = _to_acc(tl.zeros([BLOCK_C, BLOCK_R], tl.float32), ACC64)
    acc_b = _to_acc(tl.zeros([BLOCK_C], tl.float32), ACC64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(grad_ptr + offs_n[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        g = _to_acc(g, FP64)
        res = tl.load(res_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                      other=0.0)
        acc_w += _to_sum(tl.sum(g[:, :, None] * res[:, None, :], axis=0), ACC64)
        acc_b += _to_sum(tl.sum(g, axis=0), ACC64)
    w_ptrs = d_weight_ptr + offs_c[:, None] * R + offs_r[None, :]
    tl.store(w_ptrs, acc_w.to(d_weight_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_r[None, :])
    tl.store(d_bias_ptr + offs_c, acc_b.to(d_bias_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _bwd_embed_kernel(d_res_ptr, d_embed_ptr, J, R, T, GH, GW, EH, EW, SPAN_X, N_CAND,
                      FP64: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``BLOCK_J`` source rows of ``embed`` per program; each visits the ``N_CAND`` candidate outputs
    of its adjoint range (``SPAN_X`` per line), ``BLOCK_M`` at a time, in a fixed order."""
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    is_prefix = offs_j < T
    # Prefix rows copy their gradient; grid rows start from zero and gather.
    jr = offs_j[:, None] * R + offs_r[None, :]
    acc = _to_acc(tl.load(d_res_ptr + jr, mask=is_prefix[:, None] & mask_r[None, :], other=0.0), FP64)
    g = tl.maximum(offs_j - T, 0)
    sy = g // EW
    sx = g - sy * EW
    y_lo, y_hi = _adjoint_range(sy, EH, GH)
    x_lo, x_hi = _adjoint_range(sx, EW, GW)
    gathers = (offs_j < J) & (offs_j >= T)
    for m0 in range(0, N_CAND, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        y = y_lo[:, None] + (m // SPAN_X)[None, :]
        x = x_lo[:, None] + (m % SPAN_X)[None, :]
        valid = gathers[:, None] & (m < N_CAND)[None, :] & (y <= y_hi[:, None]) & (x <= x_hi[:, None])
        w = _tap_weight(y, sy[:, None], EH, GH, FP64) * _tap_weight(x, sx[:, None], EW, GW, FP64)
        w = tl.where(valid, w, 0.0)
        rows = T + y * GW + x
        d = tl.load(d_res_ptr + rows[:, :, None] * R + offs_r[None, None, :],
                    mask=valid[:, :, None] & mask_r[None, None, :], other=0.0)
        acc += tl.sum(w[:, :, None] * d, axis=1)
    tl.store(d_embed_ptr + jr, acc.to(d_embed_ptr.dtype.element_ty), mask=(offs_j < J)[:, None] & mask_r[None, :])


# Elements of the largest register tile of one program (3-D products before their sum).
_TILE = 4096


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _block_c(C: int, rows: int, block_r: int) -> int:
    """Channels per program or loop step so that a (rows, BLOCK_C, BLOCK_R) product fits ``_TILE``."""
    return max(1, min(triton.next_power_of_2(C), _pow2_at_most(_TILE // (rows * block_r))))


def _span(in_size: int, out_size: int) -> int:
    """Longest output range of ``_adjoint_range`` along one axis."""
    return 1 if in_size == out_size else -(-2 * out_size // in_size) + 3


def _embed_blocks(n_cand: int, block_r: int):
    """(BLOCK_J, BLOCK_M): source rows per program and candidate outputs per step, within ``_TILE``."""
    block_m = max(2, min(triton.next_power_of_2(n_cand), 256, _pow2_at_most(max(2, _TILE // block_r))))
    block_j = max(1, min(16, _pow2_at_most(max(1, _TILE // (block_m * block_r)))))
    return block_j, block_m


_BLOCK_N = 16
_INTERPRETED = not isinstance(_prompt_map_fwd_kernel, triton.runtime.jit.JITFunction)


def _launch(kernel, grid, *args, **meta):
    """Launch through ``wrap_triton`` (so torch.compile sees the kernel).

    Under TRITON_INTERPRET the kernel is plain Python that needs real data and that ``wrap_triton``
    cannot trace: a fake-tensor run (shape propagation, opcheck) only needs the outputs' metadata,
    which the caller has already allocated, and an AOT trace (torch.compile) is refused."""
    if _INTERPRETED:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(isinstance(a, FunctionalTensor) for a in tensors):
            raise RuntimeError("torch.compile of the Triton prompt_map kernels needs a GPU: under "
                               "TRITON_INTERPRET=1 they cannot be traced (use backend='cpu' on CPU)")
        if any(is_fake(a) or a.is_meta for a in tensors):
            return
    wrap_triton(kernel)[grid](*args, **meta)


def prompt_map_fwd(embed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pos_embed: Optional[torch.Tensor], grid_h: int, grid_w: int, embed_h: int,
                          embed_w: int, num_prefix: int) -> torch.Tensor:
    embed, weight = embed.contiguous(), weight.contiguous()
    C, R = weight.shape
    N = num_prefix + grid_h * grid_w
    out = torch.empty((1, N, C), device=embed.device, dtype=embed.dtype)
    bias_arg = embed if bias is None else bias.contiguous()
    pos_arg = embed if pos_embed is None else pos_embed.contiguous()
    block_r = triton.next_power_of_2(R)
    block_c = _block_c(C, _BLOCK_N, block_r)
    _launch(
        _prompt_map_fwd_kernel, (triton.cdiv(N, _BLOCK_N), triton.cdiv(C, block_c)),
        embed, weight, bias_arg, pos_arg, out, N, R, C, num_prefix, grid_h, grid_w, embed_h, embed_w,
        HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, FP64=embed.dtype == torch.float64,
        BLOCK_N=_BLOCK_N, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out


def prompt_map_bwd(grad_out: torch.Tensor, embed: torch.Tensor, weight: torch.Tensor, grid_h: int,
                          grid_w: int, embed_h: int, embed_w: int, num_prefix: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, embed, weight = grad_out.contiguous(), embed.contiguous(), weight.contiguous()
    C, R = weight.shape
    N = num_prefix + grid_h * grid_w
    fp64 = embed.dtype == torch.float64
    acc64 = embed.dtype.itemsize >= 4  # float32 (and float64) inputs add their partial sums in float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    res = torch.empty((N, R), device=embed.device, dtype=acc_dtype)
    d_res = torch.empty((N, R), device=embed.device, dtype=acc_dtype)
    d_embed = torch.empty_like(embed)
    d_weight = torch.empty_like(weight)
    d_bias = torch.empty((C,), device=embed.device, dtype=weight.dtype)
    block_r = triton.next_power_of_2(R)
    # float64: a (BLOCK_N, BLOCK_C, BLOCK_R) product summed over channels; otherwise a tl.dot, whose
    # operands need 16 or more rows, columns and channels.
    rows_block_r = block_r if fp64 else max(16, block_r)
    rows_block_c = _block_c(C, _BLOCK_N, block_r) if fp64 else max(16, min(64, triton.next_power_of_2(C)))
    _launch(
        _bwd_rows_kernel, (triton.cdiv(N, _BLOCK_N),),
        grad_out, embed, weight, res, d_res, N, R, C, num_prefix, grid_h, grid_w, embed_h, embed_w,
        FP64=fp64, ACC64=acc64, BLOCK_N=_BLOCK_N, BLOCK_R=rows_block_r, BLOCK_C=rows_block_c,
    )
    block_c = min(32, triton.next_power_of_2(C))
    block_n = max(1, min(16, _pow2_at_most(_TILE // (block_c * block_r))))
    _launch(
        _bwd_weight_kernel, (triton.cdiv(C, block_c),),
        grad_out, res, d_weight, d_bias, N, R, C, FP64=fp64, ACC64=acc64, BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    J = embed.shape[0]
    span_x = _span(embed_w, grid_w)
    n_cand = _span(embed_h, grid_h) * span_x
    block_j, block_m = _embed_blocks(n_cand, block_r)
    _launch(
        _bwd_embed_kernel, (triton.cdiv(J, block_j),),
        d_res, d_embed, J, R, num_prefix, grid_h, grid_w, embed_h, embed_w, span_x, n_cand,
        FP64=fp64, BLOCK_J=block_j, BLOCK_M=block_m, BLOCK_R=block_r,
    )
    return d_embed, d_weight, d_bias


# The registered ops (what torch.compile, export and opcheck see); eager calls from the public API run
# the launchers above directly (sa2vp_kernels._dispatch.eager_triton).
prompt_map_fwd_triton = triton_op("sa2vp_kernels::prompt_map_fwd_triton", mutates_args=())(prompt_map_fwd)
prompt_map_bwd_triton = triton_op("sa2vp_kernels::prompt_map_bwd_triton", mutates_args=())(prompt_map_bwd)
