"""Fused prompt add: the checked public entry point of ``prompt_add`` and its backends.

For every token of ``message`` and ``target`` (both ``(B, N, C)``)::

    out = target + scale * dropout(up(dropout(gelu(down(layer_norm(message)))))) [+ deep_scale * deep]

with ``down: C -> r`` and ``up: r -> C`` linear maps, exact (erf) GELU, and an optional
batch-independent ``deep`` term ``(1, N, C)`` scaled per channel by ``deep_scale`` ``(C,)``.  This is
the adapter that turns SA2VP's cross-attention output into the message added to a pathway.

The forward reads ``target`` and ``message`` once and writes ``out`` once; it saves the per-token
LayerNorm statistics and the low-rank pre-GELU activations ``z`` (tokens x r) for the backward.
Dropout masks are a counter-based hash of ``(seed, stream, row, column)``
(:mod:`sa2vp_kernels.reference.prompt_add`), identical on every backend and regenerated in the
backward.

The compiled ops ``torch.ops.sa2vp_kernels.prompt_add_fwd/bwd`` (``csrc/cpu``, ``csrc/cuda``) and the
Triton ops ``prompt_add_fwd_triton/bwd_triton`` (:mod:`sa2vp_kernels.triton.prompt_add`) share one
schema, except that the Triton backward also takes ``down_bias`` (after ``down_weight``).  The fake implementations of both and the autograd of the Triton ops are registered here; the
compiled ops have the same autograd formula in C++ (``csrc/autograd.cpp``, less host time per call).
"""
from __future__ import annotations

import torch

from . import _checks, _ext
from ._dispatch import direct_launches, eager_triton, first_derivative_only, resolve_backend, triton_available
from .reference import prompt_add as _ref


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, deep,
              deep_scale, scale, dropout_p, eps, seed):
    B, N, C = message.shape
    M, r = B * N, down_weight.shape[0]
    stat = _stat_dtype(message.dtype)
    return (target.new_empty((B, N, C)), message.new_empty((M,), dtype=stat),
            message.new_empty((M,), dtype=stat), message.new_empty((M, r), dtype=stat))


def _fake_bwd(grad_out, message, mean, rstd, z, norm_weight, norm_bias, down_weight, up_weight, scale,
              dropout_p, seed):
    return (message.new_empty(message.shape), norm_weight.new_empty(norm_weight.shape),
            norm_bias.new_empty(norm_bias.shape), down_weight.new_empty(down_weight.shape),
            down_weight.new_empty(down_weight.shape[:1]), up_weight.new_empty(up_weight.shape),
            up_weight.new_empty(up_weight.shape[:1]))


def _setup_context(ctx, inputs, output):
    (target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, deep, deep_scale,
     scale, dropout_p, eps, seed) = inputs
    out, mean, rstd, z = output
    ctx.mark_non_differentiable(mean, rstd, z)
    ctx.save_for_backward(message, mean, rstd, z, norm_weight, norm_bias, down_weight, down_bias, up_weight, deep,
                          deep_scale)
    ctx.args = (scale, dropout_p, seed)


def _make_backward(bwd_op):
    """The autograd backward of the Triton forward ops around the Triton backward op ``bwd_op``."""
    def backward(ctx, grad_out, grad_mean, grad_rstd, grad_z):
        (message, mean, rstd, z, norm_weight, norm_bias, down_weight, down_bias, up_weight, deep,
         deep_scale) = ctx.saved_tensors
        scale, dropout_p, seed = ctx.args
        needs = ctx.needs_input_grad
        if grad_out is None:
            grad_out = torch.zeros_like(message)
        grads = [None] * 14
        if needs[0]:
            grads[0] = grad_out
        if any(needs[1:8]):
            grad_out_c = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
            grads[1:8] = bwd_op(grad_out_c, message, mean, rstd, z, norm_weight, norm_bias, down_weight,
                                down_bias, up_weight, scale, dropout_p, seed)
        if deep is not None and (needs[8] or needs[9]):
            # out depends on deep through a broadcast over the batch: reduce grad_out over it once.
            stat = _stat_dtype(grad_out.dtype)
            summed = grad_out.sum(0, dtype=stat)
            if needs[8]:
                grads[8] = (summed * deep_scale.to(stat)).to(deep.dtype).unsqueeze(0)
            if needs[9]:
                grads[9] = (summed * deep[0].to(stat)).sum(0).to(deep_scale.dtype)
        return tuple(g if n else None for g, n in zip(grads, needs))

    return backward


