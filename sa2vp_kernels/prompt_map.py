"""Prompt token map: the checked public entry point and its backends.

SA2VP keeps a learned low-rank prompt map ``embed`` of ``num_prefix + h*w`` rows of width ``r`` on its
own ``h x w`` grid.  The prompt tokens are

    resample(embed) @ weight.T + bias + pos_embed        -> (1, num_prefix + H*W, C)

where ``resample`` takes the grid rows bilinearly to the token grid ``(H, W)`` exactly like
``F.interpolate(mode="bilinear", align_corners=False)`` on the ``(1, r, h, w)`` image (the identity
when the grids match) and passes the prefix rows through.

The compiled ops ``torch.ops.sa2vp_kernels.prompt_map_fwd/bwd`` (``csrc/cpu/prompt_map.cpp``,
``csrc/cuda/prompt_map.cu``) and the Triton ops ``prompt_map_fwd_triton/bwd_triton``
(:mod:`sa2vp_kernels.triton.prompt_map`) share one schema.  The fake implementations of both and the
autograd of the Triton ops are registered here; the compiled ops have the same autograd formula in
C++ (``csrc/autograd.cpp``, less host time per call).  The backward is deterministic (no float atomics).
"""
from __future__ import annotations

import torch

from . import _checks, _ext
from ._dispatch import direct_launches, eager_triton, first_derivative_only, resolve_backend, triton_available
from .reference import prompt_map as _ref


def _fake_fwd(embed, weight, bias, pos_embed, grid_h, grid_w, embed_h, embed_w, num_prefix):
    return embed.new_empty((1, num_prefix + grid_h * grid_w, weight.shape[0]))


