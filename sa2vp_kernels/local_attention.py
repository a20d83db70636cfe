"""Spatially aligned local cross attention: the checked public entry point and its backends.

A prefix query (CLS, register tokens) attends to all ``N`` keys.  A grid query at ``(y, x)`` attends
to the grid keys in the ``window x window`` square centred on ``(y, x)`` and never to prefix keys.
``border="clip"`` drops out-of-grid neighbours from the softmax; ``border="zero"`` counts them as
score 0 with value 0 (the authors' accelerated code).

The compiled ops ``torch.ops.sa2vp_kernels.local_attn_fwd/bwd`` (CPU kernels in ``csrc/cpu``, CUDA
kernels in ``csrc/cuda``) and the Triton ops ``local_attn_fwd_triton/bwd_triton``
(:mod:`sa2vp_kernels.triton.local_attn`) share one schema.  The fake implementations of both and the
autograd of the Triton ops are registered here; the compiled ops have the same autograd formula in
C++ (``csrc/autograd.cpp``, less host time per call).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _checks, _ext
from ._dispatch import direct_launches, eager_triton, first_derivative_only, resolve_backend, triton_available
from .reference import attention as _ref

BORDERS = ("clip", "zero")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, grid_h, grid_w, window, num_prefix, zero_border, scale):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_lse_dtype(q.dtype))


def _fake_bwd(grad_out, q, k, v, out, lse, grid_h, grid_w, window, num_prefix, zero_border, scale):
    shape = q.shape
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


def _setup_context(ctx, inputs, output):
    q, k, v, grid_h, grid_w, window, num_prefix, zero_border, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (grid_h, grid_w, window, num_prefix, zero_border, scale)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    return backward


if _ext.extension_available():
    torch.library.register_fake("sa2vp_kernels::local_attn_fwd")(_fake_fwd)
    torch.library.register_fake("sa2vp_kernels::local_attn_bwd")(_fake_bwd)

_triton_ops = None
if triton_available():
    from .triton import local_attn as _triton_local_attn

    _triton_ops = _triton_local_attn
    torch.library.register_autograd(
        "sa2vp_kernels::local_attn_fwd_triton",
        _make_backward(_triton_local_attn.local_attn_bwd_triton),
        setup_context=_setup_context,
    )


class _EagerTritonAttention(torch.autograd.Function):
    """The registered Triton ops' forward and backward, for eager calls (``_dispatch.eager_triton``)."""

    @staticmethod
    def forward(ctx, q, k, v, args):
        out, lse = _triton_ops.local_attn_fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out

    @staticmethod
    @first_derivative_only('local_cross_attention with backend="triton"')
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with direct_launches(grad_out):  # (the saved tensors come from an eager forward)
            dq, dk, dv = _triton_ops.local_attn_bwd(grad_out, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None


def _check_args(q, k, v, grid, window, num_prefix, border, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, dim=4)
    _checks.check_same("q", q, {"k": k, "v": v})
    _checks.check_dtype_for_device("q", q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (B, heads, N, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    gh, gw = _checks.check_grid(grid)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int (1, 3, 5, ...), got {window!r}")
    num_prefix = _checks.check_int("num_prefix", num_prefix, minimum=0)
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    N = q.shape[2]
    if N != num_prefix + gh * gw:
        raise ValueError(
            f"q.shape[2] = {N} tokens, but num_prefix + grid[0] * grid[1] = {num_prefix} + {gh} * {gw} "
            f"= {num_prefix + gh * gw}"
        )
    if q.shape[3] < 1 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must have non-empty batch, heads and head_dim, got shape {tuple(q.shape)}")
    if scale is None:
        scale = q.shape[3] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return gh, gw, float(scale)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    # evaluated once at trace time under torch.compile (the kernel registry queries are not traceable)
    return resolve_backend(backend, device, "local_attn_fwd")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def local_cross_attention(q, k, v, grid, *, window=3, num_prefix=1, border="clip", scale=None,
                          backend="auto"):
    """Spatially aligned cross attention between two token maps on the same grid.

    Args:
        q: ``(B, heads, N, head_dim)`` queries of one token map.
        k, v: ``(B, heads, N, head_dim)`` keys and values of the other token map.
        grid: ``(height, width)`` of the token grid; ``N = num_prefix + height * width``.
        window: odd side of the square neighbourhood each grid query sees (default 3).
        num_prefix: number of leading prefix tokens (CLS, registers) that attend to everything.
        border: ``"clip"`` (drop out-of-grid neighbours) or ``"zero"`` (score 0, value 0).
        scale: score scale, default ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(B, heads, N, head_dim)`` tensor, dtype of ``q``. Under ``torch.autocast`` the op computes in
        the widest dtype of ``q, k, v`` (at least float32 on the CPU) and returns that dtype.
    """
    autocast = _checks.autocast_device(q)
    if autocast is not None:
        q, k, v = _checks.autocast_inputs(autocast, q, k, v)
    gh, gw, scale = _check_args(q, k, v, grid, window, num_prefix, border, scale)
    backend = _resolve_backend(backend, q.device)
    if backend == "reference":
        with _checks.autocast_off(autocast):
            return _ref.local_cross_attention_vectorized(q, k, v, (gh, gw), window, num_prefix, border, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    args = (gh, gw, window, num_prefix, border == "zero", scale)
    if backend == "triton":
        if not eager_triton(q, k, v):
            out, _ = _triton_ops.local_attn_fwd_triton(q, k, v, *args)
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            with direct_launches():
                out = _EagerTritonAttention.apply(q, k, v, args)
        else:
            with direct_launches():
                out, _ = _triton_ops.local_attn_fwd(q, k, v, *args)
    else:
        out, _ = torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, *args)
    return out


class LocalCrossAttention(nn.Module):
    """Module form of :func:`local_cross_attention` (no parameters; holds the configuration)."""

    def __init__(self, window=3, num_prefix=1, border="clip", scale=None, backend="auto"):
        super().__init__()
        self.window = window
        self.num_prefix = num_prefix
        self.border = border
        self.scale = scale
        self.backend = backend

    def forward(self, q, k, v, grid):
        return local_cross_attention(q, k, v, grid, window=self.window, num_prefix=self.num_prefix,
                                     border=self.border, scale=self.scale, backend=self.backend)

    def extra_repr(self):
        return f"window={self.window}, num_prefix={self.num_prefix}, border={self.border!r}, backend={self.backend!r}"