if _ext.has_kernel("prompt_add_fwd", "CPU") or _ext.has_kernel("prompt_add_fwd", "CUDA"):
    torch.library.register_fake("sa2vp_kernels::prompt_add_fwd")(_fake_fwd)
    torch.library.register_fake("sa2vp_kernels::prompt_add_bwd")(_fake_bwd)

_triton_ops = None
if triton_available():
    from .triton import prompt_add as _triton_prompt_add

    _triton_ops = _triton_prompt_add
    torch.library.register_autograd("sa2vp_kernels::prompt_add_fwd_triton",
                                    _make_backward(_triton_prompt_add.prompt_add_bwd_triton),
                                    setup_context=_setup_context)
    _eager_backward = _make_backward(_triton_prompt_add.prompt_add_bwd)


class _EagerTritonPromptAdd(torch.autograd.Function):
    """The registered Triton ops' forward and backward, for eager calls (``_dispatch.eager_triton``);
    the 14 arguments are the ops' (the backward's are shared with the registered autograd)."""

    @staticmethod
    def forward(ctx, *args):
        out, mean, rstd, z = _triton_ops.prompt_add_fwd(*args)
        (target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, deep, deep_scale,
         scale, dropout_p, eps, seed) = args
        ctx.save_for_backward(message, mean, rstd, z, norm_weight, norm_bias, down_weight, down_bias, up_weight,
                              deep, deep_scale)
        ctx.args = (scale, dropout_p, seed)
        return out

    @staticmethod
    @first_derivative_only('prompt_add with backend="triton"')
    def backward(ctx, grad_out):
        with direct_launches(grad_out):  # (the saved tensors come from an eager forward)
            return _eager_backward(ctx, grad_out, None, None, None)


def _check_float(name, value, *, low, high=None, high_inclusive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    bad = value < low or (high is not None and (value > high if high_inclusive else value >= high))
    if bad or value != value:
        interval = f"[{low}, {high}{']' if high_inclusive else ')'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def _check_args(target, message, scale, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias,
                deep, deep_scale, dropout_p, eps, seed):
    _checks.check_tensor("target", target, dim=3)
    _checks.check_tensor("message", message, dim=3)
    _checks.check_dtype_for_device("message", message)
    if target.shape != message.shape:
        raise ValueError(f"target and message must have the same shape (B, N, C); got target "
                         f"{tuple(target.shape)} and message {tuple(message.shape)}")
    B, N, C = message.shape
    if B < 1 or N < 1 or C < 1:
        raise ValueError(f"message must be a non-empty (B, N, C) tensor, got shape {tuple(message.shape)}")
    weights = {"norm_weight": norm_weight, "norm_bias": norm_bias, "down_weight": down_weight,
               "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias}
    for name, t in weights.items():
        _checks.check_tensor(name, t)
    if (deep is None) != (deep_scale is None):
        raise ValueError("deep and deep_scale must be given together (deep (1, N, C) and deep_scale (C,)), "
                         f"got deep={'None' if deep is None else 'a tensor'} and "
                         f"deep_scale={'None' if deep_scale is None else 'a tensor'}")
    if deep is not None:
        _checks.check_tensor("deep", deep)
        _checks.check_tensor("deep_scale", deep_scale)
    _checks.check_same("message", message, {"target": target, **weights, "deep": deep, "deep_scale": deep_scale})
    if norm_weight.shape != (C,) or norm_bias.shape != (C,):
        raise ValueError(f"norm_weight and norm_bias must have shape (C,) = ({C},); got "
                         f"{tuple(norm_weight.shape)} and {tuple(norm_bias.shape)}")
    if down_weight.dim() != 2 or down_weight.shape[1] != C or down_weight.shape[0] < 1:
        raise ValueError(f"down_weight must have shape (r, C) with C = {C}; got {tuple(down_weight.shape)}")
    r = down_weight.shape[0]
    if down_bias.shape != (r,):
        raise ValueError(f"down_bias must have shape (r,) = ({r},); got {tuple(down_bias.shape)}")
    if up_weight.dim() != 2 or up_weight.shape[0] != C:
        raise ValueError(f"up_weight must have shape (C, r) with C = {C}; got {tuple(up_weight.shape)}")
    if up_weight.shape[1] != r:
        raise ValueError(f"up_weight has inner dimension {up_weight.shape[1]} but down_weight has r = {r}; "
                         "up_weight must be (C, r) for down_weight (r, C)")
    if up_bias.shape != (C,):
        raise ValueError(f"up_bias must have shape (C,) = ({C},); got {tuple(up_bias.shape)}")
    if deep is not None:
        if deep.shape != (1, N, C):
            raise ValueError(f"deep must have shape (1, N, C) = (1, {N}, {C}); got {tuple(deep.shape)}")
        if deep_scale.shape != (C,):
            raise ValueError(f"deep_scale must have shape (C,) = ({C},); got {tuple(deep_scale.shape)}")
    scale = _check_float("scale", scale, low=float("-inf"))
    dropout_p = _check_float("dropout_p", dropout_p, low=0.0, high=1.0)
    eps = _check_float("eps", eps, low=0.0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < _ref.MAX_SEED):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    return scale, dropout_p, eps


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    # evaluated once at trace time under torch.compile (the kernel registry queries are not traceable)
    return resolve_backend(backend, device, "prompt_add_fwd")


def draw_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, _ref.MAX_SEED - 1, (), dtype=torch.int64).item())