def _fake_bwd(grad_out, embed, weight, grid_h, grid_w, embed_h, embed_w, num_prefix):
    return embed.new_empty(embed.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    embed, weight, bias, pos_embed, *args = inputs
    ctx.save_for_backward(embed, weight)
    ctx.has_bias = bias is not None
    ctx.has_pos = pos_embed is not None
    ctx.args = tuple(args)


def _make_backward(bwd_op):
    def backward(ctx, grad_out):
        embed, weight = ctx.saved_tensors
        d_embed, d_weight, d_bias = bwd_op(grad_out.contiguous(), embed, weight, *ctx.args)
        d_bias = d_bias if ctx.has_bias else None
        d_pos = grad_out if ctx.has_pos else None
        return d_embed, d_weight, d_bias, d_pos, None, None, None, None, None

    return backward


def _compiled_ops_available() -> bool:
    return _ext.extension_available() and hasattr(torch.ops.sa2vp_kernels, "prompt_map_fwd")


if _compiled_ops_available():
    torch.library.register_fake("sa2vp_kernels::prompt_map_fwd")(_fake_fwd)
    torch.library.register_fake("sa2vp_kernels::prompt_map_bwd")(_fake_bwd)

_triton_ops = None
if triton_available():
    from .triton import prompt_map as _triton_prompt_map

    _triton_ops = _triton_prompt_map
    torch.library.register_autograd(
        "sa2vp_kernels::prompt_map_fwd_triton",
        _make_backward(_triton_prompt_map.prompt_map_bwd_triton),
        setup_context=_setup_context,
    )
    _eager_backward = _make_backward(_triton_prompt_map.prompt_map_bwd)


class _EagerTritonPromptMap(torch.autograd.Function):
    """The registered Triton ops' forward and backward, for eager calls (``_dispatch.eager_triton``)."""

    @staticmethod
    def forward(ctx, *args):
        out = _triton_ops.prompt_map_fwd(*args)
        _setup_context(ctx, args, out)
        return out

    @staticmethod
    @first_derivative_only('prompt_map with backend="triton"')
    def backward(ctx, grad_out):
        with direct_launches(grad_out):  # (the saved tensors come from an eager forward)
            return _eager_backward(ctx, grad_out)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    # The kernel-registry queries behind it are opaque to torch.compile; their answer is a constant.
    return resolve_backend(backend, device, "prompt_map_fwd")


def _check_args(embed, weight, bias, pos_embed, grid, embed_grid, num_prefix):
    _checks.check_tensor("embed", embed, dim=2)
    _checks.check_tensor("weight", weight, dim=2)
    if bias is not None:
        _checks.check_tensor("bias", bias, dim=1)
    if pos_embed is not None:
        _checks.check_tensor("pos_embed", pos_embed, dim=3)
    _checks.check_same("embed", embed, {"weight": weight, "bias": bias, "pos_embed": pos_embed})
    _checks.check_dtype_for_device("embed", embed)
    gh, gw = _checks.check_grid(grid)
    num_prefix = _checks.check_int("num_prefix", num_prefix, minimum=0)
    rows, r = embed.shape
    if r < 1:
        raise ValueError(f"embed must have at least one column (the rank r), got shape {tuple(embed.shape)}")
    if embed_grid is None:
        eh, ew = gh, gw
        if rows != num_prefix + gh * gw:
            raise ValueError(
                f"embed has {rows} rows, but with embed_grid=None (the token grid {gh}x{gw}) it must have "
                f"num_prefix + {gh} * {gw} = {num_prefix + gh * gw}; pass embed_grid=(h, w) for a prompt "
                f"map on another grid"
            )
    else:
        try:
            eh, ew = _checks.check_grid(embed_grid)
        except ValueError:
            raise ValueError(f"embed_grid must be None or a pair (h, w) of positive ints, got {embed_grid!r}") from None
        if rows != num_prefix + eh * ew:
            raise ValueError(
                f"embed has {rows} rows, but num_prefix + embed_grid[0] * embed_grid[1] = {num_prefix} + "
                f"{eh} * {ew} = {num_prefix + eh * ew}"
            )
    C = weight.shape[0]
    if C < 1 or weight.shape[1] != r:
        raise ValueError(
            f"weight must have shape (C, r) = (C, {r}) with r = embed.shape[1] and C >= 1, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must have shape (C,) = ({C},) with C = weight.shape[0], got {tuple(bias.shape)}")
    N = num_prefix + gh * gw
    if pos_embed is not None and pos_embed.shape != (1, N, C):
        raise ValueError(
            f"pos_embed must have shape (1, N, C) = (1, {N}, {C}) with N = num_prefix + grid[0] * grid[1], "
            f"got {tuple(pos_embed.shape)}"
        )
    return gh, gw, eh, ew, num_prefix


def prompt_map(embed, weight, bias, pos_embed, grid, *, num_prefix=1, embed_grid=None, backend="auto"):
    """Prompt tokens from a low-rank prompt map: ``resample(embed) @ weight.T + bias + pos_embed``.

    Args:
        embed: ``(num_prefix + h*w, r)`` prompt map; its grid rows lie on ``embed_grid = (h, w)``.
        weight: ``(C, r)`` up-projection.
        bias: ``(C,)`` or None.
        pos_embed: ``(1, num_prefix + H*W, C)`` or None.
        grid: token grid ``(H, W)``.
        num_prefix: number of leading prefix rows (CLS, registers), passed through unresampled.
        embed_grid: grid ``(h, w)`` of the prompt map; None means ``grid``.  A different grid (finer or
            coarser) is resampled bilinearly like ``F.interpolate(mode="bilinear", align_corners=False)``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(1, num_prefix + H*W, C)`` tensor, dtype of ``embed``. Under ``torch.autocast`` the op computes in
        the widest dtype of the tensor arguments (at least float32 on the CPU) and returns that dtype.
    """
    autocast = _checks.autocast_device(embed)
    if autocast is not None:
        embed, weight, bias, pos_embed = _checks.autocast_inputs(autocast, embed, weight, bias, pos_embed)
    gh, gw, eh, ew, num_prefix = _check_args(embed, weight, bias, pos_embed, grid, embed_grid, num_prefix)
    backend = _resolve_backend(backend, embed.device)
    if backend == "reference":
        with _checks.autocast_off(autocast):
            return _ref.prompt_map_reference(embed, weight, bias, pos_embed, (gh, gw), num_prefix=num_prefix,
                                             embed_grid=(eh, ew))
    embed, weight = embed.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    pos_embed = None if pos_embed is None else pos_embed.contiguous()
    args = (embed, weight, bias, pos_embed, gh, gw, eh, ew, num_prefix)
    if backend == "triton":
        tensors = args[:4]
        if not eager_triton(*tensors):
            return _triton_ops.prompt_map_fwd_triton(*args)
        with direct_launches():
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
                return _EagerTritonPromptMap.apply(*args)
            return _triton_ops.prompt_map_fwd(*args)
    return torch.ops.sa2vp_kernels.prompt_map_fwd(*args)