def prompt_add(target, message, scale, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, *,
               deep=None, deep_scale=None, dropout_p=0.0, eps=1e-6, seed=None, backend="auto"):
    """Add the adapted message to a token map: ``target + scale * adapter(message) [+ deep_scale * deep]``.

    ``adapter(x) = dropout(up(dropout(gelu(down(layer_norm(x))))))`` applied to every token.

    Args:
        target: ``(B, N, C)`` token map the message is added to.
        message: ``(B, N, C)`` message (e.g. a cross-attention output) fed to the adapter.
        scale: Python float multiplying the adapter output.
        norm_weight, norm_bias: ``(C,)`` LayerNorm affine parameters.
        down_weight, down_bias: ``(r, C)`` and ``(r,)``, the ``C -> r`` projection.
        up_weight, up_bias: ``(C, r)`` and ``(C,)``, the ``r -> C`` projection.
        deep: optional ``(1, N, C)`` batch-independent term, added as ``deep_scale * deep``.
        deep_scale: ``(C,)`` per-channel scale of ``deep`` (given with ``deep``).
        dropout_p: dropout probability in ``[0, 1)`` of both dropouts (0 disables them).
        eps: LayerNorm epsilon.
        seed: int in ``[0, 2**63)`` selecting the dropout masks; drawn from torch's default
            generator when ``None`` and ``dropout_p > 0``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(B, N, C)`` tensor, dtype of ``target``. Under ``torch.autocast`` the op computes in the widest
        dtype of the tensor arguments (at least float32 on the CPU) and returns that dtype.
    """
    autocast = _checks.autocast_device(message)
    if autocast is not None:
        (target, message, norm_weight, norm_bias, down_weight, down_bias, up_weight, up_bias, deep,
         deep_scale) = _checks.autocast_inputs(autocast, target, message, norm_weight, norm_bias, down_weight,
                                               down_bias, up_weight, up_bias, deep, deep_scale)
    scale, dropout_p, eps = _check_args(target, message, scale, norm_weight, norm_bias, down_weight, down_bias,
                                        up_weight, up_bias, deep, deep_scale, dropout_p, eps, seed)
    backend = _resolve_backend(backend, message.device)
    if dropout_p == 0:
        seed = 0
    elif seed is None:
        seed = draw_seed()
    if backend == "reference":
        with _checks.autocast_off(autocast):
            return _ref.prompt_add_reference(target, message, scale, norm_weight, norm_bias, down_weight,
                                             down_bias, up_weight, up_bias, deep, deep_scale, dropout_p, eps, seed)
    target, message, deep = (_last_dim_contiguous(t) for t in (target, message, deep))
    args = (target, message, norm_weight.contiguous(), norm_bias.contiguous(), down_weight.contiguous(),
            down_bias.contiguous(), up_weight.contiguous(), up_bias.contiguous(), deep,
            None if deep_scale is None else deep_scale.contiguous(), scale, dropout_p, eps, seed)
    if backend == "triton":
        tensors = args[:10]
        if not eager_triton(*tensors):
            out = _triton_ops.prompt_add_fwd_triton(*args)[0]
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            with direct_launches():
                out = _EagerTritonPromptAdd.apply(*args)
        else:
            with direct_launches():
                out = _triton_ops.prompt_add_fwd(*args)[0]
    else:
        out = torch.ops.sa2vp_kernels.prompt_add_fwd(*args)[0]
    return out
